"""FlashAttention-2 backward kernels over the tiles of a BlockMask: a dK/dV pass and a dQ pass.

Both recompute ``P = exp(S - LSE)`` tile by tile from the saved log-sum-exp (no ``T x T`` matrix is
stored), with ``delta_i = sum_d dO_id O_id`` computed beforehand:

    dV_j += P^T dO ; dP = dO V_j^T ; dS = P * (dP - delta) * softcap'(S) ;
    dK_j += dS^T Q * scale (dK/dV pass) ; dQ_i += dS K_j * scale (dQ pass)

The dK/dV pass runs one program per ``BLOCK_N`` keys and (batch, kv head); it loops over the query
heads of its GQA group and over the query blocks that list its key block (the BlockMask transposed
on the host), so each dK/dV row is written once. The dQ pass runs one program per ``BLOCK_M``
queries and walks the same key lists as the forward. Two passes instead of FlashAttention-2's
atomic adds of dQ: every gradient element is accumulated by one program in a fixed order, so the
backward is bitwise deterministic, at the price of computing ``S`` and ``dP`` twice.

Tile codes as in :mod:`effattn.exact.triton_kernels.flash_fwd` (-1 full, -2 built-in masks,
>= 0 bit tile).
"""

from __future__ import annotations

# bound to ``triton.language`` by :func:`effattn.exact.triton_kernels.jit` on first use, so importing this
# module never imports triton (which fixes its GPU-or-interpreter mode when it is first imported)
tl = None

__all__ = ["attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"]


