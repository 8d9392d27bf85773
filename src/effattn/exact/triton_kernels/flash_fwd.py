"""FlashAttention-2 forward kernel over the tiles of a BlockMask (Dao 2023, "FlashAttention-2: Faster
Attention with Better Parallelism and Work Partitioning").

One program per ``BLOCK_M`` query rows and (batch, query head). It walks the key blocks its query
block lists, ``BLOCK_N`` keys at a time, with the online softmax

    S = Q K_j^T * scale ; S = softcap(S) - slope_h |i + offset - j| ; S[masked] = -inf
    m' = max(m, rowmax S) ; l = l e^{m - m'} + rowsum e^{S - m'} ; acc = acc e^{m - m'} + e^{S - m'} V_j

and writes ``O = acc / l`` and ``LSE = m + log l`` (a learned sink logit joins ``l`` at the end). A
listed tile is *full* (code -1: only the bounds check), *partial with the built-in masks* (code -2:
causal, window and document ids evaluated from indices in the kernel) or *partial with a precomputed
bit tile* (code >= 0: the index of a ``[Q_BLOCK, KV_BLOCK]`` uint8 tile of ``BITS``, for a BlockMask
whose ``mask_mod`` is a Python callable). Scores and accumulators are float32; ``P`` is rounded to
the value dtype before ``P V`` as in FlashAttention. Masked scores are removed with ``where`` (never
multiplied by 0), and loads outside ``[0, T)`` are masked, so no value outside the listed, visible
keys reaches a row.

The kernel body is a plain function; :func:`effattn.exact.triton_kernels.jit` decorates it on first
use. :func:`flash_forward` in :mod:`effattn.exact.triton_kernels.flash` launches it.
"""

from __future__ import annotations

# bound to ``triton.language`` by :func:`effattn.exact.triton_kernels.jit` on first use, so importing this
# module never imports triton (which fixes its GPU-or-interpreter mode when it is first imported)
tl = None

__all__ = ["attn_fwd_kernel"]


def attn_fwd_kernel(
    Q, K, V, O, LSE, KV_IDX, KV_CNT, KV_TILE, BITS, DOC, SLOPES, SINKS,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
    s_ib, s_ih, s_iq, s_cb, s_ch,
    Tq, Tk, Hq, G, scale, softcap, offset, win_left, win_right,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, HAS_BITS: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, IO_DT: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    b64 = b.to(tl.int64)  # 64-bit tensor offsets: large batches and pools
    h = pid_bh % Hq
    hk = h // G
    row0 = pid_m * BLOCK_M
    qblk = row0 // Q_BLOCK
    rows = row0 + tl.arange(0, BLOCK_M)
    dk = tl.arange(0, D_PAD)
    dv = tl.arange(0, DV_PAD)
    cn = tl.arange(0, BLOCK_N)
    row_ok = rows < Tq
    q = tl.load(
        Q + b64 * s_qb + h * s_qh + rows[:, None] * s_qt + dk[None, :],
        mask=row_ok[:, None] & (dk[None, :] < D),
        other=0.0,
    )
    if UPCAST:  # the interpreter has no bf16 dot: exact bf16 values in fp32
        q = q.to(tl.float32)
    tab = b * s_ib + h * s_ih + qblk * s_iq
    cnt = tl.load(KV_CNT + b * s_cb + h * s_ch + qblk)
    if HAS_DOC:
        qdoc = tl.load(DOC + rows, mask=row_ok, other=-1)
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    k_base = K + b64 * s_kb + hk * s_kh
    v_base = V + b64 * s_vb + hk * s_vh
    for t in range(0, cnt):
        kb = tl.load(KV_IDX + tab + t)
        code = tl.load(KV_TILE + tab + t)
        for sub in range(0, KV_BLOCK // BLOCK_N):
            cols = kb * KV_BLOCK + sub * BLOCK_N + cn
            col_ok = cols < Tk
            k_ok = col_ok[None, :] & (dk[:, None] < D)
            k = tl.load(k_base + cols[None, :] * s_kt + dk[:, None], mask=k_ok, other=0.0)
            if UPCAST:  # the interpreter has no bf16 dot: exact bf16 values in fp32
                k = k.to(tl.float32)
            s = tl.dot(q, k, input_precision=PREC) * scale
            if HAS_SOFTCAP:
                s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
            if HAS_ALIBI:
                s = s - slope * tl.abs(rows[:, None] + offset - cols[None, :]).to(tl.float32)
            keep = col_ok[None, :] & row_ok[:, None]
            if code != -1:
                if HAS_BITS:
                    bits = tl.load(
                        BITS
                        + code * (Q_BLOCK * KV_BLOCK)
                        + (rows - qblk * Q_BLOCK)[:, None] * KV_BLOCK
                        + (cols - kb * KV_BLOCK)[None, :],
                        mask=keep,
                        other=0,
                    )
                    keep = keep & (bits != 0)
                else:
                    if CAUSAL:
                        keep = keep & (cols[None, :] <= rows[:, None] + offset)
                    if WINDOW:
                        dist = rows[:, None] + offset - cols[None, :]
                        keep = keep & (dist <= win_left) & (dist >= -win_right)
                    if HAS_DOC:
                        kdoc = tl.load(DOC + cols, mask=col_ok, other=-2)
                        keep = keep & (qdoc[:, None] == kdoc[None, :])
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v_ok = col_ok[:, None] & (dv[None, :] < DV)
            v = tl.load(v_base + cols[:, None] * s_vt + dv[None, :], mask=v_ok, other=0.0)
            if UPCAST:  # the interpreter has no bf16 dot: exact bf16 values in fp32
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(IO_DT).to(v.dtype), v, input_precision=PREC)
            m_i = m_new
    if HAS_SINKS:
        sink = tl.load(SINKS + h).to(tl.float32)
        m_f = tl.maximum(m_i, sink)
        alpha = tl.exp(m_i - m_f)
        l_i = l_i * alpha + tl.exp(sink - m_f)
        acc = acc * alpha[:, None]
        m_i = m_f
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(
        O + b64 * s_ob + h * s_oh + rows[:, None] * s_ot + dv[None, :],
        o.to(O.dtype.element_ty),
        mask=row_ok[:, None] & (dv[None, :] < DV),
    )
    tl.store(LSE + pid_bh * Tq + rows, lse, mask=row_ok)
