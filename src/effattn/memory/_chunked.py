"""The chunked form of the generic neural-memory rule (:mod:`effattn.memory._neural`): every gradient of a
chunk is taken at the chunk's start weights ``W0`` (mini-batch gradient descent per chunk: Behrouz, Zhong,
Mirrokni, "Titans: Learning to Memorize at Test Time", 2025, section 3.2), then momentum and decay run as
scans over the chunk's tokens. Two ways to run a chunk:

**Fast (factored) form**, when the update is linear in the gradients (``retention="linear"``, no Muon).
Each per-token gradient of a layer is rank one, ``G_m = a_m^T delta_m`` (layer input and output gradient
at ``W0``; a sum of ``window`` such terms for the Omega rule). With ``P_t = prod_{j<=t} eta_j``,
``D_t = prod_{j<=t} (1 - alpha_j)`` and the gate-product matrices ``L_eta``, ``L_alpha`` (lower
triangular, ``L[t, i] = prod_{i<j<=t}``), the scans unroll to::

    S_t = P_t S_0 - sum_m bs[t, m] a_m^T delta_m          bs = (L_eta diag(theta) Band) diag(gamma)
    W_t = D_t W_0' + E_t S_0 - sum_m ba[t, m] a_m^T delta_m    ba = (L_alpha L_eta diag(theta) Band) diag(gamma)
    E = L_alpha P,  Band[i, m] = 1 for the window tokens m of token i

(``W_0'`` the accumulator the chunk starts from; it equals ``W0`` except in a call that starts inside a
chunk). A read ``h_t W_t`` is then ``D_t h_t W_0' + E_t h_t S_0 - sum_m ba[t, m] (h_t . a_m) delta_m``: a
masked ``[C, C]`` attention-like matmul per layer (the linear-attention chunk trick); layer by layer for a
deeper memory (the query's hidden ``h`` of layer ``l`` comes from the per-token weights of layer
``l-1``). The chunk's last weights are one matmul. No ``[C, d_in, d_out]`` tensor is formed.

**Materialized form** for the rest (Muon's Newton-Schulz of the momentum, Moneta's ``lq`` and Memora's
softmax read maps are not linear in the gradients): per-token gradients and weights ``[C, d_in, d_out]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effattn._checks import check_int
from effattn.memory._neural import (
    check_memory_inputs,
    check_residual_norm,
    decay_matrix,
    init_state,
    layer_norm,
    linear_scan,
    make_state,
    mlp_apply,
    mlp_token_factors,
    newton_schulz,
    read_weights,
    reference_neural_memory,
    window_grads,
)

__all__ = ["chunk_neural_memory", "fast_chunk_applies"]


def fast_chunk_applies(retention: str, muon: bool) -> bool:
    """Whether the fast (factored) chunk form covers a rule: its update must be linear in the gradients
    (``retention="linear"``, no Muon). Titans, Yaad and ATLAS without Muon: yes; Moneta (``lq``), Memora
    (softmax) and ATLAS with Muon: no (materialized form).

    Example::

        >>> fast_chunk_applies("linear", False), fast_chunk_applies("softmax", False)
        (True, False)
    """
    return retention == "linear" and not muon


def _band(C: int, n: int, window: int, like: torch.Tensor) -> torch.Tensor:
    """``[C, n]``: token ``i`` of the chunk (extended index ``i + window - 1``) sums the gradients of the
    extended tokens ``i .. i + window - 1``."""
    i = torch.arange(C, device=like.device)[:, None]
    m = torch.arange(n, device=like.device)[None, :]
    return ((m >= i) & (m <= i + window - 1)).to(like.dtype)


def _chunk_gates(th, et, al, gext, window):
    """Gate matrices of chunks (leading dims ``[B, H, n]``, ``C`` tokens each; ``gext`` the window weights
    of the ``C + window - 1`` extended tokens): ``D``, ``E``, ``ba`` for the reads and the last rows
    ``P_C``, ``bs_C`` for the chunk's final momentum (module docstring). They do not depend on the
    memory, so all chunks of a call are built at once."""
    Ls, La = decay_matrix(et), decay_matrix(1 - al)
    P, D = torch.cumprod(et, -1), torch.cumprod(1 - al, -1)
    E = (La @ P.unsqueeze(-1)).squeeze(-1)
    Ms = Ls * th[..., None, :]
    Ma = La @ Ms
    if window > 1:
        band = _band(th.shape[-1], gext.shape[-1], window, Ms)
        Ms, Ma = Ms @ band, Ma @ band
    return D, E, Ma * gext[..., None, :], P[..., -1], Ms[..., -1, :] * gext


def _fast_chunk(W0, A, S, qc, kw, vw, gates, loss, p, max_grad_norm, residual_norm=False):
    """One chunk in the factored form (module docstring); returns ``(y [B, H, C, V], A_new, S_new)``."""
    D, E, ba, P_last, bs_last = gates
    ins, deltas = mlp_token_factors(W0, kw, vw, loss, p, max_grad_norm, residual_norm)  # at the chunk's start
    D_last, E_last, ba_last = D[..., -1, None, None], E[..., -1, None, None], ba[..., -1, :, None]
    P_last, bs_last = P_last[..., None, None], bs_last[..., None]
    h = qc
    newA, newS = [], []
    for i, (a0, s0, x, d) in enumerate(zip(A, S, ins, deltas)):
        z = D[..., None] * (h @ a0) + E[..., None] * (h @ s0) - ((h @ x.transpose(-1, -2)) * ba) @ d
        h = F.silu(z) if i < len(A) - 1 else z
        newA.append(D_last * a0 + E_last * s0 - (x * ba_last).transpose(-1, -2) @ d)
        newS.append(P_last * s0 - (x * bs_last).transpose(-1, -2) @ d)
    return (qc + layer_norm(h) if residual_norm else h), newA, newS


def _all_gates(segs, th, et, al, gext, window):
    """Per-chunk gate matrices for the chunks ``segs`` (runs of equal-size chunks built in one batch)."""
    B, H = th.shape[:2]
    out, i = [], 0
    while i < len(segs):
        c0, c1 = segs[i]
        C, j = c1 - c0, i
        while j < len(segs) and segs[j][1] - segs[j][0] == C:
            j += 1
        n, end = j - i, c0 + (j - i) * C
        parts = [x[:, :, c0:end].reshape(B, H, n, C) for x in (th, et, al)]
        g = gext[:, :, c0 : end + window - 1].unfold(2, C + window - 1, C)  # [B, H, n, C + window - 1]
        out += list(zip(*(x.unbind(2) for x in _chunk_gates(*parts, g, window))))
        i = j
    return out


def _materialized_chunk(
    W0, A, S, qc, kw, vw, gw, th, et, al, window, loss, p, retention, q_exp, muon, max_grad_norm, residual_norm
):
    """One chunk with per-token gradients and weights ``[B, H, C, d_in, d_out]``."""
    G = window_grads(W0, kw, vw, gw, qc.shape[2], window, loss, p, max_grad_norm, residual_norm)
    newA, newS, Wt = [], [], []
    for a, s, g in zip(A, S, G):
        if muon:
            s_all = linear_scan(g, et, s)
            u = -th[..., None, None] * newton_schulz(s_all)
        else:
            s_all = linear_scan(-th[..., None, None] * g, et, s)
            u = s_all
        a_all = linear_scan(u, 1 - al, a)
        Wt.append(read_weights(a_all, retention, q_exp))
        newA.append(a_all[:, :, -1])
        newS.append(s_all[:, :, -1])
    return mlp_apply(Wt, qc, per_token=True, residual_norm=residual_norm), newA, newS


def chunk_neural_memory(
    q,
    k,
    v,
    theta,
    eta,
    alpha,
    weights,
    *,
    gamma=None,
    loss="l2",
    p=2.0,
    retention="linear",
    q_exp=2.0,
    window=1,
    muon=False,
    max_grad_norm=None,
    residual_norm=False,
    chunk_size=16,
    initial_state=None,
    output_final_state=False,
    fast=None,
):
    """Chunked generic rule: every gradient of a chunk taken at the chunk's start weights, momentum and
    decay as scans over the chunk. ``fast=None`` picks the factored form where it applies
    (:func:`fast_chunk_applies`), ``False`` forces the materialized one; both compute the same thing.
    ``chunk_size = 1`` equals :func:`effattn.memory.reference_neural_memory`; larger chunks are the
    paper's approximation. The chunk grid starts at a sequence's first token and continues across calls
    (the state keeps the chunk's start weights ``A0`` and the position ``pos`` in it), so a call split
    anywhere, and the one-token step ``reference_neural_memory(..., chunk_size=c)``, equal one call.
    A state whose rows sit at different grid positions (after a padded call) runs token by token.

    Example::

        >>> x = torch.randn(1, 6, 1, 3); g = torch.full((1, 6, 1), 0.5)
        >>> w = [torch.zeros(1, 3, 3)]
        >>> a, _ = chunk_neural_memory(x, x, x, g, g, g, w, chunk_size=1)
        >>> b, _ = reference_neural_memory(x, x, x, g, g, g, w)
        >>> torch.allclose(a, b, atol=1e-6)
        True
    """
    B, T, H = check_memory_inputs(
        q, k, v, theta, eta, alpha, weights, gamma, loss, p, retention, q_exp, window, muon, max_grad_norm
    )
    check_residual_norm(residual_norm, k, v)
    check_int("chunk_size", chunk_size, 1)
    if fast is None:
        fast = fast_chunk_applies(retention, muon)
    elif fast and not fast_chunk_applies(retention, muon):
        raise ValueError(
            f"fast=True needs an update linear in the gradients (retention='linear', muon=False), "
            f"got retention={retention!r}, muon={muon}"
        )
    opts = dict(gamma=gamma, loss=loss, p=p, retention=retention, q_exp=q_exp, window=window, muon=muon)
    opts.update(max_grad_norm=max_grad_norm, residual_norm=residual_norm)
    A, S, A0, pos, kb, vb, gb = init_state(weights, B, window, k, v, initial_state)
    pos0 = int(pos[0]) if B else 0
    if B and bool((pos != pos0).any()):  # rows on different grid positions: the token-by-token form
        return reference_neural_memory(
            q,
            k,
            v,
            theta,
            eta,
            alpha,
            weights,
            **opts,
            chunk_size=chunk_size,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )
    qf, kf, vf = (as_float(t).transpose(1, 2) for t in (q, k, v))
    th, et, al = (as_float(t).transpose(1, 2) for t in (theta, eta, alpha))
    ga = torch.ones_like(th) if gamma is None else as_float(gamma).transpose(1, 2)
    segs, c0, off = [], 0, pos0
    while c0 < T:
        segs.append((c0, min(T, c0 + chunk_size - off)))
        c0, off = segs[-1][1], 0
    if fast:
        all_gates = _all_gates(segs, th, et, al, torch.cat([gb, ga], 2), window)
    # one split per input (not a slice per chunk: each slice's backward writes a whole-length gradient)
    sizes = [c1 - c0 for c0, c1 in segs]
    qs, ks, vs, gs, ths, ets, als = (x.split(sizes, 2) for x in (qf, kf, vf, ga, th, et, al))
    ys = []
    for i in range(len(segs)):
        kw, vw, gw = (torch.cat([buf, x[i]], 2) for buf, x in ((kb, ks), (vb, vs), (gb, gs)))
        W0 = [read_weights(a, retention, q_exp) for a in A0]
        if fast:
            y, A, S = _fast_chunk(W0, A, S, qs[i], kw, vw, all_gates[i], loss, p, max_grad_norm, residual_norm)
        else:
            gates = (ths[i], ets[i], als[i])
            y, A, S = _materialized_chunk(
                W0,
                A,
                S,
                qs[i],
                kw,
                vw,
                gw,
                *gates,
                window,
                loss,
                p,
                retention,
                q_exp,
                muon,
                max_grad_norm,
                residual_norm,
            )
        ys.append(y)
        pos0 = (pos0 + sizes[i]) % chunk_size
        if pos0 == 0:
            A0 = A
        keep = window - 1
        kb, vb, gb = (x[:, :, x.shape[2] - keep :] for x in (kw, vw, gw))
    y = torch.cat(ys, dim=2).transpose(1, 2) if ys else vf.new_zeros(B, 0, H, v.shape[-1])
    if chunk_size == 1:
        A0 = A
    pos = torch.full_like(pos, pos0)
    state = make_state(A, S, A0, pos, kb, vb, gb, chunk_size) if output_final_state else None
    return y.to(q.dtype), state


def as_float(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when given float64 (gradchecks)."""
    return x if x.dtype == torch.float64 else x.float()
