"""The ``tiled`` backend: the pure-PyTorch online-softmax engine of :mod:`effattn.exact.tiled`.

It computes only the tiles a :class:`~effattn.exact.BlockMask` lists (built from the call's masks when
none is given), evaluating mask and score mods tile by tile, so it takes every mask kind and feature of
``attention()`` in ``O(T)`` extra memory, forward and backward. ``auto`` uses it for every call SDPA
cannot take.

Example::

    >>> import torch
    >>> from effattn.exact.api import attention_call
    >>> from effattn.exact.backends import REGISTRY
    >>> q = torch.randn(1, 8, 2, 16)
    >>> REGISTRY["tiled"].why_not(attention_call(q, q, q, causal=True, window=4, return_lse=True))
    []
"""

from __future__ import annotations

from effattn.exact.backends import REGISTRY, AttentionCall, Backend, Capabilities
from effattn.exact.block_mask import create_block_mask
from effattn.exact.tiled import tiled_attention

__all__ = ["TiledBackend"]


class TiledBackend(Backend):
    """Pure-PyTorch online-softmax tiles over a BlockMask (any mask/score mod), O(T) memory."""

    name = "tiled"
    auto_priority = 20
    capabilities = Capabilities(
        summary="pure-PyTorch online softmax over the tiles of a BlockMask (FlashAttention-2 schedule)",
        # its backward accumulates with index_add_, which CUDA implements with atomic adds
        deterministic_on=frozenset({"cpu"}),
    )

    def run(self, c: AttentionCall):
        bm = c.block_mask
        if bm is None:
            bm = create_block_mask(c.mask_mod, c.B, c.Hq, c.Tq, c.Tk, device=c.q.device)
        return tiled_attention(
            c.q, c.k, c.v, bm, scale=c.scale, score_mod=c.score_mod, sinks=c.sinks, mod_tensors=c.mod_tensors
        )


REGISTRY.register(TiledBackend.name, TiledBackend())
