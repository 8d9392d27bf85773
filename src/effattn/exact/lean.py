"""Lean Attention: stream-K decode attention over a KV cache, a bounded piece at a time.

Sanovar et al. 2024, "Lean Attention: Hardware-Aware Scalable Attention Mechanism for the
Decode-Phase of Transformers". Decoding is a reduction over the cache: each output row (a batch
row, a kv head and the query heads that share it) needs every visible key. Flash-Decoding splits
each row's keys into a fixed number of chunks; Lean Attention instead counts the *work*:

    units   = KV tiles of size C over all (batch, kv head) rows,  U = sum_bh ceil(n_bh / C)
    worker w takes the contiguous units  [w U / W, (w + 1) U / W)   (at most one unit more than another)

so a worker's run may start inside one row and end inside another (stream-K), and every one of the
``W`` workers does the same amount of work whatever the mix of context lengths. A worker keeps one
running softmax state ``(m, l, acc)`` for the row it is in and, where its run leaves that row (or
ends), writes the partial ``(o = acc / l, lse = m + log l)``. The fix-up merges the partials of each
row by their log-sum-exps (associative, :func:`effattn.exact.merge_attention_states`):

    lse = log sum_s exp(lse_s),    o = sum_s exp(lse_s - lse) o_s

Here the ``W`` workers advance in lock step: step ``s`` gathers tile ``s`` of every worker's run from
the cache (``[W, C, D]``), so the memory beyond the cache is ``O(W C D)`` for the tiles plus one small
partial per row and worker, never the scores of the whole context. The cache is contiguous
(``[B, T_max, H_kv, D]``) or paged (a pool ``[num_blocks, block_size, H_kv, D]`` read through a
``block_table``, as vLLM / FlashAttention's ``block_table``).

Choices the paper leaves to the hardware: the tile is ``tile_size`` keys (default 256; the paper's
kernel uses 256 for head dims <= 128) and the worker count ``num_workers`` (on a GPU one per streaming
multiprocessor times occupancy; default 64 here). Only tiles that hold a visible key count as units,
so a sliding window costs ``O(window)`` per row.
"""

from __future__ import annotations

import torch

from effattn._checks import check_cache_seqlens, check_positive_int, check_qkv, check_scale, check_tensor
from effattn.exact.masks import window_bounds
from effattn.exact.reference import compute_dtype

__all__ = ["lean_decode_attention", "lean_schedule"]

DEFAULT_TILE = 256
DEFAULT_WORKERS = 64


def lean_schedule(tiles_per_row: torch.Tensor, num_workers: int) -> torch.Tensor:
    """Stream-K partition of ``U = tiles_per_row.sum()`` units over ``num_workers`` workers.

    Returns long ``[W + 1]`` bounds: worker ``w`` computes units ``bounds[w] .. bounds[w + 1] - 1`` of
    the row-major order (row ``r``'s tiles follow row ``r - 1``'s), with ``W = min(num_workers, U)``
    (at least 1). The first ``U mod W`` workers take ``ceil(U / W)`` units, the others ``floor(U / W)``.

    Example::

        >>> lean_schedule(torch.tensor([5, 2, 3]), 4).tolist()   # 10 units: 3, 3, 2, 2
        [0, 3, 6, 8, 10]
    """
    check_positive_int("num_workers", num_workers)
    if not isinstance(tiles_per_row, torch.Tensor) or tiles_per_row.dim() != 1:
        raise ValueError(
            f"tiles_per_row must be a 1-D int tensor, got {getattr(tiles_per_row, 'shape', tiles_per_row)}"
        )
    if tiles_per_row.numel() and int(tiles_per_row.min()) < 0:
        raise ValueError(f"tiles_per_row must be >= 0, got min {int(tiles_per_row.min())}")
    total = int(tiles_per_row.sum())
    w = max(1, min(num_workers, total))
    base, extra = divmod(total, w)
    idx = torch.arange(w + 1)
    return idx * base + idx.clamp(max=extra)


