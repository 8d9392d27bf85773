"""DeltaNet: linear attention with the delta rule.

The state (a fast weight matrix ``S`` of shape ``[K, V]`` per head) is corrected towards each new
association instead of only accumulating it::

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T  =  (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

with ``beta_t`` in [0, 1] (or [0, 2] with ``allow_neg_eigval=True``, which lets the transition
``I - beta k k^T`` have a negative eigenvalue) and L2-normalised keys and queries
(``use_qk_l2norm=True``, as fla's ``use_qk_l2norm_in_kernel``), so that every transition is a
contraction.

References:
  Schlag, Irie, Schmidhuber, "Linear Transformers Are Secretly Fast Weight Programmers", 2021.
  Yang, Wang, Zhang, Shen, Kim, "Parallelizing Linear Transformers with the Delta Rule over
  Sequence Length", 2024 (the chunkwise WY / UT form used by :func:`chunk_delta_rule`).
  Grazzi, Siems, Franke, Zela, Hutter, Pontil, "Unlocking State-Tracking in Linear RNNs Through
  Negative Eigenvalues", 2024 (``allow_neg_eigval``).

Chunkwise form. Write ``delta_t = beta_t (v_t - S_{t-1}^T k_t)`` so that ``S_t = S_{t-1} + k_t delta_t^T``.
Inside a chunk of ``C`` tokens that starts from state ``S_0`` (with an optional scalar log-decay
``g``, cumulated inside the chunk as ``G``, which :mod:`effattn.linear.gated_delta_rule` uses):

    (I + A) Delta = diag(beta) V - diag(beta * exp(G)) K S_0,   A = tril(diag(beta) (K K^T * Gamma), -1)

with ``Gamma_ij = exp(G_i - G_j)`` for ``i >= j``. The UT transform solves this unit lower
triangular system once per chunk, independently of ``S_0``: ``U = (I + A)^{-1} diag(beta) V`` and
``W = (I + A)^{-1} diag(beta exp(G)) K``, so ``Delta = U - W S_0``. Then

    O   = scale * (diag(exp G) Q S_0 + tril(Q K^T * Gamma) Delta)
    S_C = exp(G_C) S_0 + (K * exp(G_C - G))^T Delta

All chunks' ``U, W`` are computed in one batched ``solve_triangular``; only the ``[K, V]`` state
passing is a Python loop over chunks.

Example::

    >>> import torch
    >>> from effattn.linear import chunk_delta_rule, naive_delta_rule
    >>> q, k, v = (torch.randn(1, 10, 2, 8) for _ in range(3))
    >>> beta = torch.rand(1, 10, 2)
    >>> o, s = chunk_delta_rule(q, k, v, beta, output_final_state=True, chunk_size=4)
    >>> o_ref, s_ref = naive_delta_rule(q, k, v, beta, output_final_state=True)
    >>> bool(torch.allclose(o, o_ref, atol=1e-5)), tuple(s.shape)
    (True, (1, 2, 8, 8))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effattn._checks import check_cu_seqlens, check_scale, check_tensor
from effattn.linear._common import LinearOp, check_linear_qkv, check_state, register, run_varlen

__all__ = ["naive_delta_rule", "chunk_delta_rule", "step_delta_rule"]

# ----------------------------------------------------------------------------------------------
# validation shared with gated_delta_rule.py
# ----------------------------------------------------------------------------------------------


def _check_beta(beta: torch.Tensor, shape: tuple[int, int, int], allow_neg_eigval: bool) -> torch.Tensor:
    check_tensor("beta", beta, 3, "[batch, seq, heads]")
    if tuple(beta.shape) != tuple(shape):
        raise ValueError(
            f"beta must have shape [batch, seq, heads] = {tuple(shape)}, got {tuple(beta.shape)}"
        )
    hi = 2.0 if allow_neg_eigval else 1.0
    if beta.numel() and (torch.isnan(beta).any() or (beta < 0).any() or (beta > hi).any()):
        what = "[0, 2]" if allow_neg_eigval else "[0, 1] (or [0, 2] with allow_neg_eigval=True)"
        raise ValueError(
            f"beta must lie in {what}, got values in [{beta.min().item():.4g}, {beta.max().item():.4g}]"
        )
    return beta


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def _check_varlen(cu_seqlens: torch.Tensor, batch: int, total: int, initial_state, state_tail: tuple) -> None:
    """Packed sequences: batch 1, and the state has one row per sequence, ``[N, *state_tail]``."""
    check_cu_seqlens(cu_seqlens, batch, total)
    check_state("initial_state", initial_state, (cu_seqlens.numel() - 1, *state_tail))


def _prepare_qk(q: torch.Tensor, k: torch.Tensor, use_qk_l2norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q = F.normalize(q, p=2.0, dim=-1, eps=1e-6)
        k = F.normalize(k, p=2.0, dim=-1, eps=1e-6)
    return q, k


# ----------------------------------------------------------------------------------------------
# reference and decoding forms
# ----------------------------------------------------------------------------------------------


def naive_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    allow_neg_eigval: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token delta rule in float32 (the ground truth).

    ``S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T``, ``o_t = scale * S_t^T q_t``.
    q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, beta ``[B, T, H]``; state float32 ``[B, H, K, V]``.
    Returns ``(o [B, T, H, V] in q's dtype, final state or None)``.
    """
    B, T, H, K, V = check_linear_qkv(q, k, v)
    _check_beta(beta, (B, T, H), allow_neg_eigval)
    scale = check_scale(scale, K)
    kw = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, allow_neg_eigval=allow_neg_eigval)
    if cu_seqlens is not None:
        _check_varlen(cu_seqlens, B, T, initial_state, (H, K, V))
        seq = dict(q=q, k=k, v=v, beta=beta)
        return run_varlen(naive_delta_rule, cu_seqlens, seq, kw, initial_state, output_final_state)
    S0 = check_state("initial_state", initial_state, (B, H, K, V))

    qf, kf = _prepare_qk(q, k, use_qk_l2norm)
    vf, bf = v.float(), beta.float()
    S = S0 if S0 is not None else q.new_zeros(B, H, K, V, dtype=torch.float32)
    outs = []
    for t in range(T):
        q_t, k_t, v_t, b_t = qf[:, t], kf[:, t], vf[:, t], bf[:, t, :, None]  # [B, H, *]
        v_old = torch.einsum("bhkv,bhk->bhv", S, k_t)  # what the memory currently returns for k_t
        S = S + torch.einsum("bhk,bhv->bhkv", k_t, b_t * (v_t - v_old))
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q_t) * scale)
    o = torch.stack(outs, dim=1) if outs else vf.new_zeros(B, 0, H, V)
    return o.to(q.dtype), (S if output_final_state else None)


