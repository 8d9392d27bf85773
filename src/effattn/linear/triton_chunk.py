"""Triton kernels for the chunked linear ops: the scalar-decay family and the gated delta rule.

Two chunkwise kernels and two recurrent (one-token) kernels, each computing what the PyTorch form of
:mod:`effattn.linear._scalar_decay` / :mod:`effattn.linear.gated_delta_rule` computes:

* scalar decay (simple GLA, RetNet, Lightning Attention-2, Mamba-2 SSD, plain linear attention with
  ``g = 0``): ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``. Forward and
  backward are Triton kernels (fla's ``chunk_simple_gla`` structure: one program per batch row and
  head walks the chunks, the ``[K, V]`` state stays on chip; inside a chunk the causal part is a
  masked ``C x C`` matmul with ``exp(G_i - G_j)``). The forward keeps the state entering each chunk
  for the backward, which walks the chunks in reverse carrying ``dS``.
* gated delta rule (Yang, Kautz, Hatamizadeh, "Gated Delta Networks", 2024):
  ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``. The forward is a Triton
  kernel (the UT transform per chunk: ``(I + tril(diag(beta) K K^T * Gamma, -1))^{-1}`` by forward
  substitution on chip, then ``W``, ``U``, ``Delta = U - W S``); the forward keeps the entering
  states, the backward kernel walks the chunks in reverse, recomputes ``(I + A)^{-1}``, ``W``, ``U``
  per chunk and carries ``dS`` (through ``T = (I + A)^{-1}`` the gradient is ``dA = -T^T dT T^T``).
* recurrent kernels (``fused_recurrent_*``): the same recurrences token by token, for decoding
  (forward only; not differentiable).

Numerics: every kernel computes in float32 (inputs of other dtypes are cast on the host; float64 is
not supported), matmuls in IEEE float32 (no TF32). The decays ``exp(G_i - G_j)`` are taken from
segment sums ``g_{j+1} + ... + g_i`` (a masked cumsum on chip, as the PyTorch gated delta rule does),
never as a difference of two large cumulated sums, so a hard reset (a gate of ``-inf``, clamped)
does not cost the following decays their accuracy; every exponent is <= 0. Gates are clamped at
``LOG_DECAY_FLOOR`` on the host by the callers (an infinite gate would make the gradients NaN).
The chunk length of the kernels is ``max(16, next_power_of_2(chunk_size))`` (``tl.dot`` needs tiles
of at least 16); the chunkwise result does not depend on the chunk length beyond rounding.

Triton is optional and imported lazily: Triton fixes its mode (GPU compiler or CPU interpreter,
``TRITON_INTERPRET=1``) at its first import, so kernel bodies are plain functions decorated by
:func:`jit` when first launched. CPU tensors run only under ``TRITON_INTERPRET=1`` (slow: tests);
:func:`triton_linear_status` says why the kernels cannot run.

GPU speed is unmeasured: the kernels were written and tested in Triton's interpreter only.

Example::

    >>> ok, why = triton_linear_status(torch.device("cpu"))
    >>> ok or "TRITON_INTERPRET" in why or "not installed" in why
    True
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

__all__ = [
    "BACKENDS",
    "chunk_gated_delta_rule_triton",
    "chunk_scalar_decay_triton",
    "fused_recurrent_gated_delta_rule_triton",
    "fused_recurrent_scalar_decay_triton",
    "resolve_backend",
    "triton_linear_status",
]

#: The values of the ``backend`` keyword of the chunk forms.
BACKENDS = ("auto", "torch", "triton")

_JITTED: dict = {}

# bound to ``triton.language`` by :func:`_jit` on first launch, so importing this module never imports
# triton (which fixes its GPU-or-interpreter mode when it is first imported)
tl = None


# ----------------------------------------------------------------------------------------------
# lazy triton, mode checks, backend selection
# ----------------------------------------------------------------------------------------------


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_linear_status(device: torch.device) -> tuple[bool, str]:
    """``(can_run, reason)`` for tensors on ``device``; the reason is empty when the kernels can run
    (CUDA, or CPU under ``TRITON_INTERPRET=1`` set before triton was imported).

    Example::

        >>> triton_linear_status(torch.device("meta"))[0]
        False
    """
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu":
        if not _interpret_mode():
            return False, "CPU tensors run only in Triton's interpreter: set TRITON_INTERPRET=1 (slow; for tests)"
        lang = sys.modules.get("triton.language")
        if lang is not None and type(lang.zeros).__name__ != "InterpretedFunction":
            return False, (
                "triton was imported before TRITON_INTERPRET=1 was set (its mode is fixed at import): "
                "set it before the process imports triton"
            )
        return True, ""
    return False, f"device {device.type!r} not supported (cuda, or cpu with TRITON_INTERPRET=1)"


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """``"torch"`` or ``"triton"`` for a call on ``x``: ``"auto"`` picks Triton only on CUDA tensors
    (float16/bfloat16/float32) when triton is installed; ``"triton"`` raises where it cannot run.

    Example::

        >>> resolve_backend("auto", torch.zeros(1))
        'torch'
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    ok, why = triton_linear_status(x.device)
    if backend == "auto":
        return "triton" if ok and x.device.type == "cuda" and x.dtype != torch.float64 else "torch"
    if not ok:
        raise RuntimeError(f"backend='triton' cannot run on {x.device.type} tensors: {why}")
    if x.dtype == torch.float64:
        raise ValueError("backend='triton' computes in float32: got float64 inputs (use backend='torch')")
    return "triton"


