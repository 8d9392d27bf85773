"""Aaren: softmax attention of a constant query over every prefix, computed as an RNN.

Feng et al., "Attention as an RNN" (2024). A query ``q`` that does not change over time (Aaren's
learned query token) attends to every prefix of the keys and values::

    s_i = scale * q . k_i
    o_t = sum_{i<=t} exp(s_i) v_i / sum_{i<=t} exp(s_i)          (softmax attention over 1..t)

which is a recurrence over the running max ``m``, the running sum ``s = sum exp(s_i - m)`` and the
running weighted value sum ``a = sum exp(s_i - m) v_i``::

    m_t = max(m_{t-1}, s_t)
    s_t = s_{t-1} exp(m_{t-1} - m_t) + exp(s_t - m_t)
    a_t = a_{t-1} exp(m_{t-1} - m_t) + exp(s_t - m_t) v_t,          o_t = a_t / s_t

and, because combining two such summaries is associative, a parallel prefix scan
(the paper's Section 3.2): ``(m_A, u_A, w_A) + (m_B, u_B, w_B) = (m, u_A e^{m_A - m} + u_B
e^{m_B - m}, w_A e^{m_A - m} + w_B e^{m_B - m})`` with ``m = max(m_A, m_B)``.

Layout: ``q [B, H, D]`` (one query per batch element and head; a learned query ``[H, D]`` is also
accepted and shared by the batch), ``k [B, T, H, D]``, ``v [B, T, H, V]``, output ``[B, T, H, V]``.
State: a tuple of float32 tensors ``(m [B, H], s [B, H], a [B, H, V])``; ``m = -inf, s = 0, a = 0``
is the empty prefix.

Forms: :func:`naive_aaren` (token by token, constant memory: the RNN), :func:`scan_aaren`
(Hillis-Steele parallel prefix scan, ``log2 T`` steps), :func:`chunk_aaren` (chunkwise: prefix
max and sums inside chunks, the state carried between chunks) and :func:`step_aaren` (decoding).
"""

from __future__ import annotations

import math

import torch

from effattn._checks import check_same_dtype, check_scale, check_tensor
from effattn.linear._common import LinearOp, check_chunk_size, check_state, register, run_varlen

__all__ = ["naive_aaren", "scan_aaren", "chunk_aaren", "step_aaren"]

AarenState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check_inputs(q, k, v) -> tuple[torch.Tensor, int, int, int, int, int]:
    """Validate; returns ``(q as [B, H, D], B, T, H, D, V)``."""
    check_tensor("k", k, 4, "[batch, seq, heads, head_dim]")
    check_tensor("v", v, 4, "[batch, seq, heads, value_dim]")
    B, T, H, D = k.shape
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor of shape [batch, heads, head_dim], got {type(q).__name__}")
    if q.dim() == 2:
        check_tensor("q", q, 2, "[heads, head_dim]")
        q = q.unsqueeze(0).expand(B, -1, -1)
    else:
        check_tensor("q", q, 3, "[batch, heads, head_dim] (or [heads, head_dim])")
    check_same_dtype(q=q, k=k, v=v)
    if tuple(q.shape) != (B, H, D):
        raise ValueError(
            f"q must be [batch, heads, head_dim] = {(B, H, D)} (or [heads, head_dim]) to match "
            f"k {tuple(k.shape)}, got {tuple(q.shape)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with k's B, T, H: k {tuple(k.shape)}, v {tuple(v.shape)}")
    return q, B, T, H, D, v.shape[3]


def _check_initial_state(initial_state, B: int, H: int, V: int) -> AarenState | None:
    if initial_state is None:
        return None
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 3:
        raise TypeError(
            f"initial_state must be a tuple (m [B, H], s [B, H], a [B, H, V]), got {type(initial_state).__name__}"
        )
    m = check_state("initial_state[0] (m)", initial_state[0], (B, H))
    s = check_state("initial_state[1] (s)", initial_state[1], (B, H))
    a = check_state("initial_state[2] (a)", initial_state[2], (B, H, V))
    if torch.isnan(m).any() or (m == math.inf).any():
        raise ValueError("initial_state m (running max) must be finite or -inf (empty prefix)")
    if (s < 0).any() or torch.isnan(s).any():
        raise ValueError("initial_state s (sum of exp(s_i - m)) must be >= 0")
    return m, s, a