def step_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    allow_neg_eigval: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoding: advance the carried state ``initial_state [B, H, K, V]`` by the few given tokens.

    Same arguments and result as :func:`naive_delta_rule` (the recurrence is the cheapest form for a
    handful of tokens: O(K V) memory per head, independent of the context length).
    """
    return naive_delta_rule(
        q,
        k,
        v,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm,
        allow_neg_eigval=allow_neg_eigval,
    )


# ----------------------------------------------------------------------------------------------
# chunkwise form (shared with gated_delta_rule.py: g=None is the plain delta rule)
# ----------------------------------------------------------------------------------------------


def _to_chunks(x: torch.Tensor, T_pad: int, C: int) -> torch.Tensor:
    """``[B, T, H, *D]`` -> ``[B, H, N, C, *D]``, zero-padded along T to ``T_pad = N * C``."""
    B, T, H = x.shape[:3]
    rest = x.shape[3:]
    if T_pad != T:
        x = torch.cat([x, x.new_zeros(B, T_pad - T, H, *rest)], dim=1)
    x = x.reshape(B, T_pad // C, C, H, *rest)
    return x.movedim(3, 1).contiguous()


def _decay_matrix(g: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``Gamma[..., i, j] = exp(g_{j+1} + ... + g_i)`` where ``keep`` (a lower-triangular ``[C, C]``
    mask, or one broadcasting to ``[..., C, C]``) holds, 0 elsewhere, from per-chunk log-decays
    ``g [..., C]``.

    Each entry sums only its own segment (a masked cumsum, as Mamba2's ``segsum``) instead of
    differencing two cumulated sums: after one very strong decay, ``G_i - G_j`` of two large
    cumsums would lose the small decays that follow to float32 cancellation, and ``-inf`` gates
    would give ``-inf - (-inf)``. Exponents are <= 0 wherever ``exp`` is taken.
    """
    C = g.shape[-1]
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    seg = g[..., :, None].expand(*g.shape, C).masked_fill(~strictly_lower, 0.0).cumsum(-2)
    return seg.masked_fill(~keep, float("-inf")).exp()


