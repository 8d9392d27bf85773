"""Gated DeltaNet: the delta rule with a scalar (per head, per token) decay gate.

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T
        = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

``g [B, T, H]`` is a log-space decay (<= 0, Mamba2-style), ``beta [B, T, H]`` in [0, 1] (or [0, 2]
with ``allow_neg_eigval=True``), keys and queries L2-normalised (``use_qk_l2norm=True``).

Reference:
  Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule", 2024 (ICLR 2025).

The chunkwise form is the UT transform of :mod:`effattn.linear.delta_rule` with the decay folded
in: with ``G`` the cumulated log-decay inside a chunk, every factor it uses is ``exp(G_i - G_j)``
for ``i >= j``, ``exp(G_i)`` or ``exp(G_C - G_j)`` -- exponents <= 0 only, so arbitrarily strong
decay cannot overflow (the upper triangle is masked before ``exp``, not after).

Example::

    >>> import torch
    >>> from effattn.linear import chunk_gated_delta_rule, naive_gated_delta_rule
    >>> q, k, v = (torch.randn(1, 10, 2, 8) for _ in range(3))
    >>> g, beta = -torch.rand(1, 10, 2), torch.rand(1, 10, 2)
    >>> o, s = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True, chunk_size=4)
    >>> o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    >>> bool(torch.allclose(o, o_ref, atol=1e-5))
    True
"""

from __future__ import annotations

import torch

from effattn._checks import check_log_gate, check_scale
from effattn.linear._common import LinearOp, check_chunk_size, check_linear_qkv, check_state, register, run_varlen
from effattn.linear._delta import (
    check_beta,
    check_varlen_state,
    chunk_delta_core,
    log_decay_for_strength,
    prepare_qk,
)
from effattn.linear._scalar_decay import LOG_DECAY_FLOOR
from effattn.linear._triton import (
    chunk_gated_delta_rule_triton,
    fused_recurrent_gated_delta_rule_triton,
    resolve_backend,
)

__all__ = ["naive_gated_delta_rule", "chunk_gated_delta_rule", "step_gated_delta_rule"]


def _check_inputs(q, k, v, g, beta, scale, allow_neg_eigval):
    B, T, H, K, V = check_linear_qkv(q, k, v)
    check_log_gate("g", g, (B, T, H), "[batch, seq, heads]")
    check_beta(beta, (B, T, H), allow_neg_eigval)
    return B, T, H, K, V, check_scale(scale, K)


