"""Launches and autograd functions of the linear Triton kernels (see :mod:`effattn.linear._triton`).

Example::

    >>> import torch
    >>> from effattn.linear._triton.backend import triton_linear_status
    >>> triton_linear_status(torch.device("meta"))[0]
    False
"""

from __future__ import annotations

import torch

from effattn.linear._triton.backend import jit, pow2
from effattn.linear._triton.kernels import (
    gated_delta_bwd_kernel,
    gated_delta_fwd_kernel,
    recurrent_kernel,
    scalar_decay_bwd_kernel,
    scalar_decay_fwd_kernel,
)

__all__ = [
    "chunk_gated_delta_rule_triton",
    "chunk_scalar_decay_triton",
    "fused_recurrent_gated_delta_rule_triton",
    "fused_recurrent_scalar_decay_triton",
]


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().contiguous()


class _ScalarDecayChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale, C):
        B, T, H, K = q.shape
        V = v.shape[-1]
        NT = -(-T // C)
        q_, k_, v_, g_ = (_f32(x) for x in (q, k, v, g))
        o = torch.empty(B, T, H, V, device=q.device, dtype=torch.float32)
        sfin = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
        states = torch.empty(B, H, NT, K, V, device=q.device, dtype=torch.float32)
        s0_ = _f32(s0) if s0 is not None else sfin
        jit(scalar_decay_fwd_kernel)[(B * H,)](
            q_,
            k_,
            v_,
            g_,
            s0_,
            o,
            sfin,
            states,
            T,
            H,
            K,
            V,
            NT,
            float(scale),
            HAS_S0=s0 is not None,
            C=C,
            BK=pow2(K),
            BV=pow2(V),
        )
        ctx.save_for_backward(q_, k_, v_, g_, states)
        ctx.meta = (scale, C, s0 is not None)
        return o, sfin

    @staticmethod
    def backward(ctx, do, dsfin):
        q, k, v, g, states = ctx.saved_tensors
        scale, C, has_s0 = ctx.meta
        B, T, H, K = q.shape
        V = v.shape[-1]
        NT = states.shape[2]
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dv, dg = torch.empty_like(v), torch.empty_like(g)
        ds0 = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
        do_ = _f32(do) if do is not None else torch.zeros_like(v)
        dsfin_ = _f32(dsfin) if dsfin is not None else ds0
        jit(scalar_decay_bwd_kernel)[(B * H,)](
            q,
            k,
            v,
            g,
            states,
            do_,
            dsfin_,
            dq,
            dk,
            dv,
            dg,
            ds0,
            T,
            H,
            K,
            V,
            NT,
            float(scale),
            HAS_DSFIN=dsfin is not None,
            C=C,
            BK=pow2(K),
            BV=pow2(V),
        )
        return dq, dk, dv, dg, (ds0 if has_s0 else None), None, None


def chunk_scalar_decay_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton form of :func:`effattn.linear._scalar_decay.chunk_scalar_decay` (same arguments and
    results, float32 out; gates must be finite: the caller clamps them at
    ``_scalar_decay.LOG_DECAY_FLOOR``): ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``,
    chunkwise as in Mamba-2's SSD ("Transformers are SSMs", Dao and Gu, 2024). Differentiable
    in q, k, v, g and ``state`` through Triton backward kernels.

    Example (runs where :func:`triton_linear_status` allows; see ``tests/linear/test_triton_linear.py``)::

        >>> from effattn.linear._triton import triton_linear_status
        >>> q = k = v = torch.randn(1, 5, 1, 4)
        >>> if triton_linear_status(q.device)[0]:
        ...     o, s = chunk_scalar_decay_triton(q, k, v, -torch.rand(1, 5, 1), 0.5, None, 16)
        ...     assert o.shape == (1, 5, 1, 4) and s.shape == (1, 1, 4, 4)
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:
        return q.new_zeros(B, 0, H, V), (q.new_zeros(B, H, K, V) if state is None else state)
    g = torch.zeros(B, T, H, device=q.device, dtype=torch.float32) if g is None else g
    o, s = _ScalarDecayChunk.apply(q, k, v, g, state, scale, pow2(chunk_size))
    return o, s


class _GatedDeltaChunk(torch.autograd.Function):
    """Triton forward and backward kernels of the chunkwise gated delta rule."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, s0, scale, C):
        B, T, H, K = q.shape
        V = v.shape[-1]
        NT = -(-T // C)
        q_, k_, v_, g_, b_ = (_f32(x) for x in (q, k, v, g, beta))
        o = torch.empty(B, T, H, V, device=q.device, dtype=torch.float32)
        sfin = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
        states = torch.empty(B, H, NT, K, V, device=q.device, dtype=torch.float32)
        s0_ = _f32(s0) if s0 is not None else sfin
        jit(gated_delta_fwd_kernel)[(B * H,)](
            q_,
            k_,
            v_,
            g_,
            b_,
            s0_,
            o,
            sfin,
            states,
            T,
            H,
            K,
            V,
            NT,
            float(scale),
            HAS_S0=s0 is not None,
            C=C,
            BK=pow2(K),
            BV=pow2(V),
        )
        ctx.save_for_backward(q_, k_, v_, g_, b_, states)
        ctx.meta = (scale, C, s0 is not None)
        return o, sfin

    @staticmethod
    def backward(ctx, do, dsfin):
        q, k, v, g, beta, states = ctx.saved_tensors
        scale, C, has_s0 = ctx.meta
        B, T, H, K = q.shape
        V = v.shape[-1]
        NT = states.shape[2]
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dv, dg, dbeta = torch.empty_like(v), torch.empty_like(g), torch.empty_like(beta)
        ds0 = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
        do_ = _f32(do) if do is not None else torch.zeros_like(v)
        dsfin_ = _f32(dsfin) if dsfin is not None else ds0
        jit(gated_delta_bwd_kernel)[(B * H,)](
            q,
            k,
            v,
            g,
            beta,
            states,
            do_,
            dsfin_,
            dq,
            dk,
            dv,
            dg,
            dbeta,
            ds0,
            T,
            H,
            K,
            V,
            NT,
            float(scale),
            HAS_DSFIN=dsfin is not None,
            C=C,
            BK=pow2(K),
            BV=pow2(V),
        )
        return dq, dk, dv, dg, dbeta, (ds0 if has_s0 else None), None, None


def chunk_gated_delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    S0: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton form of :func:`effattn.linear._delta.chunk_delta_core` (same arguments and results;
    q and k already normalised; ``g=None`` is the plain delta rule): per chunk the UT transform
    ``(I + tril(diag(beta) (K K^T * Gamma), -1)) [W | U] = [diag(beta e^G) K | diag(beta) V]``,
    ``O = scale (diag(e^G) Q S + tril(Q K^T * Gamma) (U - W S))`` (Yang et al., "Parallelizing Linear
    Transformers with the Delta Rule over Sequence Length", 2024; "Gated Delta Networks", 2024).
    Differentiable in q, k, v, beta, g and ``S0`` through a Triton backward kernel.

    Example (runs where :func:`triton_linear_status` allows)::

        >>> from effattn.linear._triton import triton_linear_status
        >>> q = k = torch.nn.functional.normalize(torch.randn(1, 5, 1, 4), dim=-1)
        >>> if triton_linear_status(q.device)[0]:
        ...     o, s = chunk_gated_delta_rule_triton(q, k, q, torch.rand(1, 5, 1), None, 1.0, None, 16)
        ...     assert o.shape == (1, 5, 1, 4)
    """
    B, T, H, K = q.shape
    gz = torch.zeros(B, T, H, device=q.device, dtype=torch.float32) if g is None else g
    return _GatedDeltaChunk.apply(q, k, v, gz, beta, S0, scale, pow2(chunk_size))


def _recurrent(q, k, v, g, beta, scale, state, delta):
    B, T, H, K = q.shape
    V = v.shape[-1]
    q_, k_, v_ = (_f32(x) for x in (q, k, v))
    g_ = _f32(g) if g is not None else torch.zeros(B, T, H, device=q.device)
    b_ = _f32(beta) if beta is not None else g_
    o = torch.empty(B, T, H, V, device=q.device, dtype=torch.float32)
    sfin = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
    s0_ = _f32(state) if state is not None else sfin
    jit(recurrent_kernel)[(B * H,)](
        q_,
        k_,
        v_,
        g_,
        b_,
        s0_,
        o,
        sfin,
        T,
        H,
        K,
        V,
        float(scale),
        HAS_S0=state is not None,
        DELTA=delta,
        BK=pow2(K, 2),
        BV=pow2(V, 2),
    )
    return o, sfin


def fused_recurrent_scalar_decay_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token Triton kernel of :func:`effattn.linear._scalar_decay.recurrent_scalar_decay`
    (``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``), for decoding: forward only
    (no gradients), float32 out.

    Example::

        >>> from effattn.linear._triton import triton_linear_status
        >>> q = torch.randn(1, 2, 1, 4)
        >>> if triton_linear_status(q.device)[0]:
        ...     assert fused_recurrent_scalar_decay_triton(q, q, q, None, 1.0, None)[0].shape == (1, 2, 1, 4)
    """
    return _recurrent(q, k, v, g, None, scale, state, False)


def fused_recurrent_gated_delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token Triton kernel of the gated delta rule (q, k already normalised; ``g=None``: the
    delta rule): ``S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T``,
    ``o_t = scale S_t^T q_t``. For decoding: forward only (no gradients), float32 out.

    Example::

        >>> from effattn.linear._triton import triton_linear_status
        >>> q = torch.randn(1, 2, 1, 4)
        >>> if triton_linear_status(q.device)[0]:
        ...     o, s = fused_recurrent_gated_delta_rule_triton(q, q, q, torch.rand(1, 2, 1), None, 1.0, None)
        ...     assert s.shape == (1, 1, 4, 4)
    """
    return _recurrent(q, k, v, g, beta, scale, state, True)