def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_IDX, Q_CNT, Q_TILE, BITS, DOC, SLOPES,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_dob, s_dot, s_doh,
    s_dkb, s_dkt, s_dkh, s_dvb, s_dvt, s_dvh,
    s_ib, s_ih, s_ik, s_cb, s_ch,
    Tq, Tk, Hq, Hkv, G, scale, softcap, offset, win_left, win_right,
    D: tl.constexpr, DVD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, HAS_BITS: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, IO_DT: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    b64 = b.to(tl.int64)  # 64-bit tensor offsets: large batches and pools
    hk = pid_bh % Hkv
    col0 = pid_n * BLOCK_N
    kvblk = col0 // KV_BLOCK
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < Tk
    dk_ = tl.arange(0, D_PAD)
    dv_ = tl.arange(0, DV_PAD)
    rm = tl.arange(0, BLOCK_M)
    # K and V as [D, BLOCK_N] (for S = Q K^T and dP = dO V^T)
    kT = tl.load(
        K + b64 * s_kb + hk * s_kh + cols[None, :] * s_kt + dk_[:, None],
        mask=col_ok[None, :] & (dk_[:, None] < D),
        other=0.0,
    )
    if UPCAST:  # the interpreter has no bf16 dot: exact bf16 values in fp32
        kT = kT.to(tl.float32)
    vT = tl.load(
        V + b64 * s_vb + hk * s_vh + cols[None, :] * s_vt + dv_[:, None],
        mask=col_ok[None, :] & (dv_[:, None] < DVD),
        other=0.0,
    )
    if UPCAST:  # the interpreter has no bf16 dot: exact bf16 values in fp32
        vT = vT.to(tl.float32)
    acc_dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    acc_dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    if HAS_DOC:
        kdoc = tl.load(DOC + cols, mask=col_ok, other=-2)
    for g in range(0, G):
        h = hk * G + g
        tab = b * s_ib + h * s_ih + kvblk * s_ik
        cnt = tl.load(Q_CNT + b * s_cb + h * s_ch + kvblk)
        if HAS_ALIBI:
            slope = tl.load(SLOPES + h).to(tl.float32)
        for t in range(0, cnt):
            qb = tl.load(Q_IDX + tab + t)
            code = tl.load(Q_TILE + tab + t)
            for sub in range(0, Q_BLOCK // BLOCK_M):
                rows = qb * Q_BLOCK + sub * BLOCK_M + rm
                row_ok = rows < Tq
                q = tl.load(
                    Q + b64 * s_qb + h * s_qh + rows[:, None] * s_qt + dk_[None, :],
                    mask=row_ok[:, None] & (dk_[None, :] < D),
                    other=0.0,
                )
                if UPCAST:  # the interpreter has no bf16 dot: exact bf16 values in fp32
                    q = q.to(tl.float32)
                do = tl.load(
                    DO + b64 * s_dob + h * s_doh + rows[:, None] * s_dot + dv_[None, :],
                    mask=row_ok[:, None] & (dv_[None, :] < DVD),
                    other=0.0,
                )
                if UPCAST:  # the interpreter has no bf16 dot: exact bf16 values in fp32
                    do = do.to(tl.float32)
                lse = tl.load(LSE + (b * Hq + h) * Tq + rows, mask=row_ok, other=float("inf"))
                lse = tl.where(lse == float("-inf"), float("inf"), lse)
                delta = tl.load(DELTA + (b * Hq + h) * Tq + rows, mask=row_ok, other=0.0)
                s = tl.dot(q, kT, input_precision=PREC) * scale
                if HAS_SOFTCAP:
                    th = 2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0
                    s = softcap * th
                if HAS_ALIBI:
                    s = s - slope * tl.abs(rows[:, None] + offset - cols[None, :]).to(tl.float32)
                keep = col_ok[None, :] & row_ok[:, None]
                if code != -1:
                    if HAS_BITS:
                        bits = tl.load(
                            BITS
                            + code * (Q_BLOCK * KV_BLOCK)
                            + (rows - qb * Q_BLOCK)[:, None] * KV_BLOCK
                            + (cols - kvblk * KV_BLOCK)[None, :],
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
                            qdoc = tl.load(DOC + rows, mask=row_ok, other=-1)
                            keep = keep & (qdoc[:, None] == kdoc[None, :])
                p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
                acc_dv += tl.dot(tl.trans(p.to(IO_DT).to(do.dtype)), do, input_precision=PREC)
                dp = tl.dot(do, vT, input_precision=PREC)
                ds = p * (dp - delta[:, None])
                if HAS_SOFTCAP:
                    ds = ds * (1.0 - th * th)
                acc_dk += tl.dot(tl.trans(ds.to(IO_DT).to(q.dtype)), q, input_precision=PREC)
    acc_dk = acc_dk * scale
    tl.store(
        DK + b64 * s_dkb + hk * s_dkh + cols[:, None] * s_dkt + dk_[None, :],
        acc_dk.to(DK.dtype.element_ty),
        mask=col_ok[:, None] & (dk_[None, :] < D),
    )
    tl.store(
        DV + b64 * s_dvb + hk * s_dvh + cols[:, None] * s_dvt + dv_[None, :],
        acc_dv.to(DV.dtype.element_ty),
        mask=col_ok[:, None] & (dv_[None, :] < DVD),
    )


def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_IDX, KV_CNT, KV_TILE, BITS, DOC, SLOPES,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_dob, s_dot, s_doh, s_dqb, s_dqt, s_dqh,
    s_ib, s_ih, s_iq, s_cb, s_ch,
    Tq, Tk, Hq, G, scale, softcap, offset, win_left, win_right,
    D: tl.constexpr, DVD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, HAS_BITS: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr,
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
    row_ok = rows < Tq
    dk_ = tl.arange(0, D_PAD)
    dv_ = tl.arange(0, DV_PAD)
    cn = tl.arange(0, BLOCK_N)
    q = tl.load(
        Q + b64 * s_qb + h * s_qh + rows[:, None] * s_qt + dk_[None, :],
        mask=row_ok[:, None] & (dk_[None, :] < D),
        other=0.0,
    )
    if UPCAST:  # the interpreter has no bf16 dot: exact bf16 values in fp32
        q = q.to(tl.float32)
    do = tl.load(
        DO + b64 * s_dob + h * s_doh + rows[:, None] * s_dot + dv_[None, :],
        mask=row_ok[:, None] & (dv_[None, :] < DVD),
        other=0.0,
    )
    if UPCAST:  # the interpreter has no bf16 dot: exact bf16 values in fp32
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_bh * Tq + rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + pid_bh * Tq + rows, mask=row_ok, other=0.0)
    tab = b * s_ib + h * s_ih + qblk * s_iq
    cnt = tl.load(KV_CNT + b * s_cb + h * s_ch + qblk)
    if HAS_DOC:
        qdoc = tl.load(DOC + rows, mask=row_ok, other=-1)
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h).to(tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    k_base = K + b64 * s_kb + hk * s_kh
    v_base = V + b64 * s_vb + hk * s_vh
    for t in range(0, cnt):
        kb = tl.load(KV_IDX + tab + t)
        code = tl.load(KV_TILE + tab + t)
        for sub in range(0, KV_BLOCK // BLOCK_N):
            cols = kb * KV_BLOCK + sub * BLOCK_N + cn
            col_ok = cols < Tk
            k_ok = col_ok[None, :] & (dk_[:, None] < D)
            kT = tl.load(k_base + cols[None, :] * s_kt + dk_[:, None], mask=k_ok, other=0.0)
            if UPCAST:  # the interpreter has no bf16 dot: exact bf16 values in fp32
                kT = kT.to(tl.float32)
            v_ok = col_ok[None, :] & (dv_[:, None] < DVD)
            vT = tl.load(v_base + cols[None, :] * s_vt + dv_[:, None], mask=v_ok, other=0.0)
            if UPCAST:  # the interpreter has no bf16 dot: exact bf16 values in fp32
                vT = vT.to(tl.float32)
            s = tl.dot(q, kT, input_precision=PREC) * scale
            if HAS_SOFTCAP:
                th = 2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0
                s = softcap * th
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
            p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, vT, input_precision=PREC)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - th * th)
            acc += tl.dot(ds.to(IO_DT).to(q.dtype), tl.trans(kT), input_precision=PREC)
    acc = acc * scale
    tl.store(
        DQ + b64 * s_dqb + h * s_dqh + rows[:, None] * s_dqt + dk_[None, :],
        acc.to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & (dk_[None, :] < D),
    )
