"""Attention mixer, RoPE and KVCache: shapes, decode vs full, padding, RoPE properties, causality."""

from __future__ import annotations

import doctest

import pytest
import torch

import effattn.exact.rope
import effattn.kv.contiguous
import effattn.nn.attention
from effattn.exact.reference import reference_attention
from effattn.kv.contiguous import KVCache
from effattn.nn.attention import Attention, WindowKVCache
from effattn.nn.rope import RotaryEmbedding
from tests.helpers import assert_fp32_close

DIM = 32


def _layer(seed: int = 0, **kw) -> Attention:
    torch.manual_seed(seed)
    return Attention(DIM, 4, **kw)


def _x(B: int = 2, T: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_shapes_and_state_size(kv_heads):
    layer = _layer(kv_heads=kv_heads)
    y, cache = layer(_x())
    hkv = kv_heads or 4
    assert y.shape == (2, 11, DIM)
    assert cache.k.shape == (2, 11, hkv, 8) and cache.v.shape == (2, 11, hkv, 8)
    assert layer.state_size(2, 11) == cache.nbytes == 2 * 11 * hkv * 2 * 8 * 4


def test_matches_manual_formula():
    """The layer equals the formula written out: projections, RoPE, materialized softmax, o_proj."""
    layer = _layer(kv_heads=2, qk_norm=True)
    x = _x()
    B, T = x.shape[:2]
    q = layer.q_norm(layer.q_proj(x).view(B, T, 4, 8))
    k = layer.k_norm(layer.k_proj(x).view(B, T, 2, 8))
    v = layer.v_proj(x).view(B, T, 2, 8)
    pos = torch.arange(T)
    q, k = layer.rope.apply(q, pos), layer.rope.apply(k, pos)
    k, v = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    s = torch.einsum("bthd,bshd->bhts", q, k) / 8**0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v)
    assert_fp32_close(layer(x)[0], layer.o_proj(o.flatten(2)))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"kv_heads": 1},
        {"kv_heads": 2, "window": 4},
        {"softcap": 5.0, "sinks": True},
        {"qk_norm": True, "rope_fraction": 0.5},
        {"score_mod": lambda s, b, h, q, kv: s - 0.1 * (q - kv)},
        {"mask_mod": lambda b, h, q, kv: (q - kv) % 3 != 1},  # mods see absolute cache indices
    ],
)
def test_token_by_token_and_prefill_decode_equal_full(kw):
    layer = _layer(**kw)
    if layer.sinks is not None:
        torch.nn.init.normal_(layer.sinks)
    x = _x(T=13)
    with torch.no_grad():
        full, _ = layer(x)
        cache, ys = None, []
        for t in range(x.shape[1]):
            y, cache = layer(x[:, t : t + 1], cache)
            ys.append(y)
        assert_fp32_close(torch.cat(ys, 1), full, name="token by token")
        y0, cache = layer(x[:, :8])
        y1, cache = layer(x[:, 8:11], cache)
        y2, cache = layer(x[:, 11:], cache)
        assert_fp32_close(torch.cat([y0, y1, y2], 1), full, name="prefill + chunks")
        assert cache.length + getattr(cache, "dropped", 0) == 13


@pytest.mark.parametrize("window", [1, 4, 9])
def test_window_cache_is_bounded_and_decode_equals_full(window):
    """A causal windowed layer keeps only the last ``window - 1`` (+ slack) tokens, and decoding
    against that bounded cache (positions continuing past the dropped tokens) equals the full forward,
    also after a left-padded prefill."""
    layer = _layer(kv_heads=2, window=window)
    x = _x(B=2, T=40)
    keep = window - 1
    with torch.no_grad():
        full, _ = layer(x)
        y0, cache = layer(x[:, :17])
        assert isinstance(cache, WindowKVCache) and cache.keep == keep
        ys, lengths = [y0], []
        for t in range(17, 40):
            y, cache = layer(x[:, t : t + 1], cache)
            ys.append(y)
            lengths.append(cache.length)
        assert_fp32_close(torch.cat(ys, 1), full, name=f"window {window}: prefill + decode")
        assert max(lengths) <= cache.max_length == keep + cache.slack - 1
        assert min(lengths) >= keep and cache.dropped + cache.length == 40
        assert cache.nbytes <= layer.state_size(2, 40) == 2 * cache.max_length * 2 * 2 * 8 * 4
        # a short context holds what it has (window 1 needs no past key at all)
        assert layer.state_size(1, 3) == min(3, cache.max_length) * 2 * 2 * 8 * 4
        # a left-padded batch: row 1 padded by 12 (5 real tokens: fewer than keep for window 9), garbage there
        p = 12
        valid = torch.ones(2, 17, dtype=torch.bool)
        valid[1, :p] = False
        xp = x[:, :17].clone()
        xp[1, :p] = 1e3
        xp[1, p:] = x[1, : 17 - p]
        yp, cache = layer(xp, valid=valid)
        dec = []
        for t in range(17 - p, 30 - p):
            nxt = torch.stack([x[0, t + p], x[1, t]])[:, None]
            y, cache = layer(nxt, cache)
            dec.append(y)
        dec = torch.cat(dec, 1)
        ref1 = layer(x[1:, : 30 - p])[0]
        assert_fp32_close(yp[1, p:], ref1[0, : 17 - p], name="padded row prefill")
        assert_fp32_close(dec[1], ref1[0, 17 - p :], name="padded row decode")
        assert_fp32_close(dec[0], full[0, 17:30], name="unpadded row decode")


