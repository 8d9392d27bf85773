"""Simple GLA / Mamba-2 SSD: linear attention with a data-dependent scalar decay per head and step.

Recurrence (state ``S_t`` of shape ``[K, V]`` per head, log-decay ``g_t <= 0`` a scalar)::

    S_t = exp(g_t) S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T q_t

This is the state-space duality (SSD) layer of Mamba-2 with ``(C, B, x, A dt)`` renamed
``(q, k, v, g)`` (Mamba-2's ``dt`` scaling of the input folded into ``k`` or ``v``), and GLA with
its gate tied across the key dimension ("simple GLA", as fla calls it).

References:
  Dao, Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured
  State Space Duality", 2024 (Mamba-2; the chunkwise SSD algorithm).
  Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention Transformers with Hardware-Efficient
  Training", 2024 (GLA; the scalar-gate special case).

The chunkwise form is the shared scalar-decay kernel of :mod:`effattn.linear._scalar_decay`
(stable for any decay strength: intra-chunk decays are masked segment sums, never ``exp(-G)``).

Example::

    >>> import torch
    >>> from effattn.linear import chunk_simple_gla, naive_simple_gla
    >>> q, k, v = (torch.randn(1, 10, 2, 8) for _ in range(3))
    >>> g = -torch.rand(1, 10, 2)  # log-decays <= 0
    >>> o, s = chunk_simple_gla(q, k, v, g, output_final_state=True, chunk_size=4)
    >>> o_ref, s_ref = naive_simple_gla(q, k, v, g, output_final_state=True)
    >>> bool(torch.allclose(o, o_ref, atol=1e-5)), tuple(s.shape)
    (True, (1, 2, 8, 8))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effattn._checks import check_log_gate
from effattn.linear._common import LinearOp, check_linear_qkv, register
from effattn.linear._scalar_decay import decay_magnitude, scalar_decay_op

__all__ = ["naive_simple_gla", "chunk_simple_gla", "step_simple_gla"]


def _simple_gla(form, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size=64, backend="auto"):
    B, T, H, _, _ = check_linear_qkv(q, k, v)
    check_log_gate("g", g, (B, T, H), "[batch, seq, heads]")
    return scalar_decay_op(
        form,
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
        backend=backend,
    )


def naive_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference: the recurrence token by token in float32.

    ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g [B, T, H]`` (log-decay, <= 0); ``scale``
    defaults to ``K ** -0.5``; ``initial_state`` and the returned final state are float32
    ``[B, H, K, V]`` (``[N, H, K, V]`` for ``N`` packed sequences given by ``cu_seqlens``).
    Returns ``(o [B, T, H, V] in q's dtype, final_state or None)``.
    """
    return _simple_gla("naive", q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise-parallel form (Mamba-2 SSD): masked decayed attention inside chunks of
    ``chunk_size`` tokens, state passing between them. Same arguments and result as
    :func:`naive_simple_gla`; differentiable by autograd, memory linear in T.

    ``backend``: ``"torch"`` (this PyTorch chunk form), ``"triton"`` (the Triton chunk kernels, forward and
    backward; CPU tensors only under ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton on CUDA tensors the kernels
    cover, else PyTorch; see :func:`effattn.linear.choose_linear_backend`)."""
    return _simple_gla("chunk", q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size, backend)


def step_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoding: the recurrence on a few new tokens against the carried ``initial_state``
    (constant memory per token). Same arguments and result as :func:`naive_simple_gla`."""
    return _simple_gla("naive", q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def _make_inputs(B, T, H, D, *, device="cpu", dtype=torch.float32, gate_strength=0.5):
    """q ~ N(0, 1), k unit-norm, v ~ N(0, 1); ``g = -m * u`` with ``u ~ U(0.1, 1.9)`` and ``m`` from
    1e-3 (``gate_strength=0``) to 20 (``gate_strength=1``) per step."""
    q = torch.randn(B, T, H, D, device=device)
    k = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1)
    v = torch.randn(B, T, H, D, device=device)
    g = -decay_magnitude(gate_strength) * (0.1 + 1.8 * torch.rand(B, T, H, device=device))
    return tuple(x.to(dtype) for x in (q, k, v, g)), {}


register(
    LinearOp(
        name="simple_gla",
        naive=naive_simple_gla,
        chunk=chunk_simple_gla,
        step=step_simple_gla,
        make_inputs=_make_inputs,
        state_shape=lambda B, H, D: (B, H, D, D),
        differentiable_args=("q", "k", "v", "g"),
    )
)
