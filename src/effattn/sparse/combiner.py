"""Combiner-style factorized full attention (Ren et al. 2021, "Combiner: Full Attention Transformer
with Sparse Computation Cost").

The sequence is cut into blocks of ``block`` tokens. A query attends *directly* to the keys of its
own block and, through one summary per block, to every other block (mean-pooled keys and values,
the uniform local factorization of Combiner-Fixed), all in one softmax:

    k̄_j = mean(k in block j),  v̄_j = mean(v in block j)
    o_t = softmax([q_t K_own^T, q_t k̄_J^T] / sqrt(d)) [V_own; v̄_J]

with ``J`` = every other block (non-causal) or the blocks before the query's block (causal; those
are complete, and the own block is attended with the causal mask). Every position is reachable:
directly or through its block's summary. Implementation: the ``n`` summaries are appended to K/V
(``T + n`` keys) and one analytic :class:`~effattn.exact.block_mask.BlockMask` over the concatenation
(own-block tiles + summary tiles) runs on the tiled engine: ``O(T (block + T / block))`` work.

``block = 1`` makes every summary a token and Combiner equals full (causal) attention; so does a
single block (``block >= T``). Summary keys are not original keys, so the registry's ``dense_mask``
is ``None``; :func:`combiner_reference` states the formula densely and the tests compare with it.
"""

from __future__ import annotations

import torch

from effattn._checks import check_qkv
from effattn.exact import MaskMod, attention, create_block_mask
from effattn.sparse._blockwise import block_pool, check_self_attention, concat_mask, default_block, num_blocks
from effattn.sparse._common import SparseMethod, check_block_size, register


def _own_block_mask(block: int, causal: bool) -> MaskMod:
    def fn(b, h, q, kv):
        same = q // block == kv // block
        return same & (kv <= q) if causal else same

    def blocks(ql, qh, kl, kh):
        bq0, bq1, bk0, bk1 = ql // block, qh // block, kl // block, kh // block
        any_ = (bq0 <= bk1) & (bk0 <= bq1)
        all_ = (bq0 == bq1) & (bk0 == bk1) & (bq0 == bk0)
        if causal:
            any_, all_ = any_ & (kl <= qh), all_ & (kh <= ql)
        return any_, all_

    return MaskMod(fn, blocks, f"own_block({block}, causal={causal})")


def _summary_mask(block: int, causal: bool) -> MaskMod:
    """Summary ``s`` (of block ``s``) is visible to query ``q`` iff ``s != q // block`` (causal: ``s < q // block``)."""

    def fn(b, h, q, s):
        return s < q // block if causal else s != q // block

    def blocks(ql, qh, sl, sh):
        bq0, bq1 = ql // block, qh // block
        if causal:
            return sl < bq1, sh < bq0
        return ~((sl == sh) & (bq0 == bq1) & (sl == bq0)), (sh < bq0) | (sl > bq1)

    return MaskMod(fn, blocks, f"summaries({block}, causal={causal})")


def combiner_mask(T: int, *, block: int, causal: bool) -> MaskMod:
    """The Combiner rule over ``[T keys | ceil(T / block) summaries]``."""
    return concat_mask(T, _own_block_mask(block, causal), _summary_mask(block, causal))


def combiner_keys(k: torch.Tensor, v: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[k | k̄], [v | v̄]``: the block summaries appended to the keys and values (differentiable)."""
    return torch.cat([k, block_pool(k, block, "mean")], 1), torch.cat([v, block_pool(v, block, "mean")], 1)


def _check(q, k, v, block, causal):
    check_qkv(q, k, v)
    T = check_self_attention(q, k, "combiner_attention")
    check_block_size("block", block, T)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    return T


def combiner_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int = 64, causal: bool = False
) -> torch.Tensor:
    """Direct attention within the own block plus attention to the mean summaries of the other
    (causal: earlier) blocks, in one softmax.

    Example::

        >>> q = k = v = torch.randn(1, 100, 2, 16)
        >>> combiner_attention(q, k, v, block=10, causal=True).shape
        torch.Size([1, 100, 2, 16])
    """
    T = _check(q, k, v, block, causal)
    kc, vc = combiner_keys(k, v, block)
    bm = create_block_mask(combiner_mask(T, block=block, causal=causal), 1, 1, T, kc.shape[1], device=q.device)
    return attention(q, kc, vc, block_mask=bm, backend="tiled")


def combiner_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int = 64, causal: bool = False
) -> torch.Tensor:
    """The formula densely (small sizes): summaries by an explicit loop over blocks, the
    ``[T + n]``-key mask as a dense table, the reference backend. Ground truth for the tests."""
    T = _check(q, k, v, block, causal)
    n = num_blocks(T, block)
    ks = torch.stack([k[:, j * block : (j + 1) * block].mean(1) for j in range(n)], 1)
    vs = torch.stack([v[:, j * block : (j + 1) * block].mean(1) for j in range(n)], 1)
    t = torch.arange(T, device=q.device)
    own = t.view(-1, 1) // block == t.view(1, -1) // block
    summ = torch.arange(n, device=q.device).view(1, -1) != (t // block).view(-1, 1)
    if causal:
        own = own & (t.view(1, -1) <= t.view(-1, 1))
        summ = torch.arange(n, device=q.device).view(1, -1) < (t // block).view(-1, 1)
    allowed = torch.cat([own, summ], 1)
    return attention(
        q, torch.cat([k, ks], 1), torch.cat([v, vs], 1), mask_mod=lambda b, h, i, j: allowed[i, j], backend="reference"
    )


register(
    SparseMethod(
        name="combiner",
        attend=combiner_attention,
        dense_mask=lambda q, k, *, causal=False, **params: None,
        make_params=lambda T: {"block": default_block(T)},
        content_based=False,
    )
)