def test_window_cache_errors_and_mods_keep_full_cache():
    layer = _layer(window=4)
    with pytest.raises(ValueError, match="keep"):
        WindowKVCache(-1)
    with pytest.raises(ValueError, match="WindowKVCache keeping 1"):
        layer(_x(T=2), WindowKVCache(1))
    with pytest.raises(ValueError, match="WindowKVCache"):
        _layer()(_x(T=2), WindowKVCache(3))
    # a mask mod sees absolute cache indices: such a layer keeps the whole cache
    modded = _layer(window=4, mask_mod=lambda b, h, q, kv: (q - kv) % 3 != 1)
    _, cache = modded(_x(T=30))
    assert type(cache) is KVCache and cache.length == 30


@pytest.mark.parametrize("kw", [{}, {"kv_heads": 2, "window": 3}, {"sinks": True, "softcap": 4.0}])
def test_left_padded_batch_equals_unbatched(kw):
    layer = _layer(**kw)
    if layer.sinks is not None:
        torch.nn.init.normal_(layer.sinks)
    x = _x(B=3, T=9)
    pads = [0, 3, 5]
    valid = torch.ones(3, 9, dtype=torch.bool)
    xp = x.clone()
    for b, p in enumerate(pads):
        valid[b, :p] = False
        xp[b, :p] = 1e3  # garbage at the padding must not leak anywhere
    nxt = _x(B=3, T=2, seed=7)
    with torch.no_grad():
        y, cache = layer(xp, valid=valid)
        d1, cache = layer(nxt[:, :1], cache)  # decode after a padded prefill
        d2, cache = layer(nxt[:, 1:], cache, valid=torch.ones(3, 1, dtype=torch.bool))
        for b, p in enumerate(pads):
            ref, c = layer(x[b : b + 1, p:])
            r1, c = layer(nxt[b : b + 1, :1], c)
            r2, c = layer(nxt[b : b + 1, 1:], c)
            assert_fp32_close(y[b, p:], ref[0], name=f"row {b} prefill")
            assert_fp32_close(d1[b], r1[0], name=f"row {b} decode 1")
            assert_fp32_close(d2[b], r2[0], name=f"row {b} decode 2")
            assert torch.isfinite(y[b]).all()


def test_no_future_leakage_and_encoder_sees_future():
    x = _x(T=12)
    x2 = x.clone()
    x2[:, 7:] += torch.randn_like(x2[:, 7:])
    causal = _layer()
    a, b = causal(x)[0], causal(x2)[0]
    assert torch.equal(a[:, :7], b[:, :7])
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3
    enc = _layer(causal=False)
    assert (enc(x)[0][:, :7] - enc(x2)[0][:, :7]).abs().max() > 1e-3


