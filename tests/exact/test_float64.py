"""float64 attention computes in float64 end to end: gradcheck passes and outputs equal a float64 formula.

Exact attention computes in ``compute_dtype(dtype) = promote_types(dtype, float32)``: half and bfloat16 are
upcast to float32 (FlashAttention's accumulation), float32 stays float32 and float64 stays float64 (forward,
backward and the returned log-sum-exp). A path that casts to float32 anywhere fails these tests: its finite
differences at gradcheck's eps = 1e-6 are rounding noise, and its outputs are off by ~1e-7, not 1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from effattn import attention, decode_attention, explain, merge_attention_states
from effattn.exact import compute_dtype, lean_decode_attention, relative_position_bias

F64 = torch.float64
# B, Tq, Tk, Hq, Hkv, D, Dv: GQA, T_q != T_k, D_v != D (the cu_seqlens case packs B = 1, T_q = T_k)
SHAPE = (1, 5, 7, 4, 2, 3, 2)
CASES = ["none", "causal", "causal_square", "window", "softcap", "mask_mod", "score_mod", "sinks", "cu_seqlens"]


def _inputs(shape, seed=0):
    B, Tq, Tk, Hq, Hkv, D, Dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, Hq, D, generator=g, dtype=F64)
    k = torch.randn(B, Tk, Hkv, D, generator=g, dtype=F64)
    v = torch.randn(B, Tk, Hkv, Dv, generator=g, dtype=F64)
    return q, k, v


def _case(name: str, shape=SHAPE):
    """``(shape, kwargs, extra differentiable leaves, allowed [Tq, Tk] or None, bias fn or None, cap)``."""
    B, Tq, Tk, Hq, Hkv, D, Dv = shape
    g = torch.Generator().manual_seed(1)
    i = torch.arange(Tq).view(Tq, 1) + Tk - Tq  # bottom-right aligned query positions
    j = torch.arange(Tk).view(1, Tk)
    if name == "none":
        return shape, {}, [], None, None, None
    if name == "causal":
        return shape, {"causal": True}, [], j <= i, None, None
    if name == "causal_square":  # T_q == T_k: auto takes sdpa
        sq = (B, Tk, Tk, Hq, Hkv, D, Dv)
        return sq, {"causal": True}, [], _case("causal", sq)[3], None, None
    if name == "window":
        return shape, {"causal": True, "window": 3}, [], (j <= i) & (i - j < 3), None, None
    if name == "softcap":
        return shape, {"causal": True, "softcap": 2.0}, [], j <= i, None, 2.0
    if name == "mask_mod":  # every row keeps a key (gradcheck needs finite lse)
        rule = lambda b, h, qi, kv: (qi + kv) % 3 != 1  # noqa: E731
        return shape, {"mask_mod": rule}, [], rule(0, 0, i - (Tk - Tq), j), None, None
    if name == "score_mod":  # a learnable relative-position table: its gradient is checked too
        table = (0.5 * torch.randn(Hq, 2 * 4 + 1, generator=g, dtype=F64)).requires_grad_(True)
        rel = (j - i).clamp(-4, 4) + 4
        return (
            shape,
            {"score_mod": relative_position_bias(table, 4, Tk - Tq)},
            [table],
            None,
            lambda: table[:, rel],
            None,
        )
    if name == "sinks":
        sinks = torch.randn(Hq, generator=g, dtype=F64).requires_grad_(True)
        return shape, {"causal": True, "sinks": sinks}, [sinks], j <= i, None, None
    if name == "cu_seqlens":
        sq = (1, 8, 8, Hq, Hkv, D, Dv)
        doc = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2])
        kw = {"causal": True, "cu_seqlens": torch.tensor([0, 3, 4, 8])}
        return sq, kw, [], _case("causal", sq)[3] & (doc[:, None] == doc[None]), None, None
    raise KeyError(name)


def _dense(q, k, v, allowed=None, bias=None, cap=None, sinks=None):
    """softmax(cap tanh(q k^T / (sqrt(D) cap)) + bias, masked by allowed [Tq, Tk], with a sink logit) v,
    written out here in float64, and its log-sum-exp [B, H, Tq]."""
    G = q.shape[2] // k.shape[2]
    kf, vf = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kf) / math.sqrt(q.shape[-1])
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    if bias is not None:
        s = s + bias[None]
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    cols = s if sinks is None else torch.cat([s, sinks.view(1, -1, 1, 1).expand(*s.shape[:3], 1)], -1)
    lse = torch.logsumexp(cols, -1)
    return torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse[..., None]), vf), lse


def test_compute_dtype():
    assert [compute_dtype(d) for d in (torch.float16, torch.bfloat16, torch.float32, F64)] == [torch.float32] * 3 + [
        F64
    ]


@pytest.mark.parametrize("backend", ["reference", "tiled", "auto"])
@pytest.mark.parametrize("case", CASES)
def test_gradcheck_float64(case, backend):
    shape, kw, extra, *_ = _case(case)
    q, k, v = (x.requires_grad_(True) for x in _inputs(shape))
    with_lse = backend != "auto"  # auto without return_lse: the plain calls run on sdpa

    def fn(q, k, v, *extra_leaves):
        out = attention(q, k, v, backend=backend, return_lse=with_lse, **kw)
        return out if with_lse else (out,)

    # one random projection (27 cases in ~15 s), at tolerances float64 meets and a float32 forward misses (a float32
    # step in the backward alone is too small for gradcheck: test_float64_equals_dense_formula checks gradients)
    assert gradcheck(fn, (q, k, v, *extra), fast_mode=True, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("case", ["window", "score_mod", "sinks"])
def test_gradcheck_float64_every_entry_tiny(case):
    """gradcheck's full mode (every Jacobian entry, not one random projection) on the tiled engine."""
    shape, kw, extra, *_ = _case(case, (1, 2, 4, 2, 1, 2, 2))
    q, k, v = (x.requires_grad_(True) for x in _inputs(shape))
    assert gradcheck(lambda q, k, v, *e: attention(q, k, v, backend="tiled", return_lse=True, **kw), (q, k, v, *extra))


