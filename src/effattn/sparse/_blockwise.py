"""Pieces shared by the block-level selectors (static patterns, top-k blocks, BiFormer, HiLo, Combiner).

- :func:`block_pool`: mean / max / last-token pooling of ``[B, T, H, E]`` over consecutive blocks,
  ragged last block included (a mean divides by the tokens actually present);
- :func:`causal_query_pool`: the causal-safe query representative of a query block (see there);
- :func:`region_permutation`: the row-major order that makes every ``S x S`` region of a 2-D grid a
  contiguous run of ``S * S`` tokens (BiFormer and HiLo on images);
- :func:`concat_mask`: one mask over ``[original keys | extra keys]`` (Combiner's summaries,
  Sparse Transformer's summary columns) with an analytic tile classifier;
- :func:`block_mask_from_selection`: a :class:`BlockMask` from ``own block + top-k`` block indices;
- :func:`default_block`: the block size ``make_params`` uses at length ``T``.
"""

from __future__ import annotations

import torch

from effattn._checks import check_positive_int
from effattn.exact import BlockMask, MaskMod, causal_mask

NEG_INF = float("-inf")


def num_blocks(n: int, block: int) -> int:
    return max(1, -(-n // block))


def default_block(T: int) -> int:
    """64 (the engine's tile) from ``T = 1024`` on; shorter sequences get ``T // 16`` (at least 1)
    so a test at small ``T`` still has about 16 blocks to select from."""
    return 64 if T >= 1024 else max(1, T // 16)


def check_self_attention(q: torch.Tensor, k: torch.Tensor, method: str) -> int:
    """The block selectors pair query block ``i`` with key block ``i``: ``seq_q`` must equal ``seq_k``."""
    if q.dim() == 4 and k.dim() == 4 and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"{method} is self-attention: seq_q ({q.shape[1]}) must equal seq_k ({k.shape[1]}) "
            f"(q {tuple(q.shape)}, k {tuple(k.shape)})"
        )
    return k.shape[1]


def block_pool(x: torch.Tensor, block: int, how: str = "mean", lead: int = 0) -> torch.Tensor:
    """Pool ``x [B, T, H, E]`` over blocks of ``block`` slots: ``-> [B, ceil(T / block), H, E]``.

    Slot ``s`` of the (virtually) shifted sequence holds position ``s - lead``; block ``i`` covers
    positions ``i * block - lead ... (i + 1) * block - 1 - lead`` that exist (``0 <= p < T``).
    ``how``: ``"mean"`` (sum / tokens present; differentiable), ``"max"`` (elementwise max),
    ``"last"`` (the block's last present token). A block with no token gives zeros.
    """
    B, T, H, E = x.shape
    n = num_blocks(T, block)
    total = n * block
    pos = torch.arange(total, device=x.device) - lead
    valid = (pos >= 0) & (pos < T)
    if how == "last":
        last = torch.where(valid, pos, torch.full_like(pos, -1)).view(n, block).amax(-1)
        return x.index_select(1, last.clamp(min=0)) * (last >= 0).view(1, n, 1, 1).to(x.dtype)
    xp = torch.nn.functional.pad(x, (0, 0, 0, 0, lead, max(0, total - T - lead)))[:, :total]
    xp = xp.view(B, n, block, H, E)
    vb = valid.view(1, n, block, 1, 1)
    if how == "mean":
        count = valid.view(n, block).sum(-1).clamp(min=1).to(x.dtype).view(1, n, 1, 1)
        return xp.sum(2) / count
    if how == "max":
        out = xp.masked_fill(~vb, NEG_INF).amax(2)
        return out.masked_fill(~valid.view(n, block).any(-1).view(1, n, 1, 1), 0.0)
    raise ValueError(f"pooling must be 'mean', 'max' or 'last', got {how!r}")


def causal_query_pool(q: torch.Tensor, block: int) -> torch.Tensor:
    """Query representative of every query block that only reads positions <= the block's first one.

    Mean-pooling a whole query block would let the selection of its first token depend on the
    block's later queries (a look-ahead in causal mode). The representative of block ``i`` is
    therefore the mean of the ``block`` queries *ending at* the block's first position
    ``i * block`` (positions ``i * block - block + 1 ... i * block``): the newest information every
    token of the block may use. ``-> [B, n_blocks, H, D]``.
    """
    return block_pool(q, block, "mean", lead=block - 1)


def region_permutation(grid: tuple[int, int], region: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inv)`` for a row-major ``rows x cols`` grid cut into ``region x region`` windows.

    ``x[:, perm]`` lists the windows one after another (windows in row-major order, tokens row-major
    inside each window); ``y[:, inv]`` undoes it.
    """
    rows, cols = grid
    idx = torch.arange(rows * cols, device=device).view(rows // region, region, cols // region, region)
    perm = idx.permute(0, 2, 1, 3).reshape(-1)
    return perm, torch.argsort(perm)


def check_grid(grid, T: int, region: int | None = None, region_name: str = "region") -> tuple[int, int]:
    """``grid = (rows, cols)`` of positive ints with ``rows * cols == T`` (and ``region`` dividing both)."""
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise ValueError(f"grid must be a pair (rows, cols) of positive ints, got {grid!r}")
    rows, cols = (check_positive_int(f"grid[{i}]", g) for i, g in enumerate(grid))
    if rows * cols != T:
        raise ValueError(f"grid={tuple(grid)} has {rows * cols} cells but the sequence has {T} tokens")
    if region is not None and (rows % region or cols % region):
        raise ValueError(f"{region_name}={region} must divide both grid sides {tuple(grid)}")
    return rows, cols


def concat_mask(T: int, local: MaskMod, extra: MaskMod) -> MaskMod:
    """A mask over ``[T original keys | extra keys]``: ``local(b, h, q, kv)`` for ``kv < T`` and
    ``extra(b, h, q, kv - T)`` after. Both parts need analytic tile classifiers; a tile that straddles
    ``T`` combines the classifications of its two pieces."""

    def fn(b, h, q, kv):
        lo = local(b, h, q, kv.clamp(max=T - 1))
        hi = extra(b, h, q, (kv - T).clamp(min=0))
        return torch.where(kv < T, lo, hi)

    def blocks(ql, qh, kl, kh):
        a_any, a_all = local.blocks(ql, qh, kl, torch.clamp(kh, max=T - 1))
        b_any, b_all = extra.blocks(ql, qh, torch.clamp(kl - T, min=0), kh - T)
        has_a, has_b = kl < T, kh >= T
        return (has_a & a_any) | (has_b & b_any), (~has_a | a_all) & (~has_b | b_all)

    return MaskMod(fn, blocks, f"concat({local.name} | {extra.name})")


def block_mask_from_selection(
    top_idx: torch.Tensor,
    top_valid: torch.Tensor,
    T: int,
    block: int,
    causal: bool,
) -> BlockMask:
    """``BlockMask`` for ``own block + selected blocks`` per query block (``T_q == T_k``, one block size).

    ``top_idx [Bm, Hm, n, k]`` selected key blocks (never the own block), ``top_valid`` the same shape,
    with the valid entries first in every row (as ``topk`` of ``-inf``-masked scores gives them).
    In causal mode the own block is the only partial tile (causal mask); every selected block lies
    wholly in the past and is full.
    """
    Bm, Hm, n, k = top_idx.shape
    own = torch.arange(n, device=top_idx.device).view(1, 1, n, 1).expand(Bm, Hm, n, 1)
    idx = torch.cat([own, top_idx], -1)
    counts = 1 + top_valid.sum(-1)
    partial = torch.zeros(1, 1, 1, k + 1, dtype=torch.bool, device=top_idx.device)
    partial[..., 0] = causal
    return BlockMask.from_kv_indices(
        idx,
        T,
        T,
        q_block=block,
        kv_block=block,
        kv_counts=counts,
        mask_mod=causal_mask(0) if causal else None,
        kv_partial=partial,
    )
