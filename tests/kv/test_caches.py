"""effattn.kv caches: paged (block tables, prefix sharing, copy-on-write, decode through blocks),
KIVI quantized (error bound, packing, memory, decode accuracy, LM.generate) and bad input."""

from __future__ import annotations

import doctest
import functools
import math

import pytest
import torch

import effattn.kv.caches
import effattn.kv.paged
import effattn.kv.quantized
from effattn.exact.decode import decode_attention
from effattn.kv import (
    KVCache,
    PagedKVCache,
    PoolExhaustedError,
    QuantizedKVCache,
    make_cache,
    naive_paged_decode_attention,
    paged_decode_attention,
)
from effattn.kv.quantized import dequantize, pack_bits, quantize, unpack_bits
from effattn.nn import LM, Attention, LMConfig
from tests.helpers import assert_fp32_close, rel_rms


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- paged
def _filled_paged(lengths, block_size=5, kv_heads=2, D=12, Dv=None, num_blocks=64, seed=0):
    Dv = Dv or D
    cache = PagedKVCache(num_blocks, block_size, kv_heads, D, Dv)
    ids, ks, vs = [], [], []
    for i, L in enumerate(lengths):
        k, v = _rand(L, kv_heads, D, seed=seed + 2 * i), _rand(L, kv_heads, Dv, seed=seed + 2 * i + 1)
        s = cache.allocate()
        cache.append(s, k[: L // 2], v[: L // 2])  # two appends: the second starts mid-block
        cache.append(s, k[L // 2 :], v[L // 2 :])
        ids.append(s), ks.append(k), vs.append(v)
    return cache, ids, ks, vs


@pytest.mark.parametrize("partition_blocks", [1, 2, None])
def test_paged_decode_matches_contiguous_decode(partition_blocks):
    lengths = [13, 1, 27, 6]  # block size 5 divides none of them; 1 is a lone token
    Hq, Hkv, D, Dv = 6, 2, 12, 10  # GQA: 3 query heads per KV head; D_v != D
    cache, ids, ks, vs = _filled_paged(lengths, block_size=5, kv_heads=Hkv, D=D, Dv=Dv)
    q = _rand(len(lengths), Hq, D, seed=99)
    out = paged_decode_attention(q, cache, ids, partition_blocks=partition_blocks)
    # the same tokens in contiguous caches, one per sequence, through the split-KV decode
    for i, L in enumerate(lengths):
        c = KVCache()
        kc, vc = c.append(ks[i][None], vs[i][None])
        ref = decode_attention(q[i][None, None], kc, vc)[0, 0]
        assert_fp32_close(out[i], ref, name=f"sequence {i} (length {L})")
        k_g, v_g = cache.gather(ids[i])
        assert torch.equal(k_g, ks[i]) and torch.equal(v_g, vs[i])
    assert_fp32_close(out, naive_paged_decode_attention(q, cache, ids))
    # padded batch through decode_attention with cache_seqlens gives the same rows
    Lmax = max(lengths)
    kpad = torch.zeros(len(lengths), Lmax, Hkv, D)
    vpad = torch.zeros(len(lengths), Lmax, Hkv, Dv)
    for i, L in enumerate(lengths):
        kpad[i, :L], vpad[i, :L] = ks[i], vs[i]
    ref = decode_attention(q[:, None], kpad, vpad, torch.tensor(lengths), num_splits=3)[:, 0]
    assert_fp32_close(out, ref)


def test_paged_decode_query_forms_lse_and_empty_sequence():
    cache, ids, _, _ = _filled_paged([9, 4], kv_heads=1, D=8)
    empty = cache.allocate()
    q = _rand(3, 2, 8, seed=5)
    o3, lse = paged_decode_attention(q, cache, [*ids, empty], return_lse=True)
    o4 = paged_decode_attention(q[:, None], cache, [*ids, empty])
    assert o3.shape == (3, 2, 8) and o4.shape == (3, 1, 2, 8) and lse.shape == (3, 2)
    assert torch.equal(o3, o4[:, 0])
    assert torch.equal(o3[2], torch.zeros(2, 8)) and bool((lse[2] == -math.inf).all())
    k, _ = cache.gather(ids[0])
    ref_lse = torch.logsumexp(torch.einsum("hd,lhd->hl", q[0], k.expand(-1, 2, -1)) / math.sqrt(8), -1)
    assert_fp32_close(lse[0], ref_lse)


def test_fork_shares_blocks_and_copy_on_write_keeps_views():
    bs, H, D = 4, 2, 8
    cache = PagedKVCache(16, bs, H, D)
    k, v = _rand(10, H, D, seed=1), _rand(10, H, D, seed=2)
    a = cache.allocate()
    cache.append(a, k, v)  # 3 blocks, the last one half full
    used = cache.num_used_blocks
    b = cache.fork(a)
    assert cache.num_used_blocks == used and cache.block_table(a) == cache.block_table(b)
    assert cache.nbytes == used * bs * H * 2 * D * 4  # shared blocks count once
    ka, va = _rand(3, H, D, seed=3), _rand(3, H, D, seed=4)
    kb, vb = _rand(5, H, D, seed=5), _rand(5, H, D, seed=6)
    cache.append(a, ka, va)  # writes into the shared half-full block: copy-on-write
    cache.append(b, kb, vb)
    ta, tb = cache.block_table(a), cache.block_table(b)
    assert ta[:2] == tb[:2] and ta[2] != tb[2]  # full prefix blocks still shared, the last one copied
    ga, gb = cache.gather(a), cache.gather(b)
    assert torch.equal(ga[0], torch.cat([k, ka])) and torch.equal(ga[1], torch.cat([v, va]))
    assert torch.equal(gb[0], torch.cat([k, kb])) and torch.equal(gb[1], torch.cat([v, vb]))
    # decode against both sees each sequence's own tokens
    q = _rand(2, 4, D, seed=7)
    assert_fp32_close(paged_decode_attention(q, cache, [a, b]), naive_paged_decode_attention(q, cache, [a, b]))
    # freeing one keeps the shared blocks alive for the other
    cache.free(a)
    assert torch.equal(cache.gather(b)[0], torch.cat([k, kb]))
    cache.free(b)
    assert cache.num_free_blocks == 16 and cache.num_used_blocks == 0 and cache.nbytes == 0


def test_fork_of_block_aligned_prefix_needs_no_copy():
    cache = PagedKVCache(8, 4, 1, 4)
    a = cache.allocate()
    cache.append(a, _rand(8, 1, 4), _rand(8, 1, 4, seed=1))
    b = cache.fork(a)
    cache.append(b, _rand(1, 1, 4, seed=2), _rand(1, 1, 4, seed=3))
    assert cache.block_table(b)[:2] == cache.block_table(a) and cache.num_used_blocks == 3


def test_free_returns_blocks_and_exhaustion_raises_without_change():
    cache = PagedKVCache(4, 4, 1, 4)
    a, b = cache.allocate(), cache.allocate()
    cache.append(a, _rand(9, 1, 4), _rand(9, 1, 4))  # 3 blocks
    assert cache.num_free_blocks == 1
    with pytest.raises(PoolExhaustedError, match="exhausted.*num_blocks"):
        cache.append(b, _rand(5, 1, 4), _rand(5, 1, 4))  # needs 2
    assert cache.seq_len(b) == 0 and cache.num_free_blocks == 1  # nothing changed
    c = cache.fork(a)
    cache.append(a, _rand(1, 1, 4), _rand(1, 1, 4))  # copy-on-write takes the last free block
    cache.append(c, _rand(1, 1, 4), _rand(1, 1, 4))  # c's last block is no longer shared: no copy, fits
    assert cache.num_free_blocks == 0
    with pytest.raises(PoolExhaustedError):
        cache.append(c, _rand(3, 1, 4), _rand(3, 1, 4))  # needs a fourth block
    cache.free(a)
    cache.append(c, _rand(3, 1, 4), _rand(3, 1, 4))
    cache.free(c)
    assert cache.num_free_blocks == 4
    with pytest.raises(PoolExhaustedError):
        cache.append_batch([b], _rand(1, 17, 1, 4), _rand(1, 17, 1, 4))


def test_append_batch_matches_per_sequence_appends():
    c1, c2 = PagedKVCache(16, 3, 2, 4), PagedKVCache(16, 3, 2, 4)
    ids1 = [c1.allocate() for _ in range(3)]
    ids2 = [c2.allocate() for _ in range(3)]
    k, v = _rand(3, 5, 2, 4), _rand(3, 5, 2, 4, seed=1)
    c1.append_batch(ids1, k, v)
    for i, s in enumerate(ids2):
        c2.append(s, k[i], v[i])
    for s1, s2 in zip(ids1, ids2):
        assert torch.equal(c1.gather(s1)[0], c2.gather(s2)[0]) and torch.equal(c1.gather(s1)[1], c2.gather(s2)[1])


def test_paged_bad_input():
    cache = PagedKVCache(4, 4, 2, 8)
    s = cache.allocate()
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(4, 0, 2, 8)
    with pytest.raises(ValueError, match="seq_id 7"):
        cache.append(7, _rand(1, 2, 8), _rand(1, 2, 8))
    with pytest.raises(ValueError, match="seq_id"):
        cache.gather(99)
    with pytest.raises(ValueError, match="heads_kv=2"):
        cache.append(s, _rand(1, 3, 8), _rand(1, 3, 8))
    with pytest.raises(ValueError, match="rank 3"):
        cache.append(s, _rand(1, 1, 2, 8), _rand(1, 1, 2, 8))
    with pytest.raises(TypeError, match="dtype"):
        cache.append(s, _rand(1, 2, 8).double(), _rand(1, 2, 8).double())
    cache.append(s, _rand(2, 2, 8), _rand(2, 2, 8))
    with pytest.raises(ValueError, match="multiple of the cache's heads_kv"):
        paged_decode_attention(_rand(1, 3, 8), cache, [s])
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(_rand(1, 2, 6), cache, [s])
    with pytest.raises(ValueError, match="seq_ids"):
        paged_decode_attention(_rand(2, 2, 8), cache, [s])
    with pytest.raises(ValueError, match="seq_ids 5"):
        paged_decode_attention(_rand(1, 2, 8), cache, [5])
    with pytest.raises(ValueError, match="one new token"):
        paged_decode_attention(_rand(1, 2, 2, 8), cache, [s])
    with pytest.raises(ValueError, match="distinct"):
        cache.append_batch([s, s], _rand(2, 1, 2, 8), _rand(2, 1, 2, 8))
    cache.free(s)
    with pytest.raises(ValueError, match="seq_id"):
        cache.free(s)


# ----------------------------------------------------------------------------- quantized
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (3, 2, 13), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, math.ceil(13 * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, 13), codes.int())


def _bound_ok(x, xq, scale, slack=1e-5):
    return bool(((x - xq).abs() <= scale / 2 * (1 + slack) + 1e-6).all())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_error_bound(bits):
    x = _rand(4, 32, 3, seed=bits) * 3
    for dim in (0, 1, 2):
        codes, scale, zero = quantize(x, bits, dim)
        assert codes.min() >= 0 and codes.max() <= 2**bits - 1
        assert _bound_ok(x, dequantize(codes, scale, zero), scale.expand_as(x))
    const = torch.full((5, 4), 0.7)  # scale 0: exact
    codes, scale, zero = quantize(const, bits, 0)
    assert torch.equal(dequantize(codes, scale, zero), const)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_cache_bound_residual_and_layout(bits):
    B, T, H, D, Dv, G, R = 2, 45, 3, 20, 12, 8, 5
    k, v = _rand(B, T, H, D, seed=1) * 2, _rand(B, T, H, Dv, seed=2)
    c = QuantizedKVCache(bits=bits, group_size=G, residual=R, value_group_size=5)  # 12 = 5 + 5 + 2
    for a, b in ((0, 7), (7, 30), (30, 31), (31, 45)):  # prefill and decode-sized appends
        kd, vd = c.append(k[:, a:b], v[:, a:b])
        nq = c.num_quantized
        assert kd.shape == (B, b, H, D) and vd.shape == (B, b, H, Dv) and c.length == b
        assert nq % G == 0 and b - nq < R + G and (b - nq >= R or nq == 0)  # KIVI's residual rule
        assert torch.equal(kd[:, nq:], k[:, nq:b]) and torch.equal(vd[:, nq:], v[:, nq:b])  # residual exact
    nq = c.num_quantized
    assert nq == 40
    # keys: per channel over groups of G tokens
    kg = k[:, :nq].reshape(B, nq // G, G, H, D)
    k_scale = (kg.amax(2, keepdim=True) - kg.amin(2, keepdim=True)) / (2**bits - 1)
    assert _bound_ok(kd[:, :nq].reshape(B, nq // G, G, H, D), kg, k_scale)
    # values: per token over groups of channels [0:5], [5:10], [10:12]
    for lo, hi in ((0, 5), (5, 10), (10, 12)):
        vg = v[:, :nq, :, lo:hi]
        v_scale = (vg.amax(-1, keepdim=True) - vg.amin(-1, keepdim=True)) / (2**bits - 1)
        assert _bound_ok(vd[:, :nq, :, lo:hi], vg, v_scale)
    if bits == 8:
        assert rel_rms(kd, k) < 1e-2 and rel_rms(vd, v) < 1e-2


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_nbytes_formula_and_factor(bits):
    B, T, H, D, G = 1, 256, 2, 64, 32
    c = QuantizedKVCache(bits=bits, group_size=G, residual=0)
    c.append(_rand(B, T, H, D), _rand(B, T, H, D, seed=1))
    assert c.num_quantized == T and c.num_residual == 0
    fp32 = B * T * H * 2 * D * 4
    codes = 2 * B * T * H * D * bits // 8
    scales = 2 * 4 * (B * (T // G) * H * D + B * T * H * (D // G))  # (scale, zero) of keys and values
    assert c.nbytes == codes + scales
    # per number: bits/8 bytes of code + 2*4/G bytes of scale and zero (float32 cache) vs 4 bytes
    assert fp32 / c.nbytes == pytest.approx(4 / (bits / 8 + 8 / G))
    # with a residual, those tokens cost full price
    r = QuantizedKVCache(bits=bits, group_size=G, residual=40)
    r.append(_rand(B, T, H, D), _rand(B, T, H, D, seed=1))
    assert r.num_residual == 64 and r.nbytes == c.nbytes * (T - 64) // T + B * 64 * H * 2 * D * 4


# Tolerance of the attention output, from the stated bound (no fitted constant): with key errors
# |dk| <= ek and value errors |dv| <= ev, every logit moves by at most delta = scale * |q|_1 * ek,
# each softmax weight by a factor within exp(+-2 delta), so |p' - p|_1 <= exp(2 delta) - 1 and
#     |o' - o| <= (exp(2 delta) - 1) * max|v| + ev.
# 8 bits makes this tight enough (~1e-2 relative) to also assert a small relative RMS error.
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_decode_close_to_full_precision(bits):
    B, T, Hq, Hkv, D = 2, 70, 4, 2, 16
    k, v = _rand(B, T, Hkv, D, seed=3), _rand(B, T, Hkv, D, seed=4)
    q = _rand(B, 1, Hq, D, seed=5)
    c = QuantizedKVCache(bits=bits, group_size=16, residual=8)
    kd, vd = c.append(k, v)
    o_full = decode_attention(q, k, v)
    o_q = decode_attention(q, kd, vd)
    scale = 1 / math.sqrt(D)
    ek = (kd - k).abs().amax(dim=(1, 3))  # [B, Hkv]
    ev = (vd - v).abs().amax(dim=(1, 3))
    G = Hq // Hkv
    delta = scale * q[:, 0].abs().sum(-1) * ek.repeat_interleave(G, 1)  # [B, Hq]
    bound = torch.expm1(2 * delta) * v.abs().amax(dim=(1, 3)).repeat_interleave(G, 1) + ev.repeat_interleave(G, 1)
    assert bool(((o_q - o_full).abs()[:, 0].amax(-1) <= bound * (1 + 1e-4) + 1e-6).all())
    if bits == 8:
        assert rel_rms(o_q, o_full) < 2e-2


def test_quantized_cache_padding_and_reset():
    c = QuantizedKVCache(bits=4, group_size=4, residual=2)
    valid = torch.tensor([[False, True, True], [True, True, True]])
    c.append(_rand(2, 3, 1, 4), _rand(2, 3, 1, 4), valid)
    assert torch.equal(c.valid, valid) and c.next_positions(2, 1, None, "cpu").tolist() == [[2], [3]]
    c.append(_rand(2, 5, 1, 4), _rand(2, 5, 1, 4))
    assert c.valid.shape == (2, 8) and c.key_positions()[0].tolist() == [0, 0, 1, 2, 3, 4, 5, 6]
    c.reset()
    assert c.length == 0 and c.nbytes == 0 and c.valid is None and c.k is None


def test_quantized_bad_input():
    for bad in (3, 16, 1, True, "2"):
        with pytest.raises(ValueError, match="bits"):
            QuantizedKVCache(bits=bad)
    with pytest.raises(ValueError, match="group_size"):
        QuantizedKVCache(group_size=0)
    with pytest.raises(ValueError, match="group_size"):
        QuantizedKVCache(group_size=-4)
    with pytest.raises(ValueError, match="residual"):
        QuantizedKVCache(residual=-1)
    with pytest.raises(ValueError, match="value_group_size"):
        QuantizedKVCache(value_group_size=0)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(4, dtype=torch.int32), 3)
    c = QuantizedKVCache(bits=2, group_size=4, residual=0)
    with pytest.raises(TypeError, match="v is required"):
        c.append(_rand(1, 2, 2, 8))
    with pytest.raises(ValueError, match="rank 4"):
        c.append(_rand(2, 2, 8), _rand(2, 2, 8))
    with pytest.raises(ValueError, match="v must match k"):
        c.append(_rand(1, 2, 2, 8), _rand(1, 2, 3, 8))
    c.append(_rand(1, 2, 2, 8), _rand(1, 2, 2, 8))
    with pytest.raises(ValueError, match="heads_kv"):
        c.append(_rand(1, 1, 3, 8), _rand(1, 1, 3, 8))
    with pytest.raises(TypeError, match="dtype"):
        c.append(_rand(1, 1, 2, 8).double(), _rand(1, 1, 2, 8).double())
    with pytest.raises(ValueError, match="valid"):
        c.append(_rand(1, 1, 2, 8), _rand(1, 1, 2, 8), torch.ones(1, 2, dtype=torch.bool))


# ----------------------------------------------------------------------------- integration
def test_attention_layer_takes_quantized_cache_as_state():
    torch.manual_seed(0)
    layer = Attention(32, 4, kv_heads=2)
    x = _rand(2, 12, 32, seed=8)
    with torch.no_grad():
        y_ref, _ = layer(x)
        y0, cache = layer(x[:, :9], QuantizedKVCache(bits=8, group_size=4, residual=2))
        ys = [y0]
        for t in range(9, 12):
            y, cache = layer(x[:, t : t + 1], cache)
            ys.append(y)
    assert isinstance(cache, QuantizedKVCache) and cache.length == 12 and cache.num_quantized == 8
    assert rel_rms(torch.cat(ys, 1), y_ref) < 2e-2
    with pytest.raises(TypeError, match="state must be a KV cache"):
        layer(x, state=object())


def _tiny_lm(mixers="attention,mamba2"):
    torch.manual_seed(0)
    return LM(LMConfig(vocab_size=40, dim=32, n_layers=2, heads=4, kv_heads=2, mixers=mixers)).eval()


def test_generate_with_quantized_cache_matches_contiguous_at_8_bits():
    model = _tiny_lm()
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = model.generate(ids, max_new_tokens=8, temperature=0.0)
    q8 = functools.partial(QuantizedKVCache, bits=8, group_size=4, residual=4)
    out = model.generate(ids, max_new_tokens=8, temperature=0.0, kv_cache=q8)
    assert torch.equal(out, ref)
    assert torch.equal(model.generate(ids, max_new_tokens=8, temperature=0.0, kv_cache="contiguous"), ref)
    assert model.generate(ids, max_new_tokens=3, temperature=0.0, kv_cache="quantized").shape == (2, 15)
    # the logits of a state built by cache_state stay close to the full-precision ones
    state = model.cache_state(q8)
    assert isinstance(state[0], QuantizedKVCache) and state[1] is None
    logits_q, state = model(ids, state)
    logits, _ = model(ids)
    assert rel_rms(logits_q, logits) < 1e-2  # prefill already attends to dequantized keys (8 bits)
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        model.generate(ids, max_new_tokens=2, kv_cache="fp4")
    with pytest.raises(TypeError, match="KVCacheBase"):
        model.generate(ids, max_new_tokens=2, kv_cache=lambda: object())


def test_make_cache():
    assert isinstance(make_cache(), KVCache)
    c = make_cache("quantized", bits=4, residual=0)
    assert isinstance(c, QuantizedKVCache) and c.bits == 4 and c.residual == 0
    with pytest.raises(TypeError, match="kv_cache"):
        make_cache(3)


@pytest.mark.parametrize("mod", [effattn.kv.paged, effattn.kv.quantized, effattn.kv.caches])
def test_docstring_examples_run(mod):
    res = doctest.testmod(mod, extraglobs={"torch": torch})
    assert res.attempted > 0 and res.failed == 0