@pytest.mark.parametrize("backend", ["reference", "tiled", "auto"])
@pytest.mark.parametrize("case", CASES)
def test_float64_equals_dense_formula(case, backend):
    """Output, lse and every gradient (the backward too, which gradcheck's tolerances would let pass with a
    float32 step inside) equal the float64 formula's to 1e-12."""
    shape, kw, extra, allowed, bias, cap = _case(case)
    if case != "cu_seqlens":  # (it packs one row)
        shape = (2, *shape[1:])
    q, k, v = (x.requires_grad_(True) for x in _inputs(shape, seed=2))
    leaves = [q, k, v, *extra]
    want, want_lse = _dense(q, k, v, allowed, None if bias is None else bias(), cap, kw.get("sinks"))
    if backend == "auto":
        got, lse = attention(q, k, v, **kw), None
    else:
        got, lse = attention(q, k, v, backend=backend, return_lse=True, **kw)
    assert got.dtype == F64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    g = torch.Generator().manual_seed(3)
    w_o, w_l = torch.randn(got.shape, generator=g, dtype=F64), torch.randn(want_lse.shape, generator=g, dtype=F64)
    loss, want_loss = (got * w_o).sum(), (want * w_o).sum()
    if lse is not None:
        assert lse.dtype == F64
        torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)
        loss, want_loss = loss + (lse * w_l).sum(), want_loss + (want_lse * w_l).sum()
    for name, a, b in zip(
        "q k v extra".split(), torch.autograd.grad(loss, leaves), torch.autograd.grad(want_loss, leaves)
    ):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m, name=name: f"d{name}: {m}")


