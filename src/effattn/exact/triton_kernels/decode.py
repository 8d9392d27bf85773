"""Split-KV decoding in Triton over a contiguous or a paged KV cache (Flash-Decoding).

Dao et al. 2023, "Flash-Decoding for long-context inference"; paged cache as in Kwon et al. 2023,
"Efficient Memory Management for Large Language Model Serving with PagedAttention". The cache of
each sequence is split into ``num_splits`` chunks; one program per (chunk, batch, kv head) attends
the group's ``G * T_new`` query rows (GQA: the query heads sharing a kv head run as one tile) to its
chunk with the online softmax and writes a partial ``(o_s, lse_s)``; a second kernel merges them,
one program per query row (the rule of :func:`effattn.exact.decode.merge_attention_states`; a learned
sink is one more part with an empty value; a NaN part, a row that saw a non-finite key, makes the row
NaN):

    lse = log sum_s exp(lse_s) ;  o = sum_s exp(lse_s - lse) o_s

Query ``t`` of sequence ``b`` sits at position ``p = L_b - T_new + t`` and sees keys ``j <= p`` (and
``p - j <= left`` with a window), scores ``softcap(q k^T * scale) - slope_h |p - j|``. Slots at or
past ``L_b`` are never loaded. A non-finite key or value inside the cache poisons only the rows that
see it (those rows are NaN, as :mod:`effattn.exact.nonfinite` states): the kernel zeroes it and marks
the rows whose mask reaches it, so ``0 * NaN`` never reaches another row.
"""

from __future__ import annotations

import torch

from effattn._checks import check_cache_seqlens, check_positive_int, check_qkv, check_scale, check_tensor
from effattn.exact.masks import window_bounds
from effattn.exact.triton_kernels import dot_flags, jit, out_dtype, triton_status

# bound to ``triton.language`` by :func:`effattn.exact.triton_kernels.jit` on first use
tl = None

__all__ = ["decode_kernel", "merge_kernel", "triton_decode_attention"]