def naive_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    allow_neg_eigval: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule in float32 (the ground truth).

    ``S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T``, ``o_t = scale * S_t^T q_t``.
    q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g and beta ``[B, T, H]``; state float32 ``[B, H, K, V]``.
    """
    B, T, H, K, V, scale = _check_inputs(q, k, v, g, beta, scale, allow_neg_eigval)
    kw = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, allow_neg_eigval=allow_neg_eigval)
    if cu_seqlens is not None:
        check_varlen_state(cu_seqlens, B, T, initial_state, (H, K, V))
        seq = dict(q=q, k=k, v=v, g=g, beta=beta)
        return run_varlen(naive_gated_delta_rule, cu_seqlens, seq, kw, initial_state, output_final_state)
    S0 = check_state("initial_state", initial_state, (B, H, K, V))

    qf, kf = prepare_qk(q, k, use_qk_l2norm)
    vf, gf, bf = v.float(), g.float(), beta.float()
    S = S0 if S0 is not None else q.new_zeros(B, H, K, V, dtype=torch.float32)
    outs = []
    for t in range(T):
        q_t, k_t, v_t, b_t = qf[:, t], kf[:, t], vf[:, t], bf[:, t, :, None]
        S = S * gf[:, t, :, None, None].exp()  # decay first ...
        v_old = torch.einsum("bhkv,bhk->bhv", S, k_t)  # ... then correct the decayed memory
        S = S + torch.einsum("bhk,bhv->bhkv", k_t, b_t * (v_t - v_old))
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q_t) * scale)
    o = torch.stack(outs, dim=1) if outs else vf.new_zeros(B, 0, H, V)
    return o.to(q.dtype), (S if output_final_state else None)


def step_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    allow_neg_eigval: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoding: advance the carried state ``initial_state [B, H, K, V]`` by the few given tokens
    (the recurrence of :func:`naive_gated_delta_rule`; same arguments and result).

    ``backend="triton"`` runs the recurrent Triton kernel (forward only: refused when a gradient is
    needed); ``"auto"`` uses it on CUDA tensors when no gradient is needed, else PyTorch.
    """
    use = resolve_backend(backend, q, v.shape[-1])
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, beta, initial_state)
    )
    if use == "triton" and needs_grad:
        if backend == "triton":
            raise ValueError("backend='triton' of step_gated_delta_rule is forward only: inputs require grad")
        use = "torch"
    if use == "triton":
        B, T, H, K, V, scale = _check_inputs(q, k, v, g, beta, scale, allow_neg_eigval)
        kw = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, allow_neg_eigval=allow_neg_eigval, backend=backend)
        if cu_seqlens is not None:
            check_varlen_state(cu_seqlens, B, T, initial_state, (H, K, V))
            seq = dict(q=q, k=k, v=v, g=g, beta=beta)
            return run_varlen(step_gated_delta_rule, cu_seqlens, seq, kw, initial_state, output_final_state)
        S0 = check_state("initial_state", initial_state, (B, H, K, V))
        qf, kf = prepare_qk(q, k, use_qk_l2norm)
        o, S = fused_recurrent_gated_delta_rule_triton(qf, kf, v, beta, g, scale, S0)
        return o.to(q.dtype), (S if output_final_state else None)
    return naive_gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm,
        allow_neg_eigval=allow_neg_eigval,
    )


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
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
    """Chunkwise-parallel gated delta rule; same result as :func:`naive_gated_delta_rule`,
    differentiable through autograd, memory linear in T, ``chunk_size`` need not divide T.

    Per chunk, with ``G = cumsum(g)`` inside the chunk and ``Gamma_ij = exp(G_i - G_j)`` (i >= j):
    ``(I + tril(diag(beta) (K K^T * Gamma), -1)) [W | U] = [diag(beta e^G) K | diag(beta) V]``,
    ``Delta = U - W S``, ``O = scale (diag(e^G) Q S + tril(Q K^T * Gamma) Delta)``,
    ``S <- e^{G_C} S + (K e^{G_C - G})^T Delta``.

    ``backend``: ``"torch"``, ``"triton"`` (Triton forward and backward kernels; CPU tensors only under
    ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton on CUDA tensors the kernels cover, else PyTorch; see
    :func:`effattn.linear.choose_linear_backend`).
    """
    B, T, H, K, V, scale = _check_inputs(q, k, v, g, beta, scale, allow_neg_eigval)
    check_chunk_size(chunk_size)
    kw = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, allow_neg_eigval=allow_neg_eigval)
    kw["chunk_size"] = chunk_size
    kw["backend"] = use = resolve_backend(backend, q, V)
    if cu_seqlens is not None:
        check_varlen_state(cu_seqlens, B, T, initial_state, (H, K, V))
        seq = dict(q=q, k=k, v=v, g=g, beta=beta)
        return run_varlen(chunk_gated_delta_rule, cu_seqlens, seq, kw, initial_state, output_final_state)
    S0 = check_state("initial_state", initial_state, (B, H, K, V))
    if T == 0:
        S = S0 if S0 is not None else q.new_zeros(B, H, K, V, dtype=torch.float32)
        return v.new_zeros(B, 0, H, V).to(q.dtype), (S if output_final_state else None)
    qf, kf = prepare_qk(q, k, use_qk_l2norm)
    if use == "triton":
        g_floor = g.float().clamp(min=LOG_DECAY_FLOOR)  # finite: the kernel differences cumulated gates
        o, S = chunk_gated_delta_rule_triton(qf, kf, v, beta, g_floor, scale, S0, chunk_size)
    else:
        o, S = chunk_delta_core(qf, kf, v.float(), beta.float(), g.float(), scale, S0, chunk_size)
    return o.to(q.dtype), (S if output_final_state else None)


def _make_inputs(B, T, H, D, *, device="cpu", dtype=torch.float32, gate_strength=0.5):
    """Random inputs: q, k, v ~ N(0, 1) (normalised inside), beta = sigmoid(N(0, 1)) in (0, 1),
    g <= 0 from :func:`log_decay_for_strength`."""
    q = torch.randn(B, T, H, D, device=device, dtype=dtype)
    k = torch.randn(B, T, H, D, device=device, dtype=dtype)
    v = torch.randn(B, T, H, D, device=device, dtype=dtype)
    g = log_decay_for_strength((B, T, H), gate_strength, device=device, dtype=dtype)
    beta = torch.randn(B, T, H, device=device, dtype=torch.float32).sigmoid().to(dtype)
    return (q, k, v, g, beta), {}


register(
    LinearOp(
        name="gated_delta_rule",
        naive=naive_gated_delta_rule,
        chunk=chunk_gated_delta_rule,
        step=step_gated_delta_rule,
        make_inputs=_make_inputs,
        state_shape=lambda B, H, D: (B, H, D, D),
        differentiable_args=("q", "k", "v", "g", "beta"),
    )
)
