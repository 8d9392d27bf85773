"""token_ring_attention on spawned gloo groups equals single-process attention (output, LSE, grads);
queries travel forward one block per step, partial results go back to their owner, K/V never move."""

import doctest

import pytest
import torch

import effattn.dist.token_ring
from effattn.dist import count_bytes, shard_sequence, spawn, token_ring_attention
from tests.dist.attention_cases import (
    assert_close,
    assert_low_precision_close,
    compare,
    compare_low_precision,
    error_of,
    run_cases,
)

CASES = [  # (layout, causal, Hq, Hkv, D, Dv, chunk tokens per half shard)
    ("zigzag", True, 4, 2, 40, 24, 3),
    ("zigzag", False, 2, 1, 24, 24, 2),
    ("contiguous", True, 3, 3, 24, 40, 2),
    ("contiguous", False, 4, 4, 40, 16, 1),
    ("zigzag", True, 2, 2, 24, 24, 1),  # one token per chunk
]


def _correctness(rank, world):
    results = []
    for layout, causal, Hq, Hkv, D, Dv, c in CASES:

        def shard(t, dim, layout=layout):
            return shard_sequence(t, layout=layout, dim=dim)

        def op(q, k, v, layout=layout, causal=causal):
            return token_ring_attention(q, k, v, causal=causal, layout=layout, return_lse=True)

        errs = compare(op, shard, seed=world + 7, T=2 * world * c, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv,
                       ref_kwargs={"causal": causal})
        results.append((f"rank {rank} {layout} causal={causal} Hq={Hq} Hkv={Hkv} D={D}", errs))
    return results


@pytest.mark.parametrize("world", [1, 2, 4])
def test_token_ring_equals_single_process(world):
    assert_close(run_cases(_correctness, world))


def _low_precision(rank, world):
    results = []
    for dtype in (torch.bfloat16,):
        for layout, causal in (("zigzag", True), ("contiguous", False)):

            def shard(t, dim, layout=layout):
                return shard_sequence(t, layout=layout, dim=dim)

            def op(q, k, v, layout=layout, causal=causal):
                return token_ring_attention(q, k, v, causal=causal, layout=layout)

            errs = compare_low_precision(op, shard, dtype, causal=causal, seed=world, T=8 * world)
            results.append((f"rank {rank} {dtype} {layout} causal={causal}", errs))
    return results


def test_low_precision_flash_rule():
    """bf16 shards: error <= 2x that of the reference run in the same dtype (+ atol)."""
    assert_low_precision_close(run_cases(_low_precision, 2))


def _traffic(rank, world):
    torch.manual_seed(0)
    B, Tl, Hq, Hkv, D, Dv = 1, 6, 4, 2, 24, 16
    q = torch.randn(B, Tl, Hq, D, requires_grad=True)
    k = torch.randn(B, Tl, Hkv, D, requires_grad=True)
    v = torch.randn(B, Tl, Hkv, Dv, requires_grad=True)
    with count_bytes() as fwd:
        o = token_ring_attention(q, k, v, causal=True)
    with count_bytes() as bwd:
        o.sum().backward()
    return fwd.calls, bwd.calls, (B, Tl, Hq, D, Dv)


@pytest.mark.parametrize("world", [2, 4])
def test_queries_forward_partials_back(world):
    for rank, (fwd, bwd, (B, Tl, Hq, D, Dv)) in enumerate(spawn(_traffic, world, timeout=60, deadline=180)):
        q_bytes = B * Tl * Hq * D * 4
        assert [c for c in fwd if c[0] == "q"] == [("q", q_bytes, q_bytes)] * (world - 1)
        row_stats = B * Tl * Hq * 4  # lse and delta travel with q and dO
        travel = q_bytes + B * Tl * Hq * Dv * 4 + 2 * row_stats
        assert [c for c in bwd if c[0] == "q"] == [("q", travel, travel)] * (world - 1)
        # zigzag causal: the queries of a later rank see half of this rank's keys with all their rows, those
        # of an earlier rank see all keys with their second half of rows; partials carry exactly those rows
        expect_fwd, expect_bwd = [], []
        for s in range(1, world):
            owner, helper = (rank - s) % world, (rank + s) % world
            rows_out = Tl if owner > rank else Tl // 2
            rows_in = Tl if rank > helper else Tl // 2
            expect_fwd.append(("partial", B * rows_out * Hq * (Dv + 1) * 4, B * rows_in * Hq * (Dv + 1) * 4))
            expect_bwd.append(("partial", B * rows_out * Hq * D * 4, B * rows_in * Hq * D * 4))
        assert [c for c in fwd if c[0] == "partial"] == expect_fwd
        assert [c for c in bwd if c[0] == "partial"] == expect_bwd
        assert len(fwd) == 2 * (world - 1) and len(bwd) == 2 * (world - 1)  # K, V, dK, dV never travel


def _bad_inputs(rank, world):
    q = torch.randn(1, 6, 4, 8)
    T = 2 if rank == 0 else 6
    x = torch.randn(1, T, 4, 8)
    return {
        "odd zigzag": error_of(token_ring_attention, q[:, :3], q[:, :3], q[:, :3]),
        "mismatch": error_of(token_ring_attention, x, x, x, causal=True),
        "layout": error_of(token_ring_attention, q, q, q, layout="striped"),
    }


@pytest.mark.parametrize("world", [2, 4])
def test_bad_input_raises_on_every_rank(world):
    for out in spawn(_bad_inputs, world, timeout=20, deadline=60):
        assert "local length must be even" in out["odd zigzag"], out
        assert "different shapes" in out["mismatch"] and "rank 0: q (1, 2, 4, 8)" in out["mismatch"], out
        assert "layout must be one of" in out["layout"], out


def test_docstring_example():
    res = doctest.testmod(effattn.dist.token_ring, extraglobs={"torch": torch})
    assert res.attempted > 0 and res.failed == 0
