"""The kernel bodies of the linear Triton kernels: plain functions, decorated by
:func:`effattn.linear._triton.backend.jit` when first launched (see :mod:`effattn.linear._triton.chunk`).

Every kernel runs one program per (batch row, head): ``q, k [B, T, H, K]``, ``v [B, T, H, V]``,
gates and betas ``[B, T, H]``, states ``[B, H, K, V]`` (entering states ``[B, H, NT, K, V]``), all
contiguous float32; ``C`` is the chunk length, ``BK``/``BV`` the padded K/V tile sizes.
"""

from __future__ import annotations

# bound to ``triton.language`` by ``jit`` on first launch, so importing this module never imports
# triton (which fixes its GPU-or-interpreter mode when it is first imported)
tl = None

__all__ = [
    "gated_delta_bwd_kernel",
    "gated_delta_fwd_kernel",
    "recurrent_kernel",
    "scalar_decay_bwd_kernel",
    "scalar_decay_fwd_kernel",
]


def scalar_decay_fwd_kernel(
    q,
    k,
    v,
    g,
    s0,
    o,
    sfin,
    states,
    T,
    H,
    K,
    V,
    NT,
    scale,
    HAS_S0: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk = rk < K
    mv = rv < V
    kv_off = rk[:, None] * V + rv[None, :]
    kv_mask = mk[:, None] & mv[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0:
        S = tl.load(s0 + bh * K * V + kv_off, mask=kv_mask, other=0.0)
    causal = rc[:, None] >= rc[None, :]
    strict = rc[:, None] > rc[None, :]
    for n in range(NT):
        t = n * C + rc
        mt = t < T
        row = (b * T + t) * H + h
        bq = tl.load(q + row[:, None] * K + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        bk = tl.load(k + row[:, None] * K + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        bv = tl.load(v + row[:, None] * V + rv[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
        bg = tl.load(g + row, mask=mt, other=0.0)
        tl.store(states + (bh * NT + n) * K * V + kv_off, S, mask=kv_mask)
        G = tl.cumsum(bg, 0)
        G_last = tl.sum(bg, 0)
        # segment sums seg_ij = g_{j+1} + ... + g_i (a masked cumsum, no difference of two large G)
        seg = tl.cumsum(tl.where(strict, bg[:, None], 0.0), 0)
        gam = tl.where(causal, tl.exp(seg), 0.0)  # exp(G_i - G_j) for i >= j
        e_end = tl.exp(tl.sum(tl.where(rc[:, None] == C - 1, seg, 0.0), 0))  # exp(G_C - G_j)
        A = tl.dot(bq, tl.trans(bk), input_precision="ieee") * gam
        bo = tl.dot(A, bv, input_precision="ieee")
        bo += tl.dot(bq * tl.exp(G)[:, None], S, input_precision="ieee")
        tl.store(o + row[:, None] * V + rv[None, :], bo * scale, mask=mt[:, None] & mv[None, :])
        kd = bk * e_end[:, None]
        S = S * tl.exp(G_last) + tl.dot(tl.trans(kd), bv, input_precision="ieee")
    tl.store(sfin + bh * K * V + kv_off, S, mask=kv_mask)


def scalar_decay_bwd_kernel(
    q,
    k,
    v,
    g,
    states,
    do,
    dsfin,
    dq,
    dk,
    dv,
    dg,
    ds0,
    T,
    H,
    K,
    V,
    NT,
    scale,
    HAS_DSFIN: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk = rk < K
    mv = rv < V
    kv_off = rk[:, None] * V + rv[None, :]
    kv_mask = mk[:, None] & mv[None, :]
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DSFIN:
        dS = tl.load(dsfin + bh * K * V + kv_off, mask=kv_mask, other=0.0)
    causal = rc[:, None] >= rc[None, :]
    strict = rc[:, None] > rc[None, :]
    for i in range(NT):
        n = NT - 1 - i
        t = n * C + rc
        mt = t < T
        row = (b * T + t) * H + h
        m_qk = mt[:, None] & mk[None, :]
        m_v = mt[:, None] & mv[None, :]
        bq = tl.load(q + row[:, None] * K + rk[None, :], mask=m_qk, other=0.0)
        bk = tl.load(k + row[:, None] * K + rk[None, :], mask=m_qk, other=0.0)
        bv = tl.load(v + row[:, None] * V + rv[None, :], mask=m_v, other=0.0)
        bdo = tl.load(do + row[:, None] * V + rv[None, :], mask=m_v, other=0.0)
        bg = tl.load(g + row, mask=mt, other=0.0)
        S = tl.load(states + (bh * NT + n) * K * V + kv_off, mask=kv_mask, other=0.0)
        G = tl.cumsum(bg, 0)
        G_last = tl.sum(bg, 0)
        eG = tl.exp(G)
        d_last = tl.exp(G_last)
        # segment sums seg_ij = g_{j+1} + ... + g_i (a masked cumsum, no difference of two large G)
        seg = tl.cumsum(tl.where(strict, bg[:, None], 0.0), 0)
        gam = tl.where(causal, tl.exp(seg), 0.0)  # exp(G_i - G_j) for i >= j
        e_end = tl.exp(tl.sum(tl.where(rc[:, None] == C - 1, seg, 0.0), 0))  # exp(G_C - G_j)
        A = tl.dot(bq, tl.trans(bk), input_precision="ieee") * gam  # decayed scores
        dA = tl.dot(bdo, tl.trans(bv), input_precision="ieee") * scale  # d o / d A (before the decay)
        dP = dA * gam  # gradient of q k^T
        dqg = tl.dot(bdo, tl.trans(S), input_precision="ieee") * scale  # gradient of q e^G
        kd = bk * e_end[:, None]
        dkd = tl.dot(bv, tl.trans(dS), input_precision="ieee")  # gradient of k e^{G_C - G}
        bdq = tl.dot(dP, bk, input_precision="ieee") + dqg * eG[:, None]
        bdk = tl.dot(tl.trans(dP), bq, input_precision="ieee") + dkd * e_end[:, None]
        bdv = tl.dot(tl.trans(A), bdo, input_precision="ieee") * scale + tl.dot(kd, dS, input_precision="ieee")
        # gradient of the cumulated gates G_i (the diagonal exp(0) is a constant: left out)
        Z = tl.where(strict, dA * A, 0.0)
        term_k = tl.sum(dkd * kd, 1)
        dG = tl.sum(Z, 1) - tl.sum(Z, 0) + tl.sum(dqg * bq * eG[:, None], 1) - term_k
        dG_last = tl.sum(term_k, 0) + d_last * tl.sum(tl.sum(S * dS, 1), 0)
        # g_t enters every G_i with i >= t (and G_C): reverse cumulative sum
        bdg = tl.sum(dG, 0) - tl.cumsum(dG, 0) + dG + dG_last
        tl.store(dq + row[:, None] * K + rk[None, :], bdq, mask=m_qk)
        tl.store(dk + row[:, None] * K + rk[None, :], bdk, mask=m_qk)
        tl.store(dv + row[:, None] * V + rv[None, :], bdv, mask=m_v)
        tl.store(dg + row, bdg, mask=mt)
        dS = dS * d_last + tl.dot(tl.trans(bq * eG[:, None]), bdo, input_precision="ieee") * scale
    tl.store(ds0 + bh * K * V + kv_off, dS, mask=kv_mask)


def gated_delta_fwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    s0,
    o,
    sfin,
    states,
    T,
    H,
    K,
    V,
    NT,
    scale,
    HAS_S0: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk = rk < K
    mv = rv < V
    kv_off = rk[:, None] * V + rv[None, :]
    kv_mask = mk[:, None] & mv[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0:
        S = tl.load(s0 + bh * K * V + kv_off, mask=kv_mask, other=0.0)
    causal = rc[:, None] >= rc[None, :]
    strict = rc[:, None] > rc[None, :]
    eye = tl.where(rc[:, None] == rc[None, :], 1.0, 0.0)
    for n in range(NT):
        t = n * C + rc
        mt = t < T
        row = (b * T + t) * H + h
        m_qk = mt[:, None] & mk[None, :]
        m_v = mt[:, None] & mv[None, :]
        bq = tl.load(q + row[:, None] * K + rk[None, :], mask=m_qk, other=0.0)
        bk = tl.load(k + row[:, None] * K + rk[None, :], mask=m_qk, other=0.0)
        bv = tl.load(v + row[:, None] * V + rv[None, :], mask=m_v, other=0.0)
        bg = tl.load(g + row, mask=mt, other=0.0)
        bb = tl.load(beta + row, mask=mt, other=0.0)
        tl.store(states + (bh * NT + n) * K * V + kv_off, S, mask=kv_mask)
        G = tl.cumsum(bg, 0)
        G_last = tl.sum(bg, 0)
        eG = tl.exp(G)
        # segment sums seg_ij = g_{j+1} + ... + g_i (a masked cumsum, no difference of two large G)
        seg = tl.cumsum(tl.where(strict, bg[:, None], 0.0), 0)
        gam = tl.where(causal, tl.exp(seg), 0.0)  # exp(G_i - G_j) for i >= j
        e_end = tl.exp(tl.sum(tl.where(rc[:, None] == C - 1, seg, 0.0), 0))  # exp(G_C - G_j)
        kk = tl.dot(bk, tl.trans(bk), input_precision="ieee") * gam
        A = tl.where(strict, bb[:, None] * kk, 0.0)
        # (I + A)^{-1} by forward substitution, row i from the rows above it (A strictly lower)
        Tinv = eye
        for i in range(1, C):
            a_i = tl.sum(tl.where(rc[:, None] == i, A, 0.0), 0)  # row i of A, [C]
            upd = tl.sum(a_i[:, None] * Tinv, 0)  # sum_j a_ij Tinv_j
            Tinv = tl.where(rc[:, None] == i, Tinv - upd[None, :], Tinv)
        W = tl.dot(Tinv, bk * (bb * eG)[:, None], input_precision="ieee")
        U = tl.dot(Tinv, bv * bb[:, None], input_precision="ieee")
        delta = U - tl.dot(W, S, input_precision="ieee")
        qk = tl.dot(bq, tl.trans(bk), input_precision="ieee") * gam
        bo = tl.dot(bq * eG[:, None], S, input_precision="ieee") + tl.dot(qk, delta, input_precision="ieee")
        tl.store(o + row[:, None] * V + rv[None, :], bo * scale, mask=m_v)
        kd = bk * e_end[:, None]
        S = S * tl.exp(G_last) + tl.dot(tl.trans(kd), delta, input_precision="ieee")
    tl.store(sfin + bh * K * V + kv_off, S, mask=kv_mask)


def gated_delta_bwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    states,
    do,
    dsfin,
    dq,
    dk,
    dv,
    dg,
    dbeta,
    ds0,
    T,
    H,
    K,
    V,
    NT,
    scale,
    HAS_DSFIN: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk = rk < K
    mv = rv < V
    kv_off = rk[:, None] * V + rv[None, :]
    kv_mask = mk[:, None] & mv[None, :]
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DSFIN:
        dS = tl.load(dsfin + bh * K * V + kv_off, mask=kv_mask, other=0.0)
    causal = rc[:, None] >= rc[None, :]
    strict = rc[:, None] > rc[None, :]
    eye = tl.where(rc[:, None] == rc[None, :], 1.0, 0.0)
    for it in range(NT):
        n = NT - 1 - it
        t = n * C + rc
        mt = t < T
        row = (b * T + t) * H + h
        m_qk = mt[:, None] & mk[None, :]
        m_v = mt[:, None] & mv[None, :]
        bq = tl.load(q + row[:, None] * K + rk[None, :], mask=m_qk, other=0.0)
        bk = tl.load(k + row[:, None] * K + rk[None, :], mask=m_qk, other=0.0)
        bv = tl.load(v + row[:, None] * V + rv[None, :], mask=m_v, other=0.0)
        bdo = tl.load(do + row[:, None] * V + rv[None, :], mask=m_v, other=0.0)
        bg = tl.load(g + row, mask=mt, other=0.0)
        bb = tl.load(beta + row, mask=mt, other=0.0)
        S = tl.load(states + (bh * NT + n) * K * V + kv_off, mask=kv_mask, other=0.0)
        # recompute the chunk's forward quantities
        G = tl.cumsum(bg, 0)
        G_last = tl.sum(bg, 0)
        eG = tl.exp(G)
        d_last = tl.exp(G_last)
        # segment sums seg_ij = g_{j+1} + ... + g_i (a masked cumsum, no difference of two large G)
        seg = tl.cumsum(tl.where(strict, bg[:, None], 0.0), 0)
        gam = tl.where(causal, tl.exp(seg), 0.0)  # exp(G_i - G_j) for i >= j
        e_end = tl.exp(tl.sum(tl.where(rc[:, None] == C - 1, seg, 0.0), 0))  # exp(G_C - G_j)
        kk = tl.dot(bk, tl.trans(bk), input_precision="ieee") * gam
        A = tl.where(strict, bb[:, None] * kk, 0.0)
        Tinv = eye
        for i in range(1, C):
            a_i = tl.sum(tl.where(rc[:, None] == i, A, 0.0), 0)
            upd = tl.sum(a_i[:, None] * Tinv, 0)
            Tinv = tl.where(rc[:, None] == i, Tinv - upd[None, :], Tinv)
        kw = bk * (bb * eG)[:, None]
        vb = bv * bb[:, None]
        W = tl.dot(Tinv, kw, input_precision="ieee")
        U = tl.dot(Tinv, vb, input_precision="ieee")
        delta = U - tl.dot(W, S, input_precision="ieee")
        qk = tl.dot(bq, tl.trans(bk), input_precision="ieee") * gam
        kd = bk * e_end[:, None]
        qg = bq * eG[:, None]
        # gradients of the chunk's outputs (o, S') with respect to its intermediates
        d_delta = tl.dot(tl.trans(qk), bdo, input_precision="ieee") * scale + tl.dot(kd, dS, input_precision="ieee")
        dkd = tl.dot(delta, tl.trans(dS), input_precision="ieee")
        dqg = tl.dot(bdo, tl.trans(S), input_precision="ieee") * scale
        dqk = tl.where(causal, tl.dot(bdo, tl.trans(delta), input_precision="ieee") * scale, 0.0)
        dW = -tl.dot(d_delta, tl.trans(S), input_precision="ieee")
        dkw = tl.dot(tl.trans(Tinv), dW, input_precision="ieee")
        dvb = tl.dot(tl.trans(Tinv), d_delta, input_precision="ieee")
        dTinv = tl.dot(dW, tl.trans(kw), input_precision="ieee") + tl.dot(d_delta, tl.trans(vb), input_precision="ieee")
        dA = -tl.dot(tl.trans(Tinv), tl.dot(dTinv, tl.trans(Tinv), input_precision="ieee"), input_precision="ieee")
        dA = tl.where(strict, dA, 0.0)
        dkk = dA * bb[:, None]
        # q, k, v, beta
        dP_kk = dkk * gam
        dP_qk = dqk * gam
        bdq = tl.dot(dP_qk, bk, input_precision="ieee") + dqg * eG[:, None]
        bdk = tl.dot(dP_kk, bk, input_precision="ieee") + tl.dot(tl.trans(dP_kk), bk, input_precision="ieee")
        bdk += tl.dot(tl.trans(dP_qk), bq, input_precision="ieee")
        bdk += dkw * (bb * eG)[:, None] + dkd * e_end[:, None]
        bdv = dvb * bb[:, None]
        bdb = tl.sum(dA * kk, 1) + tl.sum(dkw * bk * eG[:, None], 1) + tl.sum(dvb * bv, 1)
        # cumulated gates (the diagonal exp(0) is a constant: left out)
        Z = tl.where(strict, dkk * kk + dqk * qk, 0.0)
        term_k = tl.sum(dkd * kd, 1)
        dG = tl.sum(Z, 1) - tl.sum(Z, 0) + tl.sum(dqg * qg, 1) + tl.sum(dkw * kw, 1) - term_k
        dG_last = tl.sum(term_k, 0) + d_last * tl.sum(tl.sum(S * dS, 1), 0)
        bdg = tl.sum(dG, 0) - tl.cumsum(dG, 0) + dG + dG_last
        tl.store(dq + row[:, None] * K + rk[None, :], bdq, mask=m_qk)
        tl.store(dk + row[:, None] * K + rk[None, :], bdk, mask=m_qk)
        tl.store(dv + row[:, None] * V + rv[None, :], bdv, mask=m_v)
        tl.store(dg + row, bdg, mask=mt)
        tl.store(dbeta + row, bdb, mask=mt)
        dS = dS * d_last + tl.dot(tl.trans(qg), bdo, input_precision="ieee") * scale
        dS -= tl.dot(tl.trans(W), d_delta, input_precision="ieee")
    tl.store(ds0 + bh * K * V + kv_off, dS, mask=kv_mask)


def recurrent_kernel(
    q,
    k,
    v,
    g,
    beta,
    s0,
    o,
    sfin,
    T,
    H,
    K,
    V,
    scale,
    HAS_S0: tl.constexpr,
    DELTA: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk = rk < K
    mv = rv < V
    kv_off = rk[:, None] * V + rv[None, :]
    kv_mask = mk[:, None] & mv[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0:
        S = tl.load(s0 + bh * K * V + kv_off, mask=kv_mask, other=0.0)
    for t in range(T):
        row = (b * T + t) * H + h
        bq = tl.load(q + row * K + rk, mask=mk, other=0.0)
        bk = tl.load(k + row * K + rk, mask=mk, other=0.0)
        bv = tl.load(v + row * V + rv, mask=mv, other=0.0)
        S = S * tl.exp(tl.load(g + row))
        if DELTA:
            v_old = tl.sum(S * bk[:, None], 0)
            bv = (bv - v_old) * tl.load(beta + row)
        S = S + bk[:, None] * bv[None, :]
        tl.store(o + row * V + rv, tl.sum(S * bq[:, None], 0) * scale, mask=mv)
    tl.store(sfin + bh * K * V + kv_off, S, mask=kv_mask)
