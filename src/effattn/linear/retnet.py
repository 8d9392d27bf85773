"""RetNet retention: linear attention with a fixed exponential decay per head.

Recurrence (state ``S_t`` of shape ``[K, V]`` per head, decay ``gamma_h`` in (0, 1] fixed per head)::

    S_t = gamma_h S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T q_t

equivalently the parallel form ``O = (Q K^T * D) V * scale`` with ``D_nm = gamma^(n - m)`` for
``n >= m`` and 0 otherwise. The default decays are the paper's multi-scale ones,
``gamma_h = 1 - 2^(-5 - h)`` for head ``h = 0 .. H-1`` (:func:`retention_log_decay`); a per-head
log-decay ``log_decay [H]`` (``log gamma_h <= 0``) may be given instead. xPos rotation of q and k
and the group norm / swish gate of the full RetNet layer are outside this op.

Reference:
  Sun, Dong, Huang, Ma, Xia, Xue, Wang, Wei, "Retentive Network: A Successor to Transformer for
  Large Language Models", 2023.

The chunkwise form (the paper's "chunkwise recurrent representation") is the shared scalar-decay
kernel of :mod:`effattn.linear._scalar_decay` with ``g_t = log gamma_h`` at every step.

Example::

    >>> import torch
    >>> from effattn.linear import chunk_retention, naive_retention
    >>> q, k, v = (torch.randn(1, 10, 2, 8) for _ in range(3))
    >>> o, s = chunk_retention(q, k, v, output_final_state=True, chunk_size=4)
    >>> o_ref, s_ref = naive_retention(q, k, v, output_final_state=True)
    >>> bool(torch.allclose(o, o_ref, atol=1e-5)), tuple(s.shape)
    (True, (1, 2, 8, 8))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effattn._checks import check_log_gate, check_positive_int
from effattn.linear._common import LinearOp, check_linear_qkv, register
from effattn.linear._scalar_decay import decay_magnitude, scalar_decay_op

__all__ = ["retention_log_decay", "naive_retention", "chunk_retention", "step_retention"]


def retention_log_decay(num_heads: int) -> torch.Tensor:
    """RetNet's default per-head log-decay ``log(1 - 2^(-5 - h))``, ``h = 0 .. num_heads-1``
    (float32 ``[num_heads]``): effective memories of 32 to ``2^(4 + num_heads)`` tokens.

    >>> retention_log_decay(2).exp()  # gamma = 1 - 1/32, 1 - 1/64
    tensor([0.9688, 0.9844])
    """
    check_positive_int("num_heads", num_heads)
    h = torch.arange(num_heads, dtype=torch.float64)
    return torch.log1p(-(2.0 ** (-5.0 - h))).float()


def _retention(
    form, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, chunk_size=64, backend="auto"
):
    B, T, H, _, _ = check_linear_qkv(q, k, v)
    if log_decay is None:
        log_decay = retention_log_decay(H).to(q.device)
    check_log_gate("log_decay", log_decay, (H,), "[heads]")
    g = log_decay.view(1, 1, H).expand(B, T, H)
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


def naive_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference: the recurrent form token by token in float32.

    ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``log_decay [H]`` (``log gamma``, <= 0; default
    :func:`retention_log_decay`); ``scale`` defaults to ``K ** -0.5``; ``initial_state`` and the
    final state are float32 ``[B, H, K, V]`` (``[N, H, K, V]`` with ``N`` packed sequences given by
    ``cu_seqlens``). Returns ``(o [B, T, H, V] in q's dtype, final_state or None)``.
    """
    return _retention("naive", q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


def chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise recurrent retention: parallel decayed attention inside chunks of ``chunk_size``
    tokens, recurrent state passing between them. Same arguments and result as
    :func:`naive_retention`; differentiable by autograd, memory linear in T.

    ``backend``: ``"torch"`` (this PyTorch chunk form), ``"triton"`` (the Triton chunk kernels, forward and
    backward; CPU tensors only under ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton on CUDA tensors the kernels
    cover, else PyTorch; see :func:`effattn.linear.choose_linear_backend`)."""
    return _retention(
        "chunk", q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, chunk_size, backend
    )


def step_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoding: the recurrence on a few new tokens against the carried ``initial_state``.
    Same arguments and result as :func:`naive_retention`."""
    return _retention("naive", q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


def _make_inputs(B, T, H, D, *, device="cpu", dtype=torch.float32, gate_strength=0.5):
    """q ~ N(0, 1), k unit-norm, v ~ N(0, 1); per-head ``log_decay`` spread over a factor 3 around
    ``-m``, ``m`` from 1e-3 (``gate_strength=0``) to 20 (``gate_strength=1``) per step."""
    q = torch.randn(B, T, H, D, device=device)
    k = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1)
    v = torch.randn(B, T, H, D, device=device)
    log_decay = -decay_magnitude(gate_strength) * torch.linspace(1.5, 0.5, H, device=device)
    return tuple(x.to(dtype) for x in (q, k, v, log_decay)), {}


register(
    LinearOp(
        name="retnet",
        naive=naive_retention,
        chunk=chunk_retention,
        step=step_retention,
        make_inputs=_make_inputs,
        state_shape=lambda B, H, D: (B, H, D, D),
        differentiable_args=("q", "k", "v", "log_decay"),
    )
)
