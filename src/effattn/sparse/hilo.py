"""HiLo attention (Pan et al. 2022, "Fast Vision Transformers with HiLo Attention").

The heads are split in two groups: ``n_lo = floor(alpha * H)`` Lo-Fi heads (the *last* ``n_lo``
query heads, as the paper concatenates ``[Hi-Fi | Lo-Fi]``) and ``H - n_lo`` Hi-Fi heads.

- Hi-Fi (high frequencies): local attention inside non-overlapping windows of ``window`` tokens
  (``window x window`` patches with ``grid=``); in causal mode a sliding window of the ``window``
  keys ending at the query (non-overlapping windows would let a token's context shrink to itself).
- Lo-Fi (low frequencies): every query attends to average-pooled keys and values,
  ``K' = avgpool_s(K), V' = avgpool_s(V)`` over groups of ``s = pool`` tokens (``s x s`` patches with
  ``grid=``): ``o_t = softmax(q_t K'^T / sqrt(d)) V'``. In causal mode a query sees only the pooled
  groups that are complete at its position (group ``g`` ends at ``(g + 1) s - 1 <= t``), a mask on
  the pooled positions; nothing else. So the first ``s - 1`` tokens of a Lo-Fi head have no key at
  all and output zeros (the engine's rule for empty rows), and a ragged last group (``T % s != 0``)
  is never attended in causal mode. Non-causal pooling of a ragged last group averages the tokens
  it has.

Both groups run on the tiled engine (analytic block masks). With GQA the split must fall on a key
head boundary (``n_lo`` a multiple of ``H_q / H_kv``). Lo-Fi heads attend to keys that are not the
original keys, so the registry's ``dense_mask`` is ``None``; :func:`hilo_reference` states the
method densely and the tests compare with it.
"""

from __future__ import annotations

import math

import torch

from effattn._checks import check_float, check_qkv
from effattn.exact import MaskMod, attention, create_block_mask, sliding_window_mask
from effattn.sparse._blockwise import block_pool, check_grid, check_self_attention, region_permutation
from effattn.sparse._common import SparseMethod, check_block_size, register