def test_encoder_matches_reference():
    layer = _layer(causal=False, rope=False)
    x = _x()
    B, T = x.shape[:2]
    q, k, v = (p(x).view(B, T, 4, 8) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    o = reference_attention(q, k, v, scale=8**-0.5)[0]
    assert_fp32_close(layer(x)[0], layer.o_proj(o.flatten(2)))


def test_gradients_flow_through_cache_calls():
    layer = _layer(kv_heads=2)
    x = _x(T=6)
    y_full = layer(x)[0]
    y0, c = layer(x[:, :4])
    y1, c = layer(x[:, 4:], c)
    g_full = torch.autograd.grad(y_full.square().sum(), layer.k_proj.weight)[0]
    g_split = torch.autograd.grad(torch.cat([y0, y1], 1).square().sum(), layer.k_proj.weight)[0]
    assert_fp32_close(g_split, g_full, tol=1e-4, name="dW_k")


def test_single_token_decode_uses_split_kv_decode(monkeypatch):
    import effattn.nn.attention as mod

    calls = []
    real = mod.decode_attention

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(mod, "decode_attention", spy)
    layer = _layer(kv_heads=2, window=5)
    x = _x(T=9)
    with torch.no_grad():
        full, c = layer(x[:, :8])
        assert not calls  # prefill goes through effattn.attention
        y, c = layer(x[:, 8:], c)
    assert calls == [(2, 1, 4, 8)]
    assert_fp32_close(y[:, 0], layer(x)[0][:, 8])
    calls.clear()
    with torch.no_grad():
        _layer(score_mod=lambda s, b, h, q, kv: s)(x[:, :1], _layer()(x[:, :3])[1])
    assert not calls  # a score mod needs the general path


# ----------------------------------------------------------------------------- RoPE
def test_rope_scores_depend_only_on_distance():
    rope = RotaryEmbedding(16)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(m: int, n: int) -> float:
        qm = rope.apply(q, torch.tensor([m]))
        kn = rope.apply(k, torch.tensor([n]))
        return (qm * kn).sum().item()

    base = score(3, 1)
    for m, n in [(5, 3), (40, 38), (1000, 998)]:
        assert abs(score(m, n) - base) < 1e-4 * max(1.0, abs(base))
    assert abs(score(5, 1) - base) > 1e-3  # a different distance gives a different score
    x = torch.randn(2, 4, 3, 16, generator=g)
    assert torch.allclose(rope.apply(x, torch.zeros(4, dtype=torch.long)), x)  # position 0 is identity
    assert torch.allclose(rope.apply(x, torch.arange(4)).norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation


def test_partial_rope_and_per_row_positions():
    rope = RotaryEmbedding(20, fraction=0.5)
    assert rope.rot_dim == 10
    x = torch.randn(2, 6, 3, 20)
    y = rope.apply(x, torch.arange(6))
    assert torch.equal(y[..., 10:], x[..., 10:])
    assert (y[:, 1:, :, :10] - x[:, 1:, :, :10]).abs().max() > 1e-2
    pos = torch.stack([torch.arange(6), torch.arange(6) + 4])
    yb = rope.apply(x, pos)
    assert torch.equal(yb[0], y[0])
    assert torch.allclose(yb[1], rope.apply(x[1:], torch.arange(4, 10))[0])


def test_qk_norm_normalizes_heads():
    layer = _layer(qk_norm=True, rope=False)
    with torch.no_grad():
        layer.q_proj.weight.mul_(50.0)  # scaling q does not change anything after the norm
    layer2 = _layer(qk_norm=True, rope=False)
    x = _x()
    assert_fp32_close(layer(x)[0], layer2(x)[0])
    assert (_layer(rope=False)(x)[0] - layer2(x)[0]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- KVCache
def test_kvcache_growth_keeps_contents_and_counts_bytes():
    c = KVCache()
    ks, vs = [], []
    with torch.no_grad():
        for t in [5, 1, 1, 20, 3, 40]:
            k, v = torch.randn(2, t, 2, 4), torch.randn(2, t, 2, 6)
            ks.append(k)
            vs.append(v)
            kall, vall = c.append(k, v)
            assert torch.equal(kall, torch.cat(ks, 1)) and torch.equal(vall, torch.cat(vs, 1))
            assert c.nbytes == c.length * 2 * 2 * (4 + 6) * 4
            assert c.capacity >= c.length
    assert c.length == 70 and c.capacity < 2 * 70 + 16  # amortized doubling, no runaway
    with torch.no_grad():
        c.append(torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 6))
        cap, ptr = c.capacity, c.k.data_ptr()
        assert cap >= 2 * 70  # doubled
        for _ in range(cap - c.length):  # fills the spare capacity in place
            c.append(torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 6))
        assert c.k.data_ptr() == ptr and c.capacity == cap
    c.reset()
    assert c.length == 0 and c.k is None and c.nbytes == 0


def test_kvcache_key_only_and_preallocation():
    c = KVCache(capacity=32)
    with torch.no_grad():
        k, v = c.append(torch.randn(1, 3, 1, 8))
        assert v is None and c.capacity == 32 and c.nbytes == 3 * 8 * 4
        ptr = c._k.data_ptr()
        c.append(torch.randn(1, 5, 1, 8))
        assert c._k.data_ptr() == ptr  # written in place, no reallocation
    with pytest.raises(ValueError, match="key-only"):
        c.append(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))


