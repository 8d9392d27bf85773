"""BiFormer bi-level routing attention (Zhu et al. 2023, "BiFormer: Vision Transformer with Bi-Level
Routing Attention").

Tokens are partitioned into ``n`` regions; a region-level affinity graph is pruned to the ``top_k``
regions of every region, then tokens attend token-to-token to the gathered regions:

    Q^r, K^r = mean of q, k over each region          (all heads together: one routing per region)
    A^r = Q^r (K^r)^T  [n, n] ;  I^r_i = topk_j A^r_ij  (the region itself always included)
    o_t = softmax_{keys in regions I^r_{region(t)}} (q_t k^T / sqrt(d)) V

Regions are blocks of the :class:`~effattn.exact.block_mask.BlockMask` (``H_m = 1``: the routing is
shared by the heads, as in the paper, whose routing uses the full-width q/k); with GQA the affinity
sums every query head against its key head. Regions are 1-D runs of ``region`` tokens, or, with
``grid=(rows, cols)`` (row-major tokens), ``region x region`` windows of the image: tokens are
permuted so each window is a contiguous run of ``region**2`` tokens, attended there, and permuted back.

Non-causal as in the paper. The causal variant (1-D only) routes among past regions: candidates
are the regions before the query's region, the own region is always kept with the causal mask, and
the pooled query of a region is the mean of the ``region`` queries ending at its first token (so a
token's routing never reads a later query). The routing is computed under ``torch.no_grad``.
"""

from __future__ import annotations

import torch

from effattn._checks import check_qkv
from effattn.exact import BlockMask, attention
from effattn.sparse._blockwise import (
    NEG_INF,
    block_mask_from_selection,
    block_pool,
    causal_query_pool,
    check_grid,
    check_self_attention,
    default_block,
    num_blocks,
    region_permutation,
)
from effattn.sparse._common import SparseMethod, check_block_size, check_top_k, register


def _layout(q, k, region, grid, causal):
    """Validate and return ``(T, block, perm, inv)``; ``perm`` is None for 1-D regions."""
    check_qkv(q, k, k)
    T = check_self_attention(q, k, "biformer_attention")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if grid is None:
        return T, check_block_size("region", region, T), None, None
    if causal:
        raise ValueError("causal BiFormer routing is defined for 1-D regions only: pass grid=None")
    check_block_size("region", region, T)
    check_grid(grid, T, region)
    perm, inv = region_permutation(tuple(grid), region, q.device)
    return T, region * region, perm, inv


def _route(q: torch.Tensor, k: torch.Tensor, T: int, block: int, top_k: int, causal: bool) -> BlockMask:
    """Region routing on tokens already in region order (regions = blocks of ``block`` tokens)."""
    n = num_blocks(T, block)
    check_top_k("top_k", top_k, n)
    with torch.no_grad():
        qf, kf = q.detach().float(), k.detach().float()
        p = causal_query_pool(qf, block) if causal else block_pool(qf, block, "mean")  # [B, n, Hq, D]
        r = block_pool(kf, block, "mean").repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        aff = torch.einsum("bihd,bjhd->bij", p, r)  # [B, n, n]
        i = torch.arange(n, device=q.device).view(n, 1)
        j = torch.arange(n, device=q.device).view(1, n)
        candidates = (j < i) if causal else (j != i)
        if top_k == 1:  # only the region itself
            idx = torch.zeros(q.shape[0], 1, n, 0, dtype=torch.long, device=q.device)
            return block_mask_from_selection(idx, idx.bool(), T, block, causal)
        val, idx = aff.masked_fill(~candidates, NEG_INF).topk(top_k - 1, dim=-1)
        return block_mask_from_selection(idx[:, None], (val > NEG_INF)[:, None], T, block, causal)


def biformer_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    region: int,
    top_k: int,
    grid: tuple[int, int] | None = None,
    causal: bool = False,
) -> BlockMask:
    """The routing as a :class:`BlockMask` ``[B, 1, n, top_k]`` over tokens in *region order*
    (the original order for 1-D regions; ``x[:, perm]`` of :func:`region_permutation` with ``grid``).

    ``top_k`` counts the region itself and may be at most the number of regions ``n``.
    """
    T, block, perm, _ = _layout(q, k, region, grid, causal)
    if perm is not None:
        q, k = q[:, perm], k[:, perm]
    return _route(q, k, T, block, top_k, causal)


def biformer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    region: int,
    top_k: int,
    grid: tuple[int, int] | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Bi-level routing attention: each region attends to its ``top_k`` most affine regions
    (itself included). ``region``: tokens per region (1-D) or the window side with ``grid``.

    Example::

        >>> q = k = v = torch.randn(1, 16 * 16, 2, 16)
        >>> biformer_attention(q, k, v, region=4, top_k=4, grid=(16, 16)).shape
        torch.Size([1, 256, 2, 16])
    """
    check_qkv(q, k, v)
    T, block, perm, inv = _layout(q, k, region, grid, causal)
    if perm is not None:
        q, k, v = q[:, perm], k[:, perm], v[:, perm]
    bm = _route(q, k, T, block, top_k, causal)
    o = attention(q, k, v, block_mask=bm, backend="tiled")
    return o if inv is None else o[:, inv]


def _dense(q, k, *, causal=False, region, top_k, grid=None):
    T, _, _, inv = _layout(q, k, region, grid, causal)
    dense = biformer_mask(q, k, region=region, top_k=top_k, grid=grid, causal=causal).to_dense()
    return dense if inv is None else dense[:, :, inv][:, :, :, inv]


def _params(T: int) -> dict:
    block = default_block(T)
    return {"region": block, "top_k": max(1, num_blocks(T, block) // 16)}


register(
    SparseMethod(
        name="biformer",
        attend=biformer_attention,
        dense_mask=_dense,
        make_params=_params,
        content_based=True,
    )
)