def _check_paged(q, k_pool, v_pool, block_table, cache_seqlens):
    check_tensor("q", q, 4, "[batch, seq_new, heads_q, head_dim]")
    check_tensor("k_cache", k_pool, 4, "[num_blocks, block_size, heads_kv, head_dim] (a paged pool)")
    check_tensor("v_cache", v_pool, 4, "[num_blocks, block_size, heads_kv, head_dim_v] (a paged pool)")
    B, Tn, Hq, D = q.shape
    if tuple(k_pool.shape[:3]) != tuple(v_pool.shape[:3]) or k_pool.shape[3] != D:
        raise ValueError(
            f"paged k_cache [blocks, block_size, H_kv, D={D}] and v_cache must match in their first three dims: "
            f"got k {tuple(k_pool.shape)}, v {tuple(v_pool.shape)}"
        )
    if q.dtype != k_pool.dtype or q.dtype != v_pool.dtype:
        raise TypeError(f"q, k_cache, v_cache must share one dtype, got {q.dtype}, {k_pool.dtype}, {v_pool.dtype}")
    Hkv = k_pool.shape[2]
    if Hq % Hkv:
        raise ValueError(f"heads_q ({Hq}) must be a multiple of heads_kv ({Hkv}) for GQA/MQA")
    if (
        not isinstance(block_table, torch.Tensor)
        or block_table.dim() != 2
        or block_table.shape[0] != B
        or block_table.dtype.is_floating_point
    ):
        got = getattr(block_table, "shape", block_table)
        raise ValueError(f"block_table must be an int tensor [batch={B}, max_blocks], got {got}")
    if cache_seqlens is None:
        raise ValueError("a paged cache (block_table given) needs cache_seqlens [batch]")
    Tmax = block_table.shape[1] * k_pool.shape[1]
    return B, Tn, Tmax, Hq, Hkv, D, v_pool.shape[3]


