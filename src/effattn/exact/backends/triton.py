"""The ``triton`` backend: FlashAttention-2 kernels in Triton over the tiles of a BlockMask.

Forward and backward follow FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with
Better Parallelism and Work Partitioning"): online softmax over key tiles, the log-sum-exp saved, the
backward recomputing ``P`` per tile in a dK/dV pass and a dQ pass (no atomics: deterministic). The
kernels walk only the key tiles listed per query tile: a call's causal / window / document masks
become a BlockMask whose partial tiles evaluate those masks from indices in the kernel; a caller's
BlockMask (every ``effattn.sparse`` selector) runs as given, its ``mask_mod`` (a Python callable)
evaluated once on its partial tiles into bit tiles (:mod:`effattn.exact.triton_kernels.flash`).

What it refuses, with the reason ``explain()`` prints: ``mask_mod`` and ``score_mod`` callables (Triton
cannot compile arbitrary Python; ``block_mask`` with a ``mask_mod`` is taken), head dims above 256,
float64, BlockMask block sizes that are not powers of two >= 16, a gradient for ``alibi_slopes``,
and any tensor it cannot run on: Triton missing, or CPU tensors without ``TRITON_INTERPRET=1``
(Triton's interpreter; tests only). ``auto`` tries it after ``sdpa`` (which keeps the plain dense
calls) and before ``tiled`` when CUDA is present; on a machine without CUDA it has no auto priority
and runs only when asked for by name.

Example::

    >>> import torch
    >>> from effattn.exact.api import attention_call
    >>> from effattn.exact.backends import REGISTRY
    >>> q = torch.randn(1, 8, 2, 16)
    >>> REGISTRY["triton"].why_not(attention_call(q, q, q, mask_mod=lambda b, h, i, j: j <= i))[0]
    'mask_mod not supported (arbitrary Python callables are not compiled into the Triton kernels)'
"""

from __future__ import annotations

import torch

from effattn.exact.backends import REGISTRY, AttentionCall, Backend, Capabilities
from effattn.exact.masks import document_ids_from_cu_seqlens
from effattn.exact.triton_kernels import triton_status

__all__ = ["TritonBackend"]

_NOT_COMPILED = "arbitrary Python callables are not compiled into the Triton kernels"


class TritonBackend(Backend):
    """FlashAttention-2 Triton kernels over BlockMask tiles: causal (bottom-right), window, varlen,
    block_mask, ALiBi, softcap, sinks, return_lse, GQA, head dims <= 256, deterministic backward."""

    name = "triton"
    capabilities = Capabilities(
        summary="Triton FlashAttention-2 kernels over the tiles of a BlockMask (built-in masks in-kernel)",
        # CPU tensors only under TRITON_INTERPRET=1: extra_reasons
        devices=frozenset({"cuda", "cpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        max_head_dim=256,
        masks=frozenset({"none", "causal", "window", "block_mask"}),
        score_mod=False,
        deterministic_on=None,  # dK/dV and dQ in separate passes: no atomic adds
        notes={"mask_mod": _NOT_COMPILED, "score_mod": _NOT_COMPILED},
    )

    @property
    def auto_priority(self) -> int | None:
        """Between ``sdpa`` (10) and ``tiled`` (20) where CUDA is present; never tried by auto otherwise."""
        return 15 if torch.cuda.is_available() else None

    def extra_reasons(self, call: AttentionCall) -> list[str]:
        from effattn.exact.triton_kernels.flash import block_size_ok

        r = []
        ok, why = triton_status(call.q.device)
        if not ok:
            r.append(f"device {call.q.device.type!r}: {why}")
        bm = call.block_mask
        if bm is not None and not (block_size_ok(bm.q_block) and block_size_ok(bm.kv_block)):
            r.append(
                f"block_mask block sizes (q_block={bm.q_block}, kv_block={bm.kv_block}) must be powers of two "
                ">= 16 (the kernels walk each block in power-of-two tiles)"
            )
        if call.alibi_slopes is not None and call.alibi_slopes.requires_grad and torch.is_grad_enabled():
            r.append("alibi_slopes gradient not supported (the kernels treat the slopes as constants)")
        return r

    def run(self, c: AttentionCall):
        from effattn.exact.triton_kernels.flash import MaskSpec, flash_attention, tile_plan

        doc = document_ids_from_cu_seqlens(c.cu_seqlens, c.Tq) if c.cu_seqlens is not None else None
        spec = MaskSpec(causal=c.causal, window=c.window, doc_ids=doc, offset=c.offset)
        plan = tile_plan(c.block_mask, spec, c.B, c.Hq, c.Tq, c.Tk, c.q.device)
        return flash_attention(
            c.q, c.k, c.v, plan, spec, scale=c.scale, alibi_slopes=c.alibi_slopes, softcap=c.softcap, sinks=c.sinks
        )


REGISTRY.register(TritonBackend.name, TritonBackend())