def window_partition_mask(window: int) -> MaskMod:
    """``q // w == kv // w``: attention inside non-overlapping windows of ``w`` tokens."""

    def fn(b, h, q, kv):
        return q // window == kv // window

    def blocks(ql, qh, kl, kh):
        any_ = (ql // window <= kh // window) & (kl // window <= qh // window)
        w = ql // window
        return any_, (qh // window == w) & (kl // window == w) & (kh // window == w)

    return MaskMod(fn, blocks, f"window_partition({window})")


def complete_groups_mask(pool: int) -> MaskMod:
    """Query ``t`` sees pooled group ``g`` iff the group is complete at ``t``: ``(g + 1) * pool - 1 <= t``."""
    return MaskMod(
        lambda b, h, q, g: (g + 1) * pool - 1 <= q,
        lambda ql, qh, gl, gh: ((gl + 1) * pool - 1 <= qh, (gh + 1) * pool - 1 <= ql),
        f"complete_groups({pool})",
    )


def _split(q, k, v, alpha, window, pool, grid, causal):
    B, Tq, Tk, Hq, Hkv, D, Dv = check_qkv(q, k, v)
    T = check_self_attention(q, k, "hilo_attention")
    check_float("alpha", alpha, 0.0, 1.0)  # the fraction of Lo-Fi heads
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    n_lo = int(math.floor(alpha * Hq + 1e-9))
    G = Hq // Hkv
    if n_lo % G:
        raise ValueError(
            f"alpha={alpha} gives {n_lo} Lo-Fi heads of {Hq}; with GQA ({G} query heads per key head) it must "
            f"be a multiple of {G}"
        )
    check_block_size("window", window, T)
    check_block_size("pool", pool, T)
    if grid is not None:
        if causal:
            raise ValueError("grid= (2-D windows and pooling) is non-causal only: pass causal=False")
        check_grid(grid, T, window, "window")
        check_grid(grid, T, pool, "pool")
    return T, n_lo, Hq - n_lo, (Hq - n_lo) // G


def _pool_kv(k: torch.Tensor, v: torch.Tensor, pool: int, grid, causal: bool):
    """Average-pooled keys/values ``[B, n_groups, H_kv, D]`` (complete groups only when causal)."""
    if grid is not None:
        perm, _ = region_permutation(tuple(grid), pool, k.device)
        k, v = k[:, perm], v[:, perm]
        size = pool * pool
    else:
        size = pool
    if causal:
        n = k.shape[1] // size
        k, v = k[:, : n * size], v[:, : n * size]
    return block_pool(k, size, "mean"), block_pool(v, size, "mean")


def _hifi(q, k, v, window, grid, causal):
    T = q.shape[1]
    if grid is not None:
        perm, inv = region_permutation(tuple(grid), window, q.device)
        mm = window_partition_mask(window * window)
        bm = create_block_mask(mm, 1, 1, T, T, device=q.device)
        return attention(q[:, perm], k[:, perm], v[:, perm], block_mask=bm, backend="tiled")[:, inv]
    mm = sliding_window_mask(window - 1, 0) if causal else window_partition_mask(window)
    bm = create_block_mask(mm, 1, 1, T, T, device=q.device)
    return attention(q, k, v, block_mask=bm, backend="tiled")


def _lofi(q, k, v, pool, grid, causal):
    kp, vp = _pool_kv(k, v, pool, grid, causal)
    T, n = q.shape[1], kp.shape[1]
    if n == 0:  # causal and T < pool: no complete group anywhere
        return q.new_zeros(*q.shape[:3], v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum())
    mm = complete_groups_mask(pool) if causal else None
    bm = create_block_mask(mm, 1, 1, T, n, device=q.device)
    return attention(q, kp, vp, block_mask=bm, backend="tiled")


def hilo_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    alpha: float = 0.5,
    window: int = 64,
    pool: int = 4,
    grid: tuple[int, int] | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """HiLo attention: ``H - floor(alpha H)`` Hi-Fi heads with local windows, ``floor(alpha H)`` Lo-Fi
    heads (the last ones) attending to ``pool``-averaged keys/values. ``grid=(rows, cols)`` makes the
    windows and pools 2-D patches of a row-major image (non-causal).

    Example::

        >>> q = k = v = torch.randn(1, 100, 4, 16)
        >>> hilo_attention(q, k, v, alpha=0.5, window=10, pool=5, causal=True).shape
        torch.Size([1, 100, 4, 16])
    """
    T, n_lo, n_hi, n_hi_kv = _split(q, k, v, alpha, window, pool, grid, causal)
    outs = []
    if n_hi:
        outs.append(_hifi(q[:, :, :n_hi], k[:, :, :n_hi_kv], v[:, :, :n_hi_kv], window, grid, causal))
    if n_lo:
        outs.append(_lofi(q[:, :, n_hi:], k[:, :, n_hi_kv:], v[:, :, n_hi_kv:], pool, grid, causal))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def hilo_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    alpha: float = 0.5,
    window: int = 64,
    pool: int = 4,
    grid: tuple[int, int] | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """HiLo written densely (small sizes): explicit masks on the original and pooled positions,
    the reference backend for both head groups. Ground truth for the tests."""
    T, n_lo, n_hi, n_hi_kv = _split(q, k, v, alpha, window, pool, grid, causal)
    t = torch.arange(T, device=q.device)
    outs = []
    if n_hi:
        if grid is not None:  # same 2-D patch: row // w and col // w agree
            cols = grid[1]
            patch = (t // cols // window) * (cols // window) + (t % cols) // window
            allowed = patch.view(-1, 1) == patch.view(1, -1)
        elif causal:
            allowed = (t.view(-1, 1) - t.view(1, -1) >= 0) & (t.view(-1, 1) - t.view(1, -1) < window)
        else:
            allowed = t.view(-1, 1) // window == t.view(1, -1) // window
        outs.append(
            attention(
                q[:, :, :n_hi],
                k[:, :, :n_hi_kv],
                v[:, :, :n_hi_kv],
                mask_mod=lambda b, h, i, j: allowed[i, j],
                backend="reference",
            )
        )
    if n_lo:
        kp, vp = _pool_kv(k[:, :, n_hi_kv:], v[:, :, n_hi_kv:], pool, grid, causal)
        g = torch.arange(kp.shape[1], device=q.device)
        if causal:
            visible = (g.view(1, -1) + 1) * pool - 1 <= t.view(-1, 1)
            o = attention(q[:, :, n_hi:], kp, vp, mask_mod=lambda b, h, i, j: visible[i, j], backend="reference")
        else:
            o = attention(q[:, :, n_hi:], kp, vp, backend="reference")
        outs.append(o)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _params(T: int) -> dict:
    return {"alpha": 0.5, "window": max(2, T // 16), "pool": max(2, min(16, T // 16))}


register(
    SparseMethod(
        name="hilo",
        attend=hilo_attention,
        dense_mask=lambda q, k, *, causal=False, **params: None,
        make_params=_params,
        content_based=False,
    )
)