def lean_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | None = None,
    *,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    num_workers: int | None = None,
    tile_size: int | None = None,
    return_lse: bool = False,
):
    """Decode attention of a few new queries against a KV cache, partitioned stream-K (Lean Attention).

    ``o_i = softmax_j(s_ij) v_j`` with ``s_ij = softcap(q_i k_j * scale) - slope_h (p_i - p_j)`` over the
    visible keys ``j <= p_i`` (and ``p_i - j < window``), ``p_i = cache_seqlens - T_new + i``; the
    optional sink logit joins each head's softmax with no value. Same semantics as
    :func:`effattn.exact.decode_attention`; computed as the module docstring describes.

    Args:
        q: ``[B, T_new, H_q, D]``, the newest tokens, whose keys are already in the cache.
        k_cache, v_cache: ``[B, T_max, H_kv, D]`` / ``[..., D_v]``; with ``block_table``, a paged pool
            ``[num_blocks, block_size, H_kv, D]``.
        cache_seqlens: long ``[B]`` valid lengths (default ``T_max``; required when paged).
        block_table: long ``[B, max_blocks]``: logical block ``i`` of row ``b`` is pool block
            ``block_table[b, i]`` (entries past a row's length are ignored, ``-1`` allowed).
        window, softcap, sinks: as :func:`effattn.exact.decode_attention`; alibi_slopes ``[H_q]``.
        num_workers: ``W``, the fixed number of workers (default 64); tile_size: keys per unit
            (default 256).
        return_lse: also return the log-sum-exp ``[B, H_q, T_new]``.
    A key or value holding NaN/inf makes the rows that may see it NaN and nothing else
    (:mod:`effattn.exact.nonfinite`).

    Example::

        >>> kc = torch.randn(2, 300, 2, 16); q = torch.randn(2, 1, 4, 16); lens = torch.tensor([300, 120])
        >>> from effattn.exact import decode_attention
        >>> o = lean_decode_attention(q, kc, kc, lens, num_workers=3, tile_size=64)
        >>> torch.allclose(o, decode_attention(q, kc, kc, lens), atol=1e-5)
        True
    """
    paged = block_table is not None
    if paged:
        B, Tn, Tmax, Hq, Hkv, D, Dv = _check_paged(q, k_cache, v_cache, block_table, cache_seqlens)
    else:
        B, Tn, Tmax, Hq, Hkv, D, Dv = check_qkv(q, k_cache, v_cache)
    scale = check_scale(scale, D)
    dev = q.device
    cache_seqlens = check_cache_seqlens(cache_seqlens, B, Tn, Tmax, dev)
    for name, t in (("sinks", sinks), ("alibi_slopes", alibi_slopes)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (Hq,)):
            raise ValueError(f"{name} must be a tensor of shape [heads_q] = [{Hq}], got {getattr(t, 'shape', t)}")
    C = check_positive_int("tile_size", DEFAULT_TILE if tile_size is None else tile_size)
    W = check_positive_int("num_workers", DEFAULT_WORKERS if num_workers is None else num_workers)
    if not paged:
        C = min(C, Tmax)  # a contiguous tile is a strided window of the cache: no wider than it
    left = window_bounds(window, True)[0] if window is not None else None
    G, R = Hq // Hkv, Tn * Hq // Hkv  # rows of one unit: T_new queries x G heads, t-major
    lens = cache_seqlens.to(dev).long()

    # the units: every tile holding a visible key of (batch, kv head) row bh = b * H_kv + h
    hi = lens.repeat_interleave(Hkv)  # [BH]
    lo = (hi - Tn - left).clamp(min=0) if left is not None else torch.zeros_like(hi)
    first = lo // C
    tiles = -(-hi // C) - first
    bounds = lean_schedule(tiles.cpu(), W).to(dev)
    W = bounds.numel() - 1
    ends = tiles.cumsum(0)
    starts = ends - tiles
    per = bounds[1:] - bounds[:-1]
    steps = int(per.max())
    u = bounds[:-1, None] + torch.arange(steps, device=dev)  # [W, steps]: unit of worker w at step s
    active = u < bounds[1:, None]
    uc = u.clamp(max=int(ends[-1]) - 1)
    row = torch.searchsorted(ends, uc, right=True)  # [W, steps]
    tile = first[row] + uc - starts[row]
    last = ~active[:, 1:] | (row[:, 1:] != row[:, :-1])  # the worker leaves its row after this step
    last = torch.cat([last, torch.ones(W, 1, dtype=torch.bool, device=dev)], 1) & active
    seg = last.long().cumsum(1) - last.long() + torch.cat([per.new_zeros(1), last.sum(1).cumsum(0)[:-1]])[:, None]
    n_seg = int(last.sum())
    seg_row = torch.empty(n_seg, dtype=torch.long, device=dev)
    seg_row[seg[last]] = row[last]

    cd = compute_dtype(q.dtype)  # float32, or float64 for float64 input
    qf = q.to(cd).view(B, Tn, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(B * Hkv, R, D)
    qpos = (lens.view(B, 1) - Tn + torch.arange(Tn, device=dev)).repeat_interleave(Hkv, 0)  # [BH, Tn]
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dev, cd).view(Hkv, G).repeat(B, Tn)  # [BH, R], t-major rows
    m = torch.full((W, R), float("-inf"), device=dev, dtype=cd)
    l_sum = torch.zeros(W, R, device=dev, dtype=cd)
    acc = torch.zeros(W, R, Dv, device=dev, dtype=cd)
    poisoned = torch.zeros(W, R, dtype=torch.bool, device=dev)
    part_o = torch.zeros(n_seg, R, Dv, device=dev, dtype=cd)
    part_lse = torch.full((n_seg, R), float("-inf"), device=dev, dtype=cd)
    part_bad = torch.zeros(n_seg, R, dtype=torch.bool, device=dev)
    ar = torch.arange(C, device=dev)
    table = block_table.to(dev).long() if paged else None
    if paged:
        bs = k_cache.shape[1]
        whole = C % bs == 0  # a tile is whole blocks: gather blocks, not tokens
        ab = torch.arange(C // bs, device=dev)
    else:  # views [B, T_max - C + 1, H_kv, C, D]: tile j of a row is one index, no per-token gather
        k_win, v_win = k_cache.unfold(1, C, 1).transpose(-1, -2), v_cache.unfold(1, C, 1).transpose(-1, -2)
    for s in range(steps):
        r, on = row[:, s], active[:, s]
        b, h = r // Hkv, r % Hkv
        own = tile[:, s] * C  # first key of each worker's unit
        if paged:
            kpos = own[:, None] + ar  # [W, C]
            if whole:
                blk = table[b[:, None], (own[:, None] // bs + ab).clamp(max=table.shape[1] - 1)].clamp(min=0)
                kt = k_cache[blk, :, h[:, None]].flatten(1, 2)  # [W, C // bs, bs, D] -> [W, C, D]
                vt = v_cache[blk, :, h[:, None]].flatten(1, 2)
            else:
                blk = table[b[:, None], (kpos // bs).clamp(max=table.shape[1] - 1)].clamp(min=0)
                kt, vt = k_cache[blk, kpos % bs, h[:, None]], v_cache[blk, kpos % bs, h[:, None]]
        else:
            start = own.clamp(max=Tmax - C)  # the last tile is read from T_max - C: its overlap is masked
            kpos = start[:, None] + ar
            kt, vt = k_win[b, start, h], v_win[b, start, h]
        kt, vt = kt.to(cd), vt.to(cd)  # [W, C, D], [W, C, Dv]: one tile per worker
        qp = qpos[r]  # [W, Tn]
        dist = qp[:, :, None] - kpos[:, None, :]  # [W, Tn, C]
        ok = (dist >= 0) & (kpos[:, None, :] < hi[r, None, None]) & on[:, None, None]
        ok = ok & (kpos[:, None, :] >= own[:, None, None])
        if left is not None:
            ok = ok & (dist <= left)
        ok = ok.repeat_interleave(G, 1)  # [W, R, C]
        if not bool(torch.isfinite(kt.sum() + vt.sum())):  # one reduction proves the tile finite
            bad = ~(torch.isfinite(kt).all(-1) & torch.isfinite(vt).all(-1))  # [W, C]
            kt, vt = kt.masked_fill(bad[..., None], 0.0), vt.masked_fill(bad[..., None], 0.0)
            poisoned |= (ok & bad[:, None, :]).any(-1)
        sc = torch.bmm(qf[r], kt.transpose(1, 2)) * scale  # [W, R, C]
        if softcap is not None:
            sc = softcap * torch.tanh(sc / softcap)
        if slopes is not None:
            sc = sc - slopes[r][..., None] * dist.repeat_interleave(G, 1).to(cd)
        sc = sc.masked_fill(~ok, float("-inf"))
        m_new = torch.maximum(m, sc.amax(-1))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)
        p = torch.exp(sc - m_safe[..., None])
        alpha = torch.exp(m - m_safe)
        l_sum = l_sum * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.bmm(p, vt)
        m = m_new
        done = last[:, s]
        if bool(done.any()):  # these workers leave their row: write the partial, start afresh
            sid = seg[done, s]
            nonempty = l_sum[done] > 0
            part_o[sid] = acc[done] / l_sum[done].clamp(min=1e-30)[..., None]
            part_lse[sid] = torch.where(nonempty, m[done] + l_sum[done].clamp(min=1e-30).log(), float("-inf"))
            part_bad[sid] = poisoned[done]
            keep = ~done[:, None]
            m = m.masked_fill(~keep, float("-inf"))
            l_sum, acc, poisoned = l_sum * keep, acc * keep[..., None], poisoned & keep
    o, lse = _fix_up(part_o, part_lse, part_bad, seg_row, B * Hkv, sinks, Hkv, G, Tn)
    o = o.view(B, Hkv, Tn, G, Dv).permute(0, 2, 1, 3, 4).reshape(B, Tn, Hq, Dv).to(q.dtype)
    lse = lse.view(B, Hkv, Tn, G).permute(0, 1, 3, 2).reshape(B, Hq, Tn)
    return (o, lse) if return_lse else o


def _fix_up(part_o, part_lse, part_bad, seg_row, rows, sinks, Hkv, G, Tn):
    """Merge each row's partials by their log-sum-exps (plus the sink logit): ``o [rows, R, D_v]``, ``lse``."""
    R = part_lse.shape[1]
    m = torch.full((rows, R), float("-inf"), device=part_lse.device, dtype=part_lse.dtype)
    m = m.scatter_reduce(0, seg_row[:, None].expand(-1, R), part_lse, "amax")
    sink = None
    if sinks is not None:  # [Hq] -> [rows, R]
        sink = sinks.to(m.device, m.dtype).view(Hkv, G).repeat(rows // Hkv, Tn)
        m = torch.maximum(m, sink)
    m_safe = m.masked_fill(m == float("-inf"), 0.0)
    w = torch.exp(part_lse - m_safe[seg_row])  # [n_seg, R]
    den = torch.zeros_like(m).index_add(0, seg_row, w)
    num = torch.zeros(rows, R, part_o.shape[-1], device=m.device, dtype=m.dtype).index_add(
        0, seg_row, part_o * w[..., None]
    )
    if sink is not None:
        den = den + torch.exp(sink - m_safe)
    o = num / den.clamp(min=1e-30)[..., None]
    lse = torch.where(den > 0, m_safe + den.clamp(min=1e-30).log(), float("-inf"))
    bad = torch.zeros_like(m).index_add(0, seg_row, part_bad.to(m.dtype)) > 0
    return o.masked_fill(bad[..., None], float("nan")), lse.masked_fill(bad, float("nan"))
