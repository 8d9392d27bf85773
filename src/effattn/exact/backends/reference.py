"""The ``reference`` backend: the materialized formula of :mod:`effattn.exact.reference` (in float32, or
float64 for float64 input).

The ground truth of every test, never chosen by ``auto``. It takes every mask kind and feature but
materializes ``B * H_q * T_q * T_k`` scores, so it declares a bound (``MAX_DENSE_ELEMENTS``) and refuses
larger calls, naming the tiled backend.

Example::

    >>> import torch
    >>> from effattn.exact.api import attention_call
    >>> from effattn.exact.backends import REGISTRY
    >>> q = torch.randn(1, 12000, 1, 1)
    >>> REGISTRY["reference"].why_not(attention_call(q, q, q))
    ["would materialize 144000000 scores (> 134217728); use backend='tiled' (O(T) memory)"]
"""

from __future__ import annotations

from effattn.exact.backends import REGISTRY, AttentionCall, Backend, Capabilities
from effattn.exact.block_mask import BlockMask
from effattn.exact.reference import MAX_DENSE_ELEMENTS, reference_attention

__all__ = ["ReferenceBackend"]


class ReferenceBackend(Backend):
    """The materialized formula (float32; float64 for float64 input), the ground truth; refuses sizes above a bound."""

    name = "reference"
    auto_priority = None  # ground truth for tests: runs only when asked for
    capabilities = Capabilities(
        summary="the materialized formula in float32, or float64 for float64 input (ground truth for tests)",
        max_scores=MAX_DENSE_ELEMENTS,
    )

    def run(self, c: AttentionCall):
        mask = c.mask_mod
        if c.block_mask is not None:
            mask = _dense_block_mask_mod(c.block_mask)
        return reference_attention(c.q, c.k, c.v, scale=c.scale, mask_mod=mask, score_mod=c.score_mod, sinks=c.sinks)


def _dense_block_mask_mod(bm: BlockMask):
    dense = bm.to_dense()
    return lambda b, h, q, kv: dense[b % dense.shape[0], h % dense.shape[1], q, kv]


REGISTRY.register(ReferenceBackend.name, ReferenceBackend())
