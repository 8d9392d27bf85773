"""HiP attention: hierarchical top-k pruning of key blocks (Lee et al., "HiP Attention: Sparse
Sub-Quadratic Attention with Hierarchical Attention Pruning", 2024).

Keys are cut into blocks (leaves) of ``block`` tokens; each query block ``i`` has a pooled query
``p_i`` (causal: the mean of the ``block`` queries ending at the block's first position, as
:mod:`effattn.sparse.topk_block`, so no token's selection reads a later query). The candidates are the
complete earlier blocks ``0 .. i - 1`` (``m = i`` leaves). Selection per query block and head:

    groups <- the k contiguous spans of leaves floor(g m / k) .. floor((g + 1) m / k) - 1, g < k
    repeat until every group is one leaf:
        split each group [a, b) into halves [a, c), [c, b), c = a + ceil((b - a) / 2)
        score each half by its representative key:  s = p_i . k_rep(half)
        groups <- the k best-scoring halves
    S_i = {i} U groups;   o_t = softmax over the keys of blocks S_i (tiled engine, own block causal)

Each level scores ``2k`` representatives, and there are ``ceil(log2(m / k))`` levels: ``O(k log T)``
dot products per query block, ``O(T / block * k log T)`` in all, against ``O(T^2 / block)`` for the
brute-force block scores (:func:`brute_force_topk_blocks`, every key scored). The representative of a
half (``representative=``):

- ``"first"`` (default): the half's first key. The paper scores each branch by one representative
  token without fixing which in its summary; which one is left to the implementation, and we take
  the first (cheapest: no search);
- ``"center"``: the key in the middle of the half;
- ``"max"``: the largest ``p_i . k_j`` over the half's keys. Then the pruning is exact: a half that
  holds one of the true top-k blocks scores at least that block's score, so every such half survives,
  and the result is the brute-force top-k by block max (costs ``O(T)`` per level: for tests and as the
  statement of what the cheap representatives approximate).

A ``representative`` that orders the halves as their best blocks do (e.g. scores monotone across
blocks) also gives the brute-force selection exactly. With ``top_k >= m`` every candidate is kept.
Causal only (``causal=False`` raises). The plain max-pooled top-k this package called HiP-style before
stays available as ``topk_block_attention(..., representative="max")`` (registered as ``topk_block``
with other parameters); the selection runs under ``torch.no_grad`` and gradients flow through the
attention, as every selector here.
"""

from __future__ import annotations

import torch

from effattn._checks import check_positive_int, check_qkv, check_tensor
from effattn.exact import BlockMask, attention
from effattn.sparse._blockwise import (
    NEG_INF,
    block_mask_from_selection,
    causal_query_pool,
    check_self_attention,
    default_block,
    num_blocks,
)
from effattn.sparse._common import SparseMethod, check_block_size, register

__all__ = ["HIP_REPRESENTATIVES", "brute_force_topk_blocks", "hip_attention", "hip_block_mask", "hip_selection"]

HIP_REPRESENTATIVES = ("first", "center", "max")


def _check(q, k, block, top_k, causal, representative) -> int:
    check_tensor("q", q, 4, "[batch, seq, heads_q, head_dim]")
    check_tensor("k", k, 4, "[batch, seq, heads_kv, head_dim]")
    T = check_self_attention(q, k, "hip_attention")
    if q.shape[0] != k.shape[0] or q.shape[2] % k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)}: batch, heads_q % heads_kv == 0 and head_dim must match"
        )
    check_block_size("block", block, T)
    check_positive_int("top_k", top_k)
    if causal is not True:
        raise ValueError(f"hip_attention is causal only (candidates are the earlier blocks), got causal={causal!r}")
    if representative not in HIP_REPRESENTATIVES:
        raise ValueError(f"representative must be one of {HIP_REPRESENTATIVES}, got {representative!r}")
    return T


def _pooled(q, k, block):
    """Pooled queries ``[B, H_q, n, D]`` (float32) and keys ``[B, H_kv, T, D]`` (float32), detached."""
    p = causal_query_pool(q.detach().float(), block).transpose(1, 2)
    return p, k.detach().float().transpose(1, 2)


