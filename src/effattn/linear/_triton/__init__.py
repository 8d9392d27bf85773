"""Triton kernels for the chunked linear ops: the scalar-decay family and the gated delta rule.

Two chunkwise kernels and two recurrent (one-token) kernels, each computing what the PyTorch form of
:mod:`effattn.linear._scalar_decay` / :mod:`effattn.linear.gated_delta_rule` computes:

* scalar decay (simple GLA, RetNet, Lightning Attention-2, Mamba-2 SSD, plain linear attention with
  ``g = 0``): ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``. Forward and
  backward are Triton kernels (fla's ``chunk_simple_gla`` structure: one program per batch row and
  head walks the chunks, the ``[K, V]`` state stays on chip; inside a chunk the causal part is a
  masked ``C x C`` matmul with ``exp(G_i - G_j)``). The forward keeps the state entering each chunk
  for the backward, which walks the chunks in reverse carrying ``dS``.
* gated delta rule (Yang, Kautz, Hatamizadeh, "Gated Delta Networks", 2024):
  ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``. The forward is a Triton
  kernel (the UT transform per chunk: ``(I + tril(diag(beta) K K^T * Gamma, -1))^{-1}`` by forward
  substitution on chip, then ``W``, ``U``, ``Delta = U - W S``); the forward keeps the entering
  states, the backward kernel walks the chunks in reverse, recomputes ``(I + A)^{-1}``, ``W``, ``U``
  per chunk and carries ``dS`` (through ``T = (I + A)^{-1}`` the gradient is ``dA = -T^T dT T^T``).
* recurrent kernels (``fused_recurrent_*``): the same recurrences token by token, for decoding
  (forward only; not differentiable).

Numerics: every kernel computes in float32 (inputs of other dtypes are cast on the host; float64 is
not supported), matmuls in IEEE float32 (no TF32). The decays ``exp(G_i - G_j)`` are taken from
segment sums ``g_{j+1} + ... + g_i`` (a masked cumsum on chip, as the PyTorch gated delta rule does),
never as a difference of two large cumulated sums, so a hard reset (a gate of ``-inf``, clamped)
does not cost the following decays their accuracy; every exponent is <= 0. Gates are clamped at
``LOG_DECAY_FLOOR`` on the host by the callers (an infinite gate would make the gradients NaN).
The chunk length of the kernels is ``max(16, next_power_of_2(chunk_size))`` (``tl.dot`` needs tiles
of at least 16); the chunkwise result does not depend on the chunk length beyond rounding.

Triton is optional and imported lazily: Triton fixes its mode (GPU compiler or CPU interpreter,
``TRITON_INTERPRET=1``) at its first import, so kernel bodies are plain functions decorated by
:func:`jit` when first launched. CPU tensors run only under ``TRITON_INTERPRET=1`` (slow: tests);
:func:`triton_linear_status` says why the kernels cannot run.

Selection (``backend=`` of every chunk form that has these kernels: ``chunk_simple_gla``, ``chunk_retention``,
``chunk_lightning_attn``, ``chunk_linear_attn``, ``chunk_delta_rule``, ``chunk_gated_delta_rule``):
:func:`choose_backend` -- ``"auto"`` runs them on CUDA tensors when they cover the call (float16/bfloat16/
float32, state dims <= :data:`AUTO_MAX_DIM`), the PyTorch chunk form otherwise; ``"triton"`` forces them.

GPU speed is unmeasured: the kernels were written and tested in Triton's interpreter only (no GPU was
available to the work); ``scripts/gpu_check.sh`` is the prepared GPU run.

Modules: :mod:`.backend` (lazy triton, interpreter checks, ``backend=`` selection),
:mod:`.kernels` (the kernel bodies), :mod:`.chunk` (launches and autograd functions).

Example::

    >>> import torch
    >>> ok, why = triton_linear_status(torch.device("cpu"))
    >>> ok or "TRITON_INTERPRET" in why or "not installed" in why
    True
"""

from effattn.linear._triton.backend import (
    AUTO_MAX_DIM,
    BACKENDS,
    choose_backend,
    resolve_backend,
    triton_linear_status,
)
from effattn.linear._triton.chunk import (
    chunk_gated_delta_rule_triton,
    chunk_scalar_decay_triton,
    fused_recurrent_gated_delta_rule_triton,
    fused_recurrent_scalar_decay_triton,
)

__all__ = [
    "AUTO_MAX_DIM",
    "BACKENDS",
    "choose_backend",
    "chunk_gated_delta_rule_triton",
    "chunk_scalar_decay_triton",
    "fused_recurrent_gated_delta_rule_triton",
    "fused_recurrent_scalar_decay_triton",
    "resolve_backend",
    "triton_linear_status",
]
