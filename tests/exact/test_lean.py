"""Lean Attention (stream-K decode): equal to decode_attention / the reference, balanced, paged, bounded."""

import pytest
import torch

from effattn.exact import attention, decode_attention, lean_decode_attention, lean_schedule
from effattn.kv import PagedKVCache, naive_paged_decode_attention

SHAPES = [  # B, T_new, T_max, H_q, H_kv, D
    (2, 1, 97, 4, 2, 40),
    (3, 3, 257, 6, 2, 16),
    (1, 1, 1, 2, 1, 8),
    (2, 2, 63, 3, 3, 60),
]
SCHEDULES = [(1, 64), (3, 16), (7, 5), (64, 256)]  # num_workers, tile_size


def rel(a, b):
    return ((a - b).float().norm() / b.float().norm()).item()


def inputs(B, Tn, T, Hq, Hkv, D, Dv=None):
    q = torch.randn(B, Tn, Hq, D)
    k = torch.randn(B, T, Hkv, D)
    v = torch.randn(B, T, Hkv, Dv or D)
    lens = torch.randint(Tn, T + 1, (B,))
    lens[0] = T
    return q, k, v, lens


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sched", SCHEDULES)
@pytest.mark.parametrize(
    "kw", [{}, {"window": 17}, {"softcap": 2.5}, {"sinks": "s"}, {"window": 5, "sinks": "s", "softcap": 4.0}]
)
def test_equals_decode_attention(shape, sched, kw):
    q, k, v, lens = inputs(*shape, Dv=shape[-1] + 3)
    kw = dict(kw)
    if kw.get("sinks") == "s":
        kw["sinks"] = torch.randn(shape[3])
    o, lse = lean_decode_attention(q, k, v, lens, num_workers=sched[0], tile_size=sched[1], return_lse=True, **kw)
    r, rl = decode_attention(q, k, v, lens, return_lse=True, **kw)
    assert rel(o, r) < 1e-5
    assert torch.allclose(lse, rl, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("alibi", [False, True])
def test_equals_reference_attention_per_row(shape, alibi):
    """Each row against the float32 reference on its own valid cache (T_new queries bottom-right)."""
    B, Tn, T, Hq, Hkv, D = shape
    q, k, v, lens = inputs(*shape)
    slopes = torch.rand(Hq) if alibi else None
    o = lean_decode_attention(q, k, v, lens, num_workers=5, tile_size=8, alibi_slopes=slopes)
    for b in range(B):
        L = int(lens[b])
        ref = attention(
            q[b : b + 1], k[b : b + 1, :L], v[b : b + 1, :L], causal=True, alibi_slopes=slopes, backend="reference"
        )
        assert rel(o[b : b + 1], ref) < 1e-5


@pytest.mark.parametrize("units, workers", [([5, 2, 3], 4), ([1], 8), ([40, 1, 1, 1, 17], 6), ([0, 9, 0], 4)])
def test_schedule_is_balanced_and_contiguous(units, workers):
    bounds = lean_schedule(torch.tensor(units), workers)
    per = bounds[1:] - bounds[:-1]
    assert int(bounds[0]) == 0 and int(bounds[-1]) == sum(units)
    assert int(per.max()) - int(per.min()) <= 1 and int(per.min()) >= 1
    assert len(per) == min(workers, sum(units))


def test_workers_span_rows_and_balance_mixed_lengths():
    """Rows of very different lengths: every worker does ceil or floor of U / W tiles, runs span rows,
    and the result is independent of the schedule."""
    torch.manual_seed(1)
    q, k, v, _ = inputs(4, 1, 300, 2, 1, 16)
    lens = torch.tensor([300, 7, 150, 33])
    tiles = -(-lens // 16)  # H_kv = 1: one row per batch entry
    bounds = lean_schedule(tiles, 6)
    per = bounds[1:] - bounds[:-1]
    assert int(per.max()) - int(per.min()) <= 1
    outs = [lean_decode_attention(q, k, v, lens, num_workers=w, tile_size=16) for w in (1, 2, 6, 13, 100)]
    for o in outs[1:]:
        assert rel(o, outs[0]) < 1e-6


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("sched", [(3, 8), (5, 16), (64, 256)])
def test_paged_equals_naive_paged_and_contiguous(block_size, sched):
    torch.manual_seed(2)
    Hq, Hkv, D = 4, 2, 24
    cache = PagedKVCache(num_blocks=64, block_size=block_size, kv_heads=Hkv, head_dim=D)
    lengths = [37, 1, 90]
    ids = [cache.allocate() for _ in lengths]  # interleaved appends: the rows' blocks are scattered over the pool
    for step in range(max(lengths)):
        for s, n in zip(ids, lengths):
            if step < n:
                kk, vv = torch.randn(1, Hkv, D), torch.randn(1, Hkv, D)
                cache.append(s, kk, vv)
    tables, lens = cache.block_tables(ids)
    q = torch.randn(len(ids), 1, Hq, D)
    o = lean_decode_attention(
        q, cache.key_blocks, cache.value_blocks, lens, block_table=tables, num_workers=sched[0], tile_size=sched[1]
    )
    assert rel(o, naive_paged_decode_attention(q, cache, ids)) < 1e-5
    kc = torch.stack([cache.key_blocks[tables[b].clamp(min=0)].flatten(0, 1) for b in range(len(ids))])
    vc = torch.stack([cache.value_blocks[tables[b].clamp(min=0)].flatten(0, 1) for b in range(len(ids))])
    assert rel(o, decode_attention(q, kc, vc, lens)) < 1e-5


def test_unused_slots_never_matter_and_bad_visible_keys_poison_their_rows():
    torch.manual_seed(3)
    q, k, v, _ = inputs(2, 1, 50, 2, 1, 8)
    lens = torch.tensor([50, 20])
    clean = lean_decode_attention(q, k, v, lens, num_workers=3, tile_size=8)
    k2, v2 = k.clone(), v.clone()
    k2[1, 30], v2[1, 40] = float("nan"), float("inf")  # past row 1's length
    k2[0, 3, 0, 1] = float("-inf")  # visible to row 0 only
    o = lean_decode_attention(q, k2, v2, lens, num_workers=3, tile_size=8)
    assert torch.isnan(o[0]).all()
    assert torch.equal(o[1], clean[1])
    w = lean_decode_attention(q, k2, v2, lens, num_workers=3, tile_size=8, window=10)  # key 3 out of the window
    assert torch.allclose(w, decode_attention(q, k, v, lens, window=10), atol=1e-6)


def test_decode_attention_lean_backend_and_errors():
    q, k, v, lens = inputs(2, 1, 40, 4, 2, 8)
    assert rel(decode_attention(q, k, v, lens, backend="lean", num_splits=3), decode_attention(q, k, v, lens)) < 1e-5
    with pytest.raises(ValueError, match="num_workers"):
        lean_decode_attention(q, k, v, lens, num_workers=0)
    with pytest.raises(ValueError, match="tile_size"):
        lean_decode_attention(q, k, v, lens, tile_size=-1)
    with pytest.raises(ValueError, match="cache_seqlens"):
        lean_decode_attention(q, k, v, torch.tensor([41, 3]))
    with pytest.raises(ValueError, match="alibi_slopes"):
        lean_decode_attention(q, k, v, lens, alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="block_table"):
        lean_decode_attention(q, k, v, lens, block_table=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="cache_seqlens"):
        lean_decode_attention(q, k, v, block_table=torch.zeros(2, 2, dtype=torch.long))