def _block_max_scores(p, kh, block, G):
    """``max_{j in block b} p_i . k_j`` for every query block ``i`` and key block ``b``: ``[B, H_q, n, n_k]``."""
    B, Hq, n, D = p.shape
    T = kh.shape[2]
    s = torch.einsum("bhgid,bhtd->bhgit", p.view(B, Hq // G, G, n, D), kh).reshape(B, Hq, n, T)
    nk = num_blocks(T, block)
    s = torch.nn.functional.pad(s, (0, nk * block - T), value=NEG_INF)
    return s.view(B, Hq, n, nk, block).amax(-1)


def hip_selection(
    q: torch.Tensor, k: torch.Tensor, *, block: int = 64, top_k: int, representative: str = "first"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hierarchical pruning (module docstring) for every query block and head: ``(idx, valid)``, both
    ``[B, H_q, n, top_k]``: the selected earlier key blocks (ascending score order reversed: best first)
    and which entries hold one (query block ``i`` has only ``i`` candidates). No gradient.

    Example::

        >>> q = k = torch.randn(1, 256, 2, 16)
        >>> idx, valid = hip_selection(q, k, block=16, top_k=3)
        >>> tuple(idx.shape), valid[0, 0].sum(-1).tolist()[:6]
        ((1, 2, 16, 3), [0, 1, 2, 3, 3, 3])
    """
    _check(q, k, block, top_k, True, representative)
    B, T, Hq, D = q.shape
    Hkv, G = k.shape[2], q.shape[2] // k.shape[2]
    n = num_blocks(T, block)
    dev = q.device
    with torch.no_grad():
        p, kh = _pooled(q, k, block)
        m = torch.arange(n, device=dev).view(1, 1, n, 1)  # candidates of query block i: leaves 0 .. i - 1
        g = torch.arange(top_k, device=dev).view(1, 1, 1, top_k)
        lo = (g * m).div(top_k, rounding_mode="floor").expand(B, Hq, n, top_k)
        hi = ((g + 1) * m).div(top_k, rounding_mode="floor").expand(B, Hq, n, top_k)
        leaf_max = _block_max_scores(p, kh, block, G) if representative == "max" else None
        head_kv = (torch.arange(Hq, device=dev) // G).view(1, Hq, 1, 1)
        k_rows = k.detach().float().reshape(B * T * Hkv, D)  # (batch, position, head) rows: a view if contiguous
        row0 = (torch.arange(B, device=dev) * (T * Hkv)).view(B, 1, 1, 1)
        score = torch.zeros(B, Hq, n, top_k, device=dev)
        first = True
        while first or bool((hi - lo > 1).any()):
            first = False
            mid = lo + (hi - lo + 1) // 2
            a, b = torch.cat([lo, mid], -1), torch.cat([mid, hi], -1)  # 2k halves, some empty
            if representative == "max":
                leaves = torch.arange(leaf_max.shape[-1], device=dev)
                inside = (leaves >= a[..., None]) & (leaves < b[..., None])  # [B, H, n, 2k, n_k]
                s = leaf_max[:, :, :, None, :].masked_fill(~inside, NEG_INF).amax(-1)
            else:
                tok = a * block if representative == "first" else (a * block + b * block) // 2
                tok = tok.clamp(max=T - 1)
                flat = (row0 + tok * Hkv + head_kv).reshape(-1)
                kr = k_rows.index_select(0, flat).view(B, Hq, n, 2 * top_k, D)  # the 2k representative keys
                s = torch.einsum("bhid,bhird->bhir", p, kr)
            s = s.masked_fill(b <= a, NEG_INF)
            score, best = s.topk(top_k, dim=-1)
            lo, hi = a.gather(-1, best), b.gather(-1, best)
        valid = (hi > lo) & (score > NEG_INF)
    return lo, valid


def brute_force_topk_blocks(
    q: torch.Tensor, k: torch.Tensor, *, block: int = 64, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What HiP approximates, by brute force: every key scored, ``s_ib = max_{j in b} p_i . k_j``, the
    ``top_k`` best earlier blocks per query block and head: ``(idx, valid)`` as :func:`hip_selection`.
    ``O(T^2 / block)`` scores (one query block's ``[block-pooled query x T]`` row at a time would bound
    memory; this materializes ``[B, H_q, n, T]``).

    Example::

        >>> q = k = torch.randn(1, 128, 1, 8)
        >>> a, va = brute_force_topk_blocks(q, k, block=8, top_k=2)
        >>> b, vb = hip_selection(q, k, block=8, top_k=2, representative="max")
        >>> bool((a.sort(-1).values == b.sort(-1).values)[va].all()), torch.equal(va, vb)
        (True, True)
    """
    _check(q, k, block, top_k, True, "max")
    n = num_blocks(q.shape[1], block)
    with torch.no_grad():
        p, kh = _pooled(q, k, block)
        s = _block_max_scores(p, kh, block, q.shape[2] // k.shape[2])
        i = torch.arange(n, device=q.device).view(n, 1)
        s = s.masked_fill(torch.arange(s.shape[-1], device=q.device).view(1, -1) >= i, NEG_INF)
        if s.shape[-1] < top_k:
            s = torch.nn.functional.pad(s, (0, top_k - s.shape[-1]), value=NEG_INF)
        val, idx = s.topk(top_k, dim=-1)
    return idx, val > NEG_INF


def hip_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block: int = 64,
    top_k: int,
    causal: bool = True,
    representative: str = "first",
) -> BlockMask:
    """HiP's selection as a per-head :class:`BlockMask` ``[B, H_q, n, top_k + 1]`` (own block + pruned top-k).

    Example::

        >>> q = k = torch.randn(1, 256, 2, 16)
        >>> hip_block_mask(q, k, block=32, top_k=2).kv_counts[0, 0].tolist()
        [1, 2, 3, 3, 3, 3, 3, 3]
    """
    T = _check(q, k, block, top_k, causal, representative)
    idx, valid = hip_selection(q, k, block=block, top_k=top_k, representative=representative)
    with torch.no_grad():  # topk listed the valid entries (finite scores) first
        return block_mask_from_selection(idx, valid, T, block, True)


def hip_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block: int = 64,
    top_k: int,
    causal: bool = True,
    representative: str = "first",
) -> torch.Tensor:
    """HiP attention: each query block attends to its own block (causally) and the ``top_k`` earlier
    blocks kept by the hierarchical pruning, on the tiled engine.

    Example::

        >>> q = k = v = torch.randn(1, 256, 2, 16)
        >>> hip_attention(q, k, v, block=32, top_k=2).shape
        torch.Size([1, 256, 2, 16])
    """
    check_qkv(q, k, v)
    bm = hip_block_mask(q, k, block=block, top_k=top_k, causal=causal, representative=representative)
    return attention(q, k, v, block_mask=bm, backend="tiled")


def _dense(q, k, *, causal=True, **params):
    return hip_block_mask(q, k, causal=causal, **params).to_dense()


def _params(T: int) -> dict:
    block = default_block(T)
    n = num_blocks(T, block)
    return {"block": block, "top_k": max(2, n // 16), "representative": "first"}


register(
    SparseMethod(
        name="hip",
        attend=hip_attention,
        dense_mask=_dense,
        make_params=_params,
        content_based=True,
        causal_modes=(True,),
    )
)