def _chunk_delta_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    S0: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise (gated) delta rule on float32 ``[B, T, H, *]`` inputs (q, k already normalised).

    ``g`` (``[B, T, H]`` log-decay, or None for no decay). Returns ``(o [B, T, H, V], S_T [B, H, K, V])``.
    Padding tokens have ``k = v = beta = g = 0``: they neither write nor decay the state.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    T_pad = N * C
    qc, kc, vc = _to_chunks(q, T_pad, C), _to_chunks(k, T_pad, C), _to_chunks(v, T_pad, C)  # [B,H,N,C,*]
    bc = _to_chunks(beta, T_pad, C)  # [B, H, N, C]

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    kk = kc @ kc.transpose(-1, -2)  # [B, H, N, C, C]
    qk = qc @ kc.transpose(-1, -2)
    if g is not None:
        gamma = _decay_matrix(_to_chunks(g, T_pad, C), causal)  # exp(G_i - G_j), i >= j; [B, H, N, C, C]
        kk = kk * gamma
        qk = qk * gamma
        eG = _to_chunks(g, T_pad, C).cumsum(-1).exp()  # exp(G_i), decay since the chunk start
        decay_last = eG[..., -1]  # exp(G_C): decay of the whole chunk, [B, H, N]
        k_to_end = kc * gamma[..., -1, :, None]  # k_j exp(G_C - G_j)
        k_w = kc * (bc * eG)[..., None]
    else:
        qk = qk.masked_fill(~causal, 0.0)
        decay_last = None
        k_to_end = kc
        k_w = kc * bc[..., None]

    # UT transform, all heads and chunks at once: (I + A) [W | U] = [diag(beta e^G) K | diag(beta) V].
    A = (bc[..., None] * kk).tril(-1)
    I_plus_A = A + torch.eye(C, dtype=A.dtype, device=A.device)
    WU = torch.linalg.solve_triangular(
        I_plus_A, torch.cat([k_w, vc * bc[..., None]], dim=-1), upper=False, unitriangular=True
    )
    W, U = WU[..., :K], WU[..., K:]

    # State passing S_n = M_n S_{n-1} + R_n: M_n = e^{G_C} I - (K e^{G_C - G})^T W, R_n = (K e^{G_C - G})^T U
    kt = k_to_end.transpose(-1, -2)  # [B, H, N, K, C]
    M = -(kt @ W)
    if decay_last is not None:
        M = M + decay_last[..., None, None] * torch.eye(K, dtype=M.dtype, device=M.device)
    else:
        M = M + torch.eye(K, dtype=M.dtype, device=M.device)
    R = kt @ U  # [B, H, N, K, V]
    S = S0 if S0 is not None else q.new_zeros(B, H, K, V)
    starts = []
    # unbind (not M[:, :, n]): its backward is one stack, where indexing would allocate a full-size
    # zero gradient per chunk (quadratic in the number of chunks).
    for M_n, R_n in zip(M.unbind(2), R.unbind(2), strict=True):
        starts.append(S)
        S = M_n @ S + R_n
    S_start = torch.stack(starts, dim=2)  # state entering each chunk, [B, H, N, K, V]

    delta = U - W @ S_start  # [B, H, N, C, V]
    q_in = qc * eG[..., None] if g is not None else qc
    o = (q_in @ S_start + qk @ delta) * scale  # [B, H, N, C, V]
    o = o.movedim(1, 3).reshape(B, T_pad, H, V)[:, :T].contiguous()
    return o, S


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    allow_neg_eigval: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise-parallel delta rule (WY / UT transform, Yang et al. 2024); same result as
    :func:`naive_delta_rule`, differentiable through autograd, memory linear in T.

    Within a chunk: ``U = (I + tril(diag(beta) K K^T, -1))^{-1} diag(beta) V``, ``W`` likewise with K,
    ``Delta = U - W S``, ``O = scale (Q S + tril(Q K^T) Delta)``, ``S <- S + K^T Delta``.
    ``chunk_size`` need not divide T.
    """
    B, T, H, K, V = check_linear_qkv(q, k, v)
    _check_beta(beta, (B, T, H), allow_neg_eigval)
    scale = check_scale(scale, K)
    _check_chunk_size(chunk_size)
    kw = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, allow_neg_eigval=allow_neg_eigval)
    kw["chunk_size"] = chunk_size
    if cu_seqlens is not None:
        _check_varlen(cu_seqlens, B, T, initial_state, (H, K, V))
        seq = dict(q=q, k=k, v=v, beta=beta)
        return run_varlen(chunk_delta_rule, cu_seqlens, seq, kw, initial_state, output_final_state)
    S0 = check_state("initial_state", initial_state, (B, H, K, V))
    if T == 0:
        S = S0 if S0 is not None else q.new_zeros(B, H, K, V, dtype=torch.float32)
        return v.new_zeros(B, 0, H, V).to(q.dtype), (S if output_final_state else None)
    qf, kf = _prepare_qk(q, k, use_qk_l2norm)
    o, S = _chunk_delta_core(qf, kf, v.float(), beta.float(), None, scale, S0, chunk_size)
    return o.to(q.dtype), (S if output_final_state else None)


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------


def _make_inputs(B, T, H, D, *, device="cpu", dtype=torch.float32, gate_strength=0.5):
    """Random inputs: q, k, v ~ N(0, 1) (normalised inside), beta = sigmoid(N(0, 1)) in (0, 1).
    The delta rule has no decay gate, so ``gate_strength`` is unused."""
    q = torch.randn(B, T, H, D, device=device, dtype=dtype)
    k = torch.randn(B, T, H, D, device=device, dtype=dtype)
    v = torch.randn(B, T, H, D, device=device, dtype=dtype)
    beta = torch.randn(B, T, H, device=device, dtype=torch.float32).sigmoid().to(dtype)
    return (q, k, v, beta), {}


register(
    LinearOp(
        name="delta_rule",
        naive=naive_delta_rule,
        chunk=chunk_delta_rule,
        step=step_delta_rule,
        make_inputs=_make_inputs,
        state_shape=lambda B, H, D: (B, H, D, D),
        differentiable_args=("q", "k", "v", "beta"),
    )
)
