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

from effattn._checks import check_scale
from effattn.linear._common import LinearOp, check_chunk_size, check_linear_qkv, check_state, register, run_varlen
from effattn.linear._delta import check_beta, check_varlen_state, chunk_delta_core, prepare_qk
from effattn.linear._triton import chunk_gated_delta_rule_triton, resolve_backend

__all__ = ["naive_delta_rule", "chunk_delta_rule", "step_delta_rule"]

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
    check_beta(beta, (B, T, H), allow_neg_eigval)
    scale = check_scale(scale, K)
    kw = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, allow_neg_eigval=allow_neg_eigval)
    if cu_seqlens is not None:
        check_varlen_state(cu_seqlens, B, T, initial_state, (H, K, V))
        seq = dict(q=q, k=k, v=v, beta=beta)
        return run_varlen(naive_delta_rule, cu_seqlens, seq, kw, initial_state, output_final_state)
    S0 = check_state("initial_state", initial_state, (B, H, K, V))

    qf, kf = prepare_qk(q, k, use_qk_l2norm)
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
# chunkwise form (the kernel, shared with gated_delta_rule.py, is effattn.linear._delta.chunk_delta_core)
# ----------------------------------------------------------------------------------------------


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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise-parallel delta rule (WY / UT transform, Yang et al. 2024); same result as
    :func:`naive_delta_rule`, differentiable through autograd, memory linear in T.

    Within a chunk: ``U = (I + tril(diag(beta) K K^T, -1))^{-1} diag(beta) V``, ``W`` likewise with K,
    ``Delta = U - W S``, ``O = scale (Q S + tril(Q K^T) Delta)``, ``S <- S + K^T Delta``.
    ``chunk_size`` need not divide T.

    ``backend``: ``"torch"`` (this PyTorch form), ``"triton"`` (the gated delta rule's Triton chunk kernels
    with no gate, forward and backward; CPU tensors only under ``TRITON_INTERPRET=1``) or ``"auto"``
    (Triton on CUDA tensors the kernels cover, else PyTorch; see :func:`effattn.linear.choose_linear_backend`).
    """
    B, T, H, K, V = check_linear_qkv(q, k, v)
    check_beta(beta, (B, T, H), allow_neg_eigval)
    scale = check_scale(scale, K)
    check_chunk_size(chunk_size)
    kw = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, allow_neg_eigval=allow_neg_eigval)
    kw["chunk_size"] = chunk_size
    kw["backend"] = use = resolve_backend(backend, q, V)
    if cu_seqlens is not None:
        check_varlen_state(cu_seqlens, B, T, initial_state, (H, K, V))
        seq = dict(q=q, k=k, v=v, beta=beta)
        return run_varlen(chunk_delta_rule, cu_seqlens, seq, kw, initial_state, output_final_state)
    S0 = check_state("initial_state", initial_state, (B, H, K, V))
    if T == 0:
        S = S0 if S0 is not None else q.new_zeros(B, H, K, V, dtype=torch.float32)
        return v.new_zeros(B, 0, H, V).to(q.dtype), (S if output_final_state else None)
    qf, kf = prepare_qk(q, k, use_qk_l2norm)
    if use == "triton":
        o, S = chunk_gated_delta_rule_triton(qf, kf, v, beta, None, scale, S0, chunk_size)
    else:
        o, S = chunk_delta_core(qf, kf, v.float(), beta.float(), None, scale, S0, chunk_size)
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