# ----------------------------------------------------------------------------- bad input
def test_bad_input():
    with pytest.raises(ValueError, match="dim"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="kv_heads"):
        Attention(32, 4, kv_heads=3)
    with pytest.raises(ValueError, match="backend"):
        Attention(32, 4, backend="nope")
    with pytest.raises(ValueError, match="fraction"):
        RotaryEmbedding(8, fraction=0.0)
    layer = _layer()
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(5, DIM))
    with pytest.raises(ValueError, match="valid"):
        layer(_x(), valid=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="state"):
        layer(_x(), state=(1, 2))
    _, c = layer(_x(B=2))
    with pytest.raises(ValueError, match="batch"):
        layer(_x(B=3, T=1), c)
    with pytest.raises(ValueError, match="k has shape"):
        c.append(torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8))


@pytest.mark.parametrize("mod", [effattn.nn.attention, effattn.kv.contiguous, effattn.exact.rope])
def test_docstring_examples_run(mod):
    res = doctest.testmod(mod, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0


# ----------------------------------------------------------------------------- per-head gates hook
def _streaming(b, h, q, kv):
    return (kv < 1) | (q - kv < 3)


def test_head_gates_mix_each_kv_head_with_its_masked_output():
    layer, masked = _layer(kv_heads=2), _layer(kv_heads=2, mask_mod=_streaming)  # same seed: same weights
    x = _x(T=13)
    o_full, o_alt = layer.attend(x)[0], masked.attend(x)[0]
    layer.set_head_gates(torch.ones(2), _streaming)
    assert_fp32_close(layer(x)[0], layer.o_proj(o_full.flatten(2)), name="gates 1")
    layer.set_head_gates(torch.zeros(2), _streaming)
    assert_fp32_close(layer(x)[0], masked(x)[0], name="gates 0")
    layer.set_head_gates(torch.tensor([1.0, 0.25]), _streaming)
    want = torch.cat([o_full[:, :, :2], 0.25 * o_full[:, :, 2:] + 0.75 * o_alt[:, :, 2:]], dim=2)
    assert_fp32_close(layer.attend(x)[0], want, name="mixed heads")
    # decoding with gates equals the gated full forward (the mask sees absolute cache indices)
    with torch.no_grad():
        y, cache = layer(x[:, :7])
        steps = [y] + [layer(x[:, t : t + 1], cache)[0] for t in range(7, 13)]
    assert_fp32_close(torch.cat(steps, 1), layer(x)[0], name="gated decode")
    layer.set_head_gates(None)
    assert layer.head_gates is None
    assert_fp32_close(layer(x)[0], layer.o_proj(o_full.flatten(2)), name="gates removed")


def test_head_gates_are_differentiable_and_change_the_cache_pattern():
    layer = _layer(kv_heads=2, window=4)
    gates = torch.full((2,), 0.5, requires_grad=True)
    layer.set_head_gates(gates, _streaming)
    y, cache = layer(_x(T=9))
    (g,) = torch.autograd.grad(y.square().sum(), gates)
    assert g.shape == (2,) and bool(g.abs().gt(0).all())
    # while gated, the window layer keeps its whole cache (the gate's mask sees absolute indices)
    assert type(cache) is KVCache and layer.cache_pattern.mods
    layer.set_head_gates(None)
    assert type(layer(_x(T=9))[1]) is WindowKVCache


def test_head_gates_bad_input():
    layer = _layer(kv_heads=2)
    with pytest.raises(ValueError, match=r"gates must have shape \[kv_heads\] = \[2\]"):
        layer.set_head_gates(torch.ones(4), _streaming)
    with pytest.raises(ValueError, match=r"gates must lie in \[0, 1\]"):
        layer.set_head_gates(torch.tensor([0.5, 1.5]), _streaming)
    with pytest.raises(TypeError, match="gates must be a floating tensor"):
        layer.set_head_gates(torch.ones(2, dtype=torch.long), _streaming)
    with pytest.raises(ValueError, match="needs the mask_mod"):
        layer.set_head_gates(torch.ones(2))
    assert layer.head_gates is None