def decode_kernel(
    Q, K, V, LENS, BT, O_PART, LSE_PART, SLOPES,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
    B, Tn, Hq, Hkv, G, chunk, scale, softcap, win_left,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr, WINDOW: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, IO_DT: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    b64 = b.to(tl.int64)  # 64-bit tensor offsets: large batches and pools
    hk = pid_bh % Hkv
    L = tl.load(LENS + b)
    r = tl.arange(0, ROWS)
    row_ok = r < G * Tn
    g = r // Tn
    t = r % Tn
    h = hk * G + g
    qpos = L - Tn + t
    dk = tl.arange(0, D_PAD)
    dv = tl.arange(0, DV_PAD)
    cn = tl.arange(0, BLOCK_N)
    q = tl.load(
        Q + b64 * s_qb + t[:, None] * s_qt + h[:, None] * s_qh + dk[None, :],
        mask=row_ok[:, None] & (dk[None, :] < D),
        other=0.0,
    )
    if UPCAST:  # the interpreter has no bf16 dot: exact bf16 values in fp32
        q = q.to(tl.float32)
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h, mask=row_ok, other=0.0).to(tl.float32)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DV_PAD], tl.float32)
    poisoned = tl.zeros([ROWS], tl.int32)
    start = split * chunk
    end = tl.minimum(start + chunk, L)
    for j0 in range(start, end, BLOCK_N):
        pos = j0 + cn
        col_ok = pos < end
        if PAGED:
            phys = tl.load(BT + b * s_bt + pos // PAGE, mask=col_ok, other=0)
            k_off = phys.to(tl.int64) * s_kb + (pos % PAGE) * s_kt
            v_off = phys.to(tl.int64) * s_vb + (pos % PAGE) * s_vt
        else:
            k_off = b64 * s_kb + pos * s_kt
            v_off = b64 * s_vb + pos * s_vt
        k = tl.load(K + k_off[None, :] + hk * s_kh + dk[:, None], mask=col_ok[None, :] & (dk[:, None] < D), other=0.0)
        if UPCAST:  # the interpreter has no bf16 dot: exact bf16 values in fp32
            k = k.to(tl.float32)
        v = tl.load(V + v_off[:, None] + hk * s_vh + dv[None, :], mask=col_ok[:, None] & (dv[None, :] < DV), other=0.0)
        if UPCAST:  # the interpreter has no bf16 dot: exact bf16 values in fp32
            v = v.to(tl.float32)
        kf = k.to(tl.float32)
        vf = v.to(tl.float32)
        k_bad = tl.max(((kf != kf) | (tl.abs(kf) == float("inf"))).to(tl.int32), 0)
        v_bad = tl.max(((vf != vf) | (tl.abs(vf) == float("inf"))).to(tl.int32), 1)
        bad = (k_bad + v_bad) > 0  # [BLOCK_N]
        k = tl.where(bad[None, :], 0.0, k).to(k.dtype)
        v = tl.where(bad[:, None], 0.0, v).to(v.dtype)
        s = tl.dot(q, k, input_precision=PREC) * scale
        if HAS_SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
        if HAS_ALIBI:
            s = s - slope[:, None] * tl.abs(qpos[:, None] - pos[None, :]).to(tl.float32)
        keep = col_ok[None, :] & row_ok[:, None] & (pos[None, :] <= qpos[:, None])
        if WINDOW:
            keep = keep & (qpos[:, None] - pos[None, :] <= win_left)
        poisoned = tl.maximum(poisoned, tl.max((keep & bad[None, :]).to(tl.int32), 1))
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(IO_DT).to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    lse = tl.where(poisoned > 0, float("nan"), lse)
    o_off = (((split * B + b) * Tn + t) * Hq + h) * DV
    tl.store(O_PART + o_off[:, None] + dv[None, :], o, mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(LSE_PART + ((split * B + b) * Hq + h) * Tn + t, lse, mask=row_ok)


def merge_kernel(
    O_PART, LSE_PART, O, LSE, SINKS, B, Tn, Hq, S,
    DV: tl.constexpr, DV_PAD: tl.constexpr, S_PAD: tl.constexpr, HAS_SINKS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # one query row: (b, t, h)
    h = pid % Hq
    t = (pid // Hq) % Tn
    b = pid // (Hq * Tn)
    sp = tl.arange(0, S_PAD)
    dv = tl.arange(0, DV_PAD)
    lse = tl.load(LSE_PART + ((sp * B + b) * Hq + h) * Tn + t, mask=sp < S, other=float("-inf"))
    o_s = tl.load(
        O_PART + (((sp[:, None] * B + b) * Tn + t) * Hq + h) * DV + dv[None, :],
        mask=(sp[:, None] < S) & (dv[None, :] < DV),
        other=0.0,
    )
    poisoned = tl.max((lse != lse).to(tl.int32), 0) > 0
    lse = tl.where(lse != lse, float("-inf"), lse)
    m = tl.max(lse, 0)
    if HAS_SINKS:
        sink = tl.load(SINKS + h).to(tl.float32)
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    total = tl.sum(w, 0)
    if HAS_SINKS:
        total += tl.exp(sink - m_safe)
    has = total > 0.0
    o = tl.sum(w[:, None] * o_s, 0) / tl.where(has, total, 1.0)
    out = tl.where(has, m_safe + tl.log(tl.where(has, total, 1.0)), float("-inf"))
    o = tl.where(poisoned, float("nan"), o)
    out = tl.where(poisoned, float("nan"), out)
    tl.store(O + pid * DV + dv, o.to(O.dtype.element_ty), mask=dv < DV)
    tl.store(LSE + (b * Hq + h) * Tn + t, out)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def triton_decode_attention(
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
    num_splits: int | None = None,
    return_lse: bool = False,
):
    """Split-KV decode attention in Triton over a contiguous or paged cache (inference: no gradient).

    Same semantics as :func:`effattn.exact.decode.decode_attention` (query ``t`` at position
    ``cache_seqlens - T_new + t`` attends causally), plus ``alibi_slopes`` and paged caches.

    Args:
        q: ``[B, T_new, H_q, D]``.
        k_cache, v_cache: contiguous ``[B, T_max, H_kv, D]`` / ``[B, T_max, H_kv, D_v]``; or, with
            ``block_table``, the block pools ``[num_blocks, block_size, H_kv, D]`` / ``[..., D_v]`` of
            :class:`effattn.kv.PagedKVCache` (``key_blocks``, ``value_blocks``).
        cache_seqlens: ``[B]`` int lengths (default ``T_max``; required with ``block_table``).
        block_table: ``[B, max_blocks]`` int physical block of each logical block (``-1`` padding), as
            ``PagedKVCache.block_tables(seq_ids)`` returns.
        window: only the last ``window`` keys up to each query. softcap, sinks: as in ``attention()``.
        alibi_slopes: ``[H_q]``: ``score - slope_h * |p - j|``.
        num_splits: KV chunks (default about one per 512 cached tokens).
    Returns ``o [B, T_new, H_q, D_v]`` (and ``lse [B, H_q, T_new]`` float32 with ``return_lse``).

    Runs on CUDA tensors, or CPU tensors in a process started with ``TRITON_INTERPRET=1``.

    Example::

        >>> from effattn.exact.triton_kernels import triton_status
        >>> kc = torch.randn(2, 40, 1, 16); q = torch.randn(2, 1, 2, 16)
        >>> if triton_status(q.device)[0]:
        ...     o = triton_decode_attention(q, kc, kc, torch.tensor([40, 17]), num_splits=2)
        ...     assert o.shape == (2, 1, 2, 16)
    """
    ok, why = triton_status(q.device)
    if not ok:
        raise RuntimeError(f"triton_decode_attention cannot run on {q.device.type} tensors: {why}")
    check_tensor("q", q, 4, "[batch, new_tokens, heads_q, head_dim]")
    B, Tn, Hq, D = q.shape
    if block_table is None:
        _, _, Tmax, _, Hkv, _, Dv = check_qkv(q, k_cache, v_cache)
        page = 1
    else:
        check_tensor("k_cache", k_cache, 4, "[num_blocks, block_size, heads_kv, head_dim]")
        check_tensor("v_cache", v_cache, 4, "[num_blocks, block_size, heads_kv, head_dim_v]")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required with block_table (the pool holds no lengths)")
        if block_table.dim() != 2 or block_table.shape[0] != B or block_table.dtype.is_floating_point:
            raise ValueError(
                f"block_table must be an int tensor [batch={B}, max_blocks], got {tuple(block_table.shape)}"
            )
        page, Hkv, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
        if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[3] != D or Hq % Hkv:
            raise ValueError(
                f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} do not fit q {tuple(q.shape)}"
            )
        Tmax = block_table.shape[1] * page
    scale = check_scale(scale, D)
    cache_seqlens = check_cache_seqlens(cache_seqlens, B, Tn, Tmax, q.device)
    for name, t in (("sinks", sinks), ("alibi_slopes", alibi_slopes)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (Hq,)):
            raise ValueError(f"{name} must be a tensor of shape [heads_q] = [{Hq}], got {getattr(t, 'shape', t)!r}")
    left = window_bounds(window, True)[0] if window is not None else 0
    L = int(cache_seqlens.max())
    if num_splits is None:
        num_splits = max(1, -(-L // 512))
    check_positive_int("num_splits", num_splits)
    BLOCK_N = 16 if page < 32 and block_table is not None else 32
    per_split = -(-L // num_splits)
    chunk = -(-per_split // BLOCK_N) * BLOCK_N  # a multiple of the tile
    S = -(-L // chunk)
    G = Hq // Hkv
    dev = q.device
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    lens = cache_seqlens.to(device=dev, dtype=torch.int32).contiguous()
    bt = block_table.to(device=dev, dtype=torch.int32).clamp(min=0).contiguous() if block_table is not None else lens
    o_part = torch.empty(S, B, Tn, Hq, Dv, dtype=torch.float32, device=dev)
    lse_part = torch.empty(S, B, Hq, Tn, dtype=torch.float32, device=dev)
    slopes = alibi_slopes.float().contiguous() if alibi_slopes is not None else o_part
    jit(decode_kernel)[(S, B * Hkv)](
        q, k_cache, v_cache, lens, bt, o_part, lse_part, slopes,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), bt.stride(0),
        B, Tn, Hq, Hkv, G, chunk, scale, float(softcap) if softcap is not None else 1.0, left,
        D=D, DV=Dv, D_PAD=_pow2(D), DV_PAD=_pow2(Dv), ROWS=_pow2(G * Tn), BLOCK_N=BLOCK_N, PAGE=page,
        PAGED=block_table is not None, WINDOW=window is not None, HAS_ALIBI=alibi_slopes is not None,
        HAS_SOFTCAP=softcap is not None, **dot_flags(q.dtype),
    )  # fmt: skip
    o = torch.empty(B, Tn, Hq, Dv, dtype=out_dtype(q.dtype), device=dev)
    lse = torch.empty(B, Hq, Tn, dtype=torch.float32, device=dev)
    sinks_t = sinks.float().contiguous() if sinks is not None else lse
    jit(merge_kernel)[(B * Tn * Hq,)](
        o_part, lse_part, o, lse, sinks_t, B, Tn, Hq, S,
        DV=Dv, DV_PAD=_pow2(Dv), S_PAD=max(2, 1 << (S - 1).bit_length()), HAS_SINKS=sinks is not None,
    )  # fmt: skip
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o