def test_auto_float64_paths():
    """auto runs float64 on sdpa (plain and square-causal calls) or tiled (the rest); triton refuses float64."""
    q, k, v = _inputs((1, 9, 9, 4, 2, 8, 8))
    plain, masked = explain(q, k, v, causal=True), explain(q, k, v, causal=True, window=3)
    assert (plain.backend, masked.backend) == ("sdpa", "tiled")
    assert any("dtype float64 not supported" in r for r in plain.reasons["triton"])
    for kw in ({"causal": True}, {"causal": True, "window": 3}):
        ref = attention(q, k, v, backend="reference", **kw)
        torch.testing.assert_close(attention(q, k, v, **kw), ref, atol=1e-13, rtol=1e-13)


def test_float32_and_low_precision_keep_float32_lse():
    q, k, v = (x.float() for x in _inputs((1, 6, 6, 2, 1, 4, 4)))
    for dt in (torch.float32, torch.bfloat16):
        for backend in ("reference", "tiled"):
            o, lse = attention(q.to(dt), k.to(dt), v.to(dt), causal=True, return_lse=True, backend=backend)
            assert (o.dtype, lse.dtype) == (dt, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "lean"])
def test_decode_float64(backend):
    g = torch.Generator().manual_seed(3)
    B, Tmax, Hq, Hkv, D, Dv, Tn = 2, 23, 4, 2, 5, 3, 2
    kc, vc = torch.randn(B, Tmax, Hkv, D, generator=g, dtype=F64), torch.randn(B, Tmax, Hkv, Dv, generator=g, dtype=F64)
    q = torch.randn(B, Tn, Hq, D, generator=g, dtype=F64)
    sinks = torch.randn(Hq, generator=g, dtype=F64)
    lens = torch.tensor([23, 9])
    kw = dict(num_splits=3, softcap=4.0, sinks=sinks, window=6, return_lse=True, backend=backend)
    o, lse = decode_attention(q, kc, vc, lens, **kw)
    assert (o.dtype, lse.dtype) == (F64, F64)
    for b in range(B):  # each row against the dense formula over its own cache
        n = int(lens[b])
        i = torch.arange(Tn).view(Tn, 1) + n - Tn
        j = torch.arange(n).view(1, n)
        want, want_lse = _dense(
            q[b : b + 1], kc[b : b + 1, :n], vc[b : b + 1, :n], (j <= i) & (i - j < 6), None, 4.0, sinks
        )
        torch.testing.assert_close(o[b : b + 1], want, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lse[b : b + 1], want_lse, atol=1e-12, rtol=1e-12)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q[:, :1], kc[:, :12], vc[:, :12], sinks)]
    kw = dict(num_splits=2, softcap=4.0, window=5, return_lse=True, backend=backend)
    assert gradcheck(lambda q, k, v, s: decode_attention(q, k, v, torch.tensor([12, 7]), sinks=s, **kw), leaves)


def test_lean_float64_alibi_equals_dense():
    g = torch.Generator().manual_seed(4)
    kc = torch.randn(1, 40, 1, 4, generator=g, dtype=F64)
    q = torch.randn(1, 1, 2, 4, generator=g, dtype=F64)
    slopes = torch.tensor([0.25, 0.5], dtype=F64)
    o = lean_decode_attention(q, kc, kc, alibi_slopes=slopes, num_workers=3, tile_size=8)
    bias = -slopes.view(2, 1, 1) * (39 - torch.arange(40, dtype=F64)).view(1, 1, 40)
    torch.testing.assert_close(o, _dense(q, kc, kc, None, bias)[0], atol=1e-12, rtol=1e-12)


def test_merge_attention_states_float64():
    g = torch.Generator().manual_seed(5)
    outs = torch.randn(3, 1, 4, 2, 3, generator=g, dtype=F64, requires_grad=True)
    lses = torch.randn(3, 1, 2, 4, generator=g, dtype=F64, requires_grad=True)
    o, lse = merge_attention_states(outs, lses)
    assert (o.dtype, lse.dtype) == (F64, F64)
    w = torch.softmax(lses, 0).permute(0, 1, 3, 2)[..., None]
    torch.testing.assert_close(o, (w * outs).sum(0), atol=1e-14, rtol=1e-14)
    assert gradcheck(merge_attention_states, (outs, lses))