def _empty_state(B: int, H: int, V: int, device) -> AarenState:
    m = torch.full((B, H), -math.inf, device=device)
    return m, torch.zeros(B, H, device=device), torch.zeros(B, H, V, device=device)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * q . k_t`` in float32, ``[B, T, H]``."""
    return torch.einsum("bhd,bthd->bth", q.float(), k.float()) * scale


def _combine(m1, s1, a1, m2, s2, a2):
    """The associative operator: summary of prefix 1 followed by segment 2 (exps of <= 0 only).

    Where both maxima are -inf (two empty summaries) the result is the empty summary, not NaN."""
    m = torch.maximum(m1, m2)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w1, w2 = torch.exp(m1 - m_safe), torch.exp(m2 - m_safe)
    return m, s1 * w1 + s2 * w2, a1 * w1[..., None] + a2 * w2[..., None]


def _recurrence(sc: torch.Tensor, vf: torch.Tensor, state: AarenState):
    m, s, a = state
    outs = []
    for t in range(sc.shape[1]):
        s_t = sc[:, t]
        m_new = torch.maximum(m, s_t)
        decay, w = torch.exp(m - m_new), torch.exp(s_t - m_new)
        s = s * decay + w
        a = a * decay[..., None] + w[..., None] * vf[:, t]
        m = m_new
        outs.append(a / s[..., None])
    o = torch.stack(outs, dim=1) if outs else vf.new_zeros(vf.shape)
    return o, (m, s, a)


def _varlen(form, q, k, v, scale, initial_state, output_final_state, cu_seqlens, extra):
    return run_varlen(
        form,
        cu_seqlens,
        {"k": k, "v": v},
        {"q": q, "scale": scale, **extra},
        initial_state,
        output_final_state,
    )


def naive_aaren(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: AarenState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AarenState | None]:
    """Reference Aaren, token by token (the RNN form: constant memory), in float32.

    Returns ``(o [B, T, H, V] in v's dtype, (m, s, a) float32 or None)``; ``scale`` defaults to
    ``1 / sqrt(head_dim)``.

    >>> import torch
    >>> q, k, v = torch.randn(2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 4)
    >>> o, (m, s, a) = naive_aaren(q, k, v, output_final_state=True)
    >>> w = torch.softmax(torch.einsum("hd,bthd->bth", q, k) / 8 ** 0.5, dim=1)
    >>> torch.allclose(o[:, -1], torch.einsum("bth,bthv->bhv", w, v), atol=1e-6)
    True
    """
    q, B, T, H, D, V = _check_inputs(q, k, v)
    scale = check_scale(scale, D)
    if cu_seqlens is not None:
        return _varlen(naive_aaren, q, k, v, scale, initial_state, output_final_state, cu_seqlens, {})
    state = _check_initial_state(initial_state, B, H, V) or _empty_state(B, H, V, k.device)
    o, final = _recurrence(_scores(q, k, scale), v.float(), state)
    return o.to(v.dtype), (final if output_final_state else None)


def step_aaren(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: AarenState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AarenState | None]:
    """Decode one or a few tokens against the carried state ``(m, s, a)`` (constant memory).

    Same arguments and result as :func:`naive_aaren`; pass the previous call's final state.

    >>> import torch
    >>> q, k, v = torch.randn(2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 4)
    >>> full, _ = naive_aaren(q, k, v)
    >>> o1, state = step_aaren(q, k[:, :5], v[:, :5], output_final_state=True)
    >>> o2, _ = step_aaren(q, k[:, 5:], v[:, 5:], initial_state=state)
    >>> torch.allclose(o2, full[:, 5:], atol=1e-6)
    True
    """
    q, B, T, H, D, V = _check_inputs(q, k, v)
    scale = check_scale(scale, D)
    if cu_seqlens is not None:
        return _varlen(step_aaren, q, k, v, scale, initial_state, output_final_state, cu_seqlens, {})
    state = _check_initial_state(initial_state, B, H, V) or _empty_state(B, H, V, k.device)
    o, final = _recurrence(_scores(q, k, scale), v.float(), state)
    return o.to(v.dtype), (final if output_final_state else None)


def scan_aaren(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: AarenState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AarenState | None]:
    """All prefixes at once by a Hillis-Steele parallel prefix scan of the associative operator.

    Each token starts as the summary ``(s_t, 1, v_t)``; step ``d = 1, 2, 4, ...`` combines every
    summary with the one ``d`` tokens earlier, so after ``ceil(log2 T)`` steps (all batches and heads
    at once) position ``t`` summarizes tokens ``1..t``; the initial state is then combined in front.
    Work ``O(T log T)``, and autograd keeps ``O(T V log T)``: use :func:`chunk_aaren` for long
    sequences in training. Same arguments and result as :func:`naive_aaren`.

    >>> import torch
    >>> q, k, v = torch.randn(2, 8), torch.randn(1, 50, 2, 8), torch.randn(1, 50, 2, 4)
    >>> torch.allclose(scan_aaren(q, k, v)[0], naive_aaren(q, k, v)[0], atol=1e-5)
    True
    """
    q, B, T, H, D, V = _check_inputs(q, k, v)
    scale = check_scale(scale, D)
    if cu_seqlens is not None:
        return _varlen(scan_aaren, q, k, v, scale, initial_state, output_final_state, cu_seqlens, {})
    state = _check_initial_state(initial_state, B, H, V) or _empty_state(B, H, V, k.device)
    m = _scores(q, k, scale)
    s = torch.ones_like(m)
    a = v.float()
    d = 1
    while d < T:
        cm, cs, ca = _combine(m[:, :-d], s[:, :-d], a[:, :-d], m[:, d:], s[:, d:], a[:, d:])
        m = torch.cat([m[:, :d], cm], dim=1)
        s = torch.cat([s[:, :d], cs], dim=1)
        a = torch.cat([a[:, :d], ca], dim=1)
        d *= 2
    m0, s0, a0 = (t.unsqueeze(1) for t in state)
    m, s, a = _combine(m0, s0, a0, m, s, a)
    o = (a / s[..., None]).to(v.dtype)
    if not output_final_state:
        return o, None
    final = (m[:, -1], s[:, -1], a[:, -1]) if T > 0 else state
    return o, final


def chunk_aaren(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: AarenState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, AarenState | None]:
    """Chunkwise Aaren for training: differentiable through plain autograd, memory ``O(T c)``.

    The scores are cut into chunks of ``c = chunk_size`` (the last padded with ``-inf``, which
    contributes nothing). All chunks at once: the in-chunk prefix max ``cummax``, each chunk's own
    summary ``(max, sum exp, sum exp v)``; then the summaries are carried along the chunks
    (a Python loop over chunks on ``[B, H, V]`` tensors); finally, with ``m_t = max(m_carry,
    cummax_t)``, every position's output is

        o_t = (e^{m_carry - m_t} a_carry + sum_{i<=t in chunk} e^{s_i - m_t} v_i)
              / (e^{m_carry - m_t} s_carry + sum_{i<=t in chunk} e^{s_i - m_t})

    using a ``[c, c]`` lower-triangular weight per chunk and head (exps of ``<= 0`` only; the
    denominator is >= 1). Same arguments and result as :func:`naive_aaren`, plus ``chunk_size``.

    >>> import torch
    >>> q, k, v = torch.randn(2, 8), torch.randn(1, 50, 2, 8), torch.randn(1, 50, 2, 4)
    >>> torch.allclose(chunk_aaren(q, k, v, chunk_size=16)[0], naive_aaren(q, k, v)[0], atol=1e-5)
    True
    """
    check_chunk_size(chunk_size)
    q, B, T, H, D, V = _check_inputs(q, k, v)
    scale = check_scale(scale, D)
    if cu_seqlens is not None:
        extra = {"chunk_size": chunk_size}
        return _varlen(chunk_aaren, q, k, v, scale, initial_state, output_final_state, cu_seqlens, extra)
    state = _check_initial_state(initial_state, B, H, V) or _empty_state(B, H, V, k.device)
    if T == 0:
        return v.new_zeros(v.shape), (state if output_final_state else None)

    c = min(chunk_size, T)
    nc = math.ceil(T / c)
    pad = nc * c - T
    sc = _scores(q, k, scale)  # [B, T, H]
    vf = v.float()
    if pad:
        sc = torch.cat([sc, sc.new_full((B, pad, H), -math.inf)], dim=1)
        vf = torch.cat([vf, vf.new_zeros(B, pad, H, V)], dim=1)
    sc = sc.view(B, nc, c, H)
    vf = vf.view(B, nc, c, H, V)

    # In-chunk prefix max and each chunk's own summary (chunks start with a real token, so the
    # maxima are finite even in the padded last chunk).
    cmax = sc.cummax(dim=2).values  # [B, nc, c, H]
    M = cmax[:, :, -1]  # [B, nc, H]
    e = torch.exp(sc - M[:, :, None])
    S = e.sum(dim=2)
    Asum = torch.einsum("bkch,bkchv->bkhv", e, vf)

    # Carry the summaries along the chunks: the state entering each chunk.
    m, s, a = state
    carried = []
    for M_k, S_k, A_k in zip(M.unbind(1), S.unbind(1), Asum.unbind(1), strict=True):
        carried.append((m, s, a))
        m, s, a = _combine(m, s, a, M_k, S_k, A_k)
    final = (m, s, a)
    m_in = torch.stack([t[0] for t in carried], dim=1)  # [B, nc, H]
    s_in = torch.stack([t[1] for t in carried], dim=1)
    a_in = torch.stack([t[2] for t in carried], dim=1)  # [B, nc, H, V]

    # Every position: running max including the carried state, [c, c] causal weights per chunk.
    m_t = torch.maximum(m_in[:, :, None], cmax)  # [B, nc, c, H], finite
    causal = torch.ones(c, c, dtype=torch.bool, device=sc.device).tril()
    diff = sc[:, :, None, :, :] - m_t[:, :, :, None, :]  # [B, nc, t, i, H]
    W = torch.exp(torch.where(causal[:, :, None], diff, -math.inf))
    carry_w = torch.exp(m_in[:, :, None] - m_t)  # [B, nc, c, H], 0 for an empty carried state
    num = torch.einsum("bktih,bkihv->bkthv", W, vf) + carry_w[..., None] * a_in[:, :, None]
    den = W.sum(dim=3) + carry_w * s_in[:, :, None]
    o = (num / den[..., None]).reshape(B, nc * c, H, V)[:, :T]
    return o.to(v.dtype), (final if output_final_state else None)


# ----------------------------------------------------------------------------------------------
# Registry entry.


def _make_inputs(B, T, H, D, *, device=None, dtype=torch.float32, gate_strength=0.5):
    """``(q [B, H, D], k, v), {}``; ``gate_strength`` sets how peaked the attention is: the score
    standard deviation grows from 0.3 (near-uniform weights) to 10 (one key dominates, exps spanning
    far beyond float32's range without the running max)."""
    sigma = 0.3 + 9.7 * float(gate_strength)
    q = torch.randn(B, H, D, device=device) * sigma
    k = torch.randn(B, T, H, D, device=device)
    v = torch.randn(B, T, H, D, device=device)
    return (q.to(dtype), k.to(dtype), v.to(dtype)), {}


register(
    LinearOp(
        name="aaren",
        naive=naive_aaren,
        chunk=chunk_aaren,
        step=step_aaren,
        make_inputs=_make_inputs,
        state_shape=lambda B, H, D: ((B, H), (B, H), (B, H, D)),
        differentiable_args=("q", "k", "v"),
    )
)
