"""Ring attention and TokenRing with the local-call options: softcap, sinks, GQA checks, the
``precomputed`` result of activation checkpointing, and the backward's fixed score tiles."""

from __future__ import annotations

import pytest
import torch

import effattn
import effattn.dist._blocks as blocks
from effattn.dist import count_bytes, ring_attention, shard_positions, shard_sequence, spawn, token_ring_attention
from effattn.dist._blocks import tile_shape
from tests.dist.attention_cases import error_of
from tests.helpers import rel_rms

FNS = {"ring": ring_attention, "token_ring": token_ring_attention}


def _problem(B=2, T=24, Hq=4, Hkv=2, D=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g) * 2  # large scores so that the softcap bends them
    k = torch.randn(B, T, Hkv, D, generator=g) * 2
    v = torch.randn(B, T, Hkv, D, generator=g)
    sinks = torch.randn(Hq, generator=g)
    do = torch.randn(B, T, Hq, D, generator=g)
    dlse = torch.randn(B, Hq, T, generator=g)
    return q, k, v, sinks, do, dlse


def _options_worker(rank, world, tile):
    if tile is not None:
        blocks.BACKWARD_TILE_ELEMENTS = tile  # many small tiles: rows and columns both split
    out = []
    for method, layout, causal in [
        ("ring", "zigzag", True),
        ("token_ring", "contiguous", True),
        ("ring", "zigzag", False),
    ]:
        q, k, v, sinks, do, dlse = _problem()
        leaves = [shard_sequence(t, layout=layout).requires_grad_() for t in (q, k, v)]
        s = sinks.clone().requires_grad_()
        o, lse = FNS[method](*leaves, causal=causal, layout=layout, softcap=3.0, sinks=s, return_lse=True)
        (
            (o * shard_sequence(do, layout=layout)).sum() + (lse * shard_sequence(dlse, layout=layout, dim=2)).sum()
        ).backward()
        ds = s.grad.clone()
        torch.distributed.all_reduce(ds)  # a replicated weight: per-rank shares
        out.append(((method, layout, causal), o.detach(), lse.detach(), [t.grad for t in leaves], ds))
    return out


@pytest.mark.parametrize("world,tile", [(2, None), (2, 64), (4, 200)])
def test_softcap_and_sinks_match_single_process(world, tile):
    results = spawn(_options_worker, world, tile, timeout=60, deadline=180)
    q, k, v, sinks, do, dlse = _problem()
    for i, ((method, layout, causal), *_) in enumerate(results[0]):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        o, lse = effattn.attention(
            *leaves[:3], causal=causal, softcap=3.0, sinks=leaves[3], return_lse=True, backend="reference"
        )
        ((o * do).sum() + (lse * dlse).sum()).backward()
        for rank, per_rank in enumerate(results):
            _, o_l, lse_l, grads, ds = per_rank[i]

            def mine(t, dim=1, rank=rank, layout=layout):
                return t.index_select(dim, shard_positions(t.shape[dim], rank, world, layout))

            case = (method, layout, causal, rank)
            assert rel_rms(o_l, mine(o.detach())) < 1e-5, case
            assert rel_rms(lse_l, mine(lse.detach(), 2)) < 1e-5, case
            for name, g, ref in zip(("dq", "dk", "dv"), grads, leaves[:3]):
                assert rel_rms(g, mine(ref.grad)) < 1e-4, (case, name, rel_rms(g, mine(ref.grad)))
            assert rel_rms(ds, leaves[3].grad) < 1e-4, (case, "dsinks")


def _precomputed_worker(rank, world):
    out = {}
    for method, fn in FNS.items():
        q, k, v, _, do, _ = _problem()
        local = [shard_sequence(t) for t in (q, k, v)]
        first = [t.clone().requires_grad_() for t in local]
        o1, lse1 = fn(*first, causal=True, return_lse=True)
        (o1 * shard_sequence(do)).sum().backward()
        again = [t.clone().requires_grad_() for t in local]
        with count_bytes() as counter:
            o2 = fn(*again, causal=True, precomputed=(o1.detach(), lse1.detach()))
            forward_tags = [t for t, _, _ in counter.calls]
        (o2 * shard_sequence(do)).sum().backward()
        same = torch.equal(o1, o2) and all(torch.equal(a.grad, b.grad) for a, b in zip(first, again))
        out[method] = (same, forward_tags)
    return out


def test_precomputed_skips_the_ring_and_keeps_the_backward():
    for per_rank in spawn(_precomputed_worker, 2, timeout=60, deadline=120):
        for method, (same, tags) in per_rank.items():
            assert same, method
            assert not [t for t in tags if t in ("kv", "q", "partial")], (method, tags)


def _bad(rank, world):
    q = torch.randn(1, 4, 3, 8)
    k = v = torch.randn(1, 4, 2, 8)
    ok = torch.randn(1, 4, 2, 8)
    return [
        error_of(ring_attention, q, k, v, layout="contiguous"),
        error_of(token_ring_attention, q, k, v, layout="contiguous"),
        error_of(ring_attention, ok, ok, ok, layout="contiguous", sinks=torch.zeros(3)),
        error_of(ring_attention, ok, ok, ok, layout="contiguous", softcap=-1.0),
        error_of(ring_attention, ok, ok, ok, layout="contiguous", precomputed=(ok, torch.zeros(1, 2, 5))),
    ]


def test_bad_options_raise_on_every_rank():
    for msgs in spawn(_bad, 2, timeout=30, deadline=60):
        assert "3" in msgs[0] and "2" in msgs[0] and "heads" in msgs[0].lower(), msgs[0]
        assert "heads" in msgs[1].lower(), msgs[1]
        assert "sinks" in msgs[2] and "[2]" in msgs[2], msgs[2]
        assert "softcap" in msgs[3], msgs[3]
        assert "precomputed" in msgs[4], msgs[4]


def test_tile_shape_stays_within_the_budget():
    for bh, rows, cols, budget in [(8, 2048, 2048, 2**20), (1, 7, 5, 6), (64, 1, 10**6, 2**20), (3, 100, 1, 10)]:
        r, c = tile_shape(bh, rows, cols, budget)
        assert 1 <= r <= rows and 1 <= c <= cols
        assert bh * r * c <= max(budget, bh), (bh, rows, cols, budget, r, c)