def _jit(fn):
    import triton
    import triton.language

    if fn.__globals__.get("tl") is None:
        fn.__globals__["tl"] = triton.language
    key = (fn.__qualname__, _interpret_mode())
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (max(int(n), 1) - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# kernels (plain functions; `tl` is injected by _jit on first launch)
# ----------------------------------------------------------------------------------------------


def _sd_fwd_kernel(q, k, v, g, s0, o, sfin, states, T, H, K, V, NT, scale,
                   HAS_S0: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
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


def _sd_bwd_kernel(q, k, v, g, states, do, dsfin, dq, dk, dv, dg, ds0, T, H, K, V, NT, scale,
                   HAS_DSFIN: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
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


def _gdr_fwd_kernel(q, k, v, g, beta, s0, o, sfin, states, T, H, K, V, NT, scale,
                    HAS_S0: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
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


def _gdr_bwd_kernel(q, k, v, g, beta, states, do, dsfin, dq, dk, dv, dg, dbeta, ds0, T, H, K, V, NT, scale,
                    HAS_DSFIN: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
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


def _recurrent_kernel(q, k, v, g, beta, s0, o, sfin, T, H, K, V, scale,
                      HAS_S0: tl.constexpr, DELTA: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
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


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().contiguous()


class _ScalarDecayChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale, C):
        B, T, H, K = q.shape
        V = v.shape[-1]
        NT = -(-T // C)
        q_, k_, v_, g_ = (_f32(x) for x in (q, k, v, g))
        o = torch.empty(B, T, H, V, device=q.device, dtype=torch.float32)
        sfin = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
        states = torch.empty(B, H, NT, K, V, device=q.device, dtype=torch.float32)
        s0_ = _f32(s0) if s0 is not None else sfin
        _jit(_sd_fwd_kernel)[(B * H,)](
            q_, k_, v_, g_, s0_, o, sfin, states, T, H, K, V, NT, float(scale),
            HAS_S0=s0 is not None, C=C, BK=_pow2(K), BV=_pow2(V),
        )
        ctx.save_for_backward(q_, k_, v_, g_, states)
        ctx.meta = (scale, C, s0 is not None)
        return o, sfin

    @staticmethod
    def backward(ctx, do, dsfin):
        q, k, v, g, states = ctx.saved_tensors
        scale, C, has_s0 = ctx.meta
        B, T, H, K = q.shape
        V = v.shape[-1]
        NT = states.shape[2]
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dv, dg = torch.empty_like(v), torch.empty_like(g)
        ds0 = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
        do_ = _f32(do) if do is not None else torch.zeros_like(v)
        dsfin_ = _f32(dsfin) if dsfin is not None else ds0
        _jit(_sd_bwd_kernel)[(B * H,)](
            q, k, v, g, states, do_, dsfin_, dq, dk, dv, dg, ds0, T, H, K, V, NT, float(scale),
            HAS_DSFIN=dsfin is not None, C=C, BK=_pow2(K), BV=_pow2(V),
        )
        return dq, dk, dv, dg, (ds0 if has_s0 else None), None, None


def chunk_scalar_decay_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton form of :func:`effattn.linear._scalar_decay.chunk_scalar_decay` (same arguments and
    results, float32 out; gates must be finite: the caller clamps them at
    ``_scalar_decay.LOG_DECAY_FLOOR``): ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``,
    chunkwise as in Mamba-2's SSD ("Transformers are SSMs", Dao and Gu, 2024). Differentiable
    in q, k, v, g and ``state`` through Triton backward kernels.

    Example (runs where :func:`triton_linear_status` allows; see ``tests/linear/test_triton_linear.py``)::

        >>> q = k = v = torch.randn(1, 5, 1, 4)
        >>> if triton_linear_status(q.device)[0]:
        ...     o, s = chunk_scalar_decay_triton(q, k, v, -torch.rand(1, 5, 1), 0.5, None, 16)
        ...     assert o.shape == (1, 5, 1, 4) and s.shape == (1, 1, 4, 4)
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:
        return q.new_zeros(B, 0, H, V), (q.new_zeros(B, H, K, V) if state is None else state)
    g = torch.zeros(B, T, H, device=q.device, dtype=torch.float32) if g is None else g
    o, s = _ScalarDecayChunk.apply(q, k, v, g, state, scale, _pow2(chunk_size))
    return o, s


class _GatedDeltaChunk(torch.autograd.Function):
    """Triton forward and backward kernels of the chunkwise gated delta rule."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, s0, scale, C):
        B, T, H, K = q.shape
        V = v.shape[-1]
        NT = -(-T // C)
        q_, k_, v_, g_, b_ = (_f32(x) for x in (q, k, v, g, beta))
        o = torch.empty(B, T, H, V, device=q.device, dtype=torch.float32)
        sfin = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
        states = torch.empty(B, H, NT, K, V, device=q.device, dtype=torch.float32)
        s0_ = _f32(s0) if s0 is not None else sfin
        _jit(_gdr_fwd_kernel)[(B * H,)](
            q_, k_, v_, g_, b_, s0_, o, sfin, states, T, H, K, V, NT, float(scale),
            HAS_S0=s0 is not None, C=C, BK=_pow2(K), BV=_pow2(V),
        )
        ctx.save_for_backward(q_, k_, v_, g_, b_, states)
        ctx.meta = (scale, C, s0 is not None)
        return o, sfin

    @staticmethod
    def backward(ctx, do, dsfin):
        q, k, v, g, beta, states = ctx.saved_tensors
        scale, C, has_s0 = ctx.meta
        B, T, H, K = q.shape
        V = v.shape[-1]
        NT = states.shape[2]
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dv, dg, dbeta = torch.empty_like(v), torch.empty_like(g), torch.empty_like(beta)
        ds0 = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
        do_ = _f32(do) if do is not None else torch.zeros_like(v)
        dsfin_ = _f32(dsfin) if dsfin is not None else ds0
        _jit(_gdr_bwd_kernel)[(B * H,)](
            q, k, v, g, beta, states, do_, dsfin_, dq, dk, dv, dg, dbeta, ds0, T, H, K, V, NT, float(scale),
            HAS_DSFIN=dsfin is not None, C=C, BK=_pow2(K), BV=_pow2(V),
        )
        return dq, dk, dv, dg, dbeta, (ds0 if has_s0 else None), None, None


def chunk_gated_delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    S0: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton form of :func:`effattn.linear._delta.chunk_delta_core` (same arguments and results;
    q and k already normalised; ``g=None`` is the plain delta rule): per chunk the UT transform
    ``(I + tril(diag(beta) (K K^T * Gamma), -1)) [W | U] = [diag(beta e^G) K | diag(beta) V]``,
    ``O = scale (diag(e^G) Q S + tril(Q K^T * Gamma) (U - W S))`` (Yang et al., "Parallelizing Linear
    Transformers with the Delta Rule over Sequence Length", 2024; "Gated Delta Networks", 2024).
    Differentiable in q, k, v, beta, g and ``S0`` through a Triton backward kernel.

    Example (runs where :func:`triton_linear_status` allows)::

        >>> q = k = torch.nn.functional.normalize(torch.randn(1, 5, 1, 4), dim=-1)
        >>> if triton_linear_status(q.device)[0]:
        ...     o, s = chunk_gated_delta_rule_triton(q, k, q, torch.rand(1, 5, 1), None, 1.0, None, 16)
        ...     assert o.shape == (1, 5, 1, 4)
    """
    B, T, H, K = q.shape
    gz = torch.zeros(B, T, H, device=q.device, dtype=torch.float32) if g is None else g
    return _GatedDeltaChunk.apply(q, k, v, gz, beta, S0, scale, _pow2(chunk_size))


def _recurrent(q, k, v, g, beta, scale, state, delta):
    B, T, H, K = q.shape
    V = v.shape[-1]
    q_, k_, v_ = (_f32(x) for x in (q, k, v))
    g_ = _f32(g) if g is not None else torch.zeros(B, T, H, device=q.device)
    b_ = _f32(beta) if beta is not None else g_
    o = torch.empty(B, T, H, V, device=q.device, dtype=torch.float32)
    sfin = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
    s0_ = _f32(state) if state is not None else sfin
    _jit(_recurrent_kernel)[(B * H,)](
        q_, k_, v_, g_, b_, s0_, o, sfin, T, H, K, V, float(scale),
        HAS_S0=state is not None, DELTA=delta, BK=_pow2(K, 2), BV=_pow2(V, 2),
    )
    return o, sfin


def fused_recurrent_scalar_decay_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token Triton kernel of :func:`effattn.linear._scalar_decay.recurrent_scalar_decay`
    (``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``), for decoding: forward only
    (no gradients), float32 out.

    Example::

        >>> q = torch.randn(1, 2, 1, 4)
        >>> if triton_linear_status(q.device)[0]:
        ...     assert fused_recurrent_scalar_decay_triton(q, q, q, None, 1.0, None)[0].shape == (1, 2, 1, 4)
    """
    return _recurrent(q, k, v, g, None, scale, state, False)


def fused_recurrent_gated_delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token Triton kernel of the gated delta rule (q, k already normalised; ``g=None``: the
    delta rule): ``S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T``,
    ``o_t = scale S_t^T q_t``. For decoding: forward only (no gradients), float32 out.

    Example::

        >>> q = torch.randn(1, 2, 1, 4)
        >>> if triton_linear_status(q.device)[0]:
        ...     o, s = fused_recurrent_gated_delta_rule_triton(q, q, q, torch.rand(1, 2, 1), None, 1.0, None)
        ...     assert s.shape == (1, 1, 4, 4)
    """
    return _recurrent(q, k, v, g, beta, scale, state, True)
