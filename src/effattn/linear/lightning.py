"""Lightning Attention-2: linear attention with a fixed per-head decay, computed blockwise.

Recurrence (state ``S_t`` of shape ``[K, V]`` per head, decay ``lambda_h = exp(-s_h)`` fixed per
head)::

    S_t = lambda_h S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T q_t

Lightning Attention-2 computes it in blocks: inside a block, ordinary causal attention with the
decay mask ``M_ij = lambda^(i - j)`` (``i >= j``), ``O_intra = (Q K^T * M) V``; between blocks, the
kernel trick on the carried ``K^T V`` state, ``O_inter = (Lambda Q) S`` with
``S <- lambda^B S + (lambda^(B - j) K)^T V``. That is exactly the scalar-decay chunkwise form with a
constant gate, so :func:`chunk_lightning_attn` *is* the shared kernel of
:mod:`effattn.linear._scalar_decay` (as RetNet's and Simple GLA's chunk forms are); the module only
adds Lightning's default decays and argument names.

Default decays: ``s_h`` are the ALiBi slopes of the TransNormerLLM / Lightning Attention code,
``2^(-8 (h+1) / H)`` for a power-of-two ``H`` (interleaved for others; :func:`lightning_log_decay`
reads them from :func:`effattn.exact.alibi_slopes`, the one definition of the library).
TransNormerLLM further scales them per layer; pass your own ``log_decay [H]`` (``-s_h <= 0``) for
that. Lightning's kernels apply no ``1/sqrt(K)`` scale; here ``scale`` defaults to ``K ** -0.5`` as
for every op of the family: pass ``scale=1.0`` for the original.

References:
  Qin, Sun, Li, Shen, Sun, Zhong, "Lightning Attention-2: A Free Lunch for Handling Unlimited
  Sequence Lengths in Large Language Models", 2024.
  Qin et al., "TransNormerLLM: A Faster and Better Large Language Model with Improved
  TransNormer", 2023 (the decay schedule).

Example::

    >>> import torch
    >>> from effattn.linear import chunk_lightning_attn, naive_lightning_attn
    >>> q, k, v = (torch.randn(1, 10, 2, 8) for _ in range(3))
    >>> o, s = chunk_lightning_attn(q, k, v, output_final_state=True, chunk_size=4)
    >>> o_ref, s_ref = naive_lightning_attn(q, k, v, output_final_state=True)
    >>> bool(torch.allclose(o, o_ref, atol=1e-5)), tuple(s.shape)
    (True, (1, 2, 8, 8))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effattn._checks import check_log_gate, check_positive_int
from effattn.exact import alibi_slopes
from effattn.linear._common import LinearOp, check_linear_qkv, register
from effattn.linear._scalar_decay import decay_magnitude, scalar_decay_op

__all__ = ["lightning_log_decay", "naive_lightning_attn", "chunk_lightning_attn", "step_lightning_attn"]


def lightning_log_decay(num_heads: int) -> torch.Tensor:
    """Lightning Attention's default per-head log-decay ``-s_h`` with ``s_h`` the ALiBi slopes
    (``2^(-8 (h+1) / H)`` for a power-of-two ``H``), float32 ``[num_heads]``.

    >>> lightning_log_decay(4)
    tensor([-0.2500, -0.0625, -0.0156, -0.0039])
    """
    check_positive_int("num_heads", num_heads)
    return -alibi_slopes(num_heads)


def _lightning(
    form, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, chunk_size=64, backend="auto"
):
    B, T, H, _, _ = check_linear_qkv(q, k, v)
    if log_decay is None:
        log_decay = lightning_log_decay(H).to(q.device)
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


def naive_lightning_attn(
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
    """Reference: the recurrence token by token in float32.

    ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``log_decay [H]`` (``log lambda = -s``, <= 0;
    default :func:`lightning_log_decay`); ``scale`` defaults to ``K ** -0.5``; ``initial_state`` and
    the final state are float32 ``[B, H, K, V]`` (``[N, H, K, V]`` with ``N`` packed sequences given
    by ``cu_seqlens``). Returns ``(o [B, T, H, V] in q's dtype, final_state or None)``.
    """
    return _lightning("naive", q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


def chunk_lightning_attn(
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
    """Blockwise Lightning Attention-2 with blocks of ``chunk_size`` tokens (the shared
    scalar-decay chunk kernel). Same arguments and result as :func:`naive_lightning_attn`;
    differentiable by autograd, memory linear in T.

    ``backend``: ``"torch"`` (this PyTorch chunk form), ``"triton"`` (the Triton chunk kernels, forward and
    backward; CPU tensors only under ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton on CUDA tensors the kernels
    cover, else PyTorch; see :func:`effattn.linear.choose_linear_backend`)."""
    return _lightning(
        "chunk", q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, chunk_size, backend
    )


def step_lightning_attn(
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
    Same arguments and result as :func:`naive_lightning_attn`."""
    return _lightning("naive", q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


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
        name="lightning_attn",
        naive=naive_lightning_attn,
        chunk=chunk_lightning_attn,
        step=step_lightning_attn,
        make_inputs=_make_inputs,
        state_shape=lambda B, H, D: (B, H, D, D),
        differentiable_args=("q", "k", "v", "log_decay"),
    )
)
