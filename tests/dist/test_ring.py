"""ring_attention on spawned gloo groups equals single-process attention (output, LSE, q/k/v grads);
K/V travel one block at a time; bad input raises on every rank without hanging."""

import doctest

import pytest
import torch

import effattn
import effattn.dist.ring
from effattn.dist import count_bytes, ring_attention, shard_positions, shard_sequence, spawn
from tests.dist.attention_cases import (
    assert_close,
    assert_low_precision_close,
    compare,
    compare_low_precision,
    error_of,
    run_cases,
)
from tests.helpers import rel_rms

CASES = [  # (layout, causal, Hq, Hkv, D, Dv, chunk tokens per half shard)
    ("zigzag", True, 4, 2, 24, 24, 3),
    ("zigzag", False, 3, 3, 40, 24, 2),
    ("contiguous", True, 4, 1, 40, 40, 3),
    ("contiguous", False, 4, 2, 24, 16, 1),
    ("zigzag", True, 2, 1, 40, 40, 1),  # one token per chunk
]


def _correctness(rank, world):
    results = []
    for layout, causal, Hq, Hkv, D, Dv, c in CASES:
        T = 2 * world * c

        def shard(t, dim, layout=layout):
            return shard_sequence(t, layout=layout, dim=dim)

        def op(q, k, v, layout=layout, causal=causal):
            return ring_attention(q, k, v, causal=causal, layout=layout, return_lse=True)

        errs = compare(op, shard, seed=world, T=T, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, ref_kwargs={"causal": causal})
        results.append((f"rank {rank} {layout} causal={causal} Hq={Hq} Hkv={Hkv} D={D}", errs))
    # a custom scale, and the output alone (no LSE) still differentiable
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 4 * world, 2, 24, requires_grad=True) for _ in range(3))
    ref = effattn.attention(q, k, v, causal=True, scale=0.3, backend="reference")
    ref.square().sum().backward()
    # non-contiguous shards (a [B, H, T, D] tensor seen as [B, T, H, D]) travel as well
    local = [shard_sequence(t.detach(), layout="zigzag").transpose(1, 2).contiguous() for t in (q, k, v)]
    local = [t.transpose(1, 2).requires_grad_() for t in local]
    assert not local[0].is_contiguous()
    o = ring_attention(*local, causal=True, scale=0.3, backend="tiled")  # each block on the tiled engine
    o.square().sum().backward()
    errs = {"o": rel_rms(o, shard_sequence(ref.detach(), layout="zigzag"))}
    for n, a, b in zip("qkv", local, (q, k, v)):
        errs[f"d{n}"] = rel_rms(a.grad, shard_sequence(b.grad, layout="zigzag"))
    results.append((f"rank {rank} scale=0.3 tiled blocks, no lse, non-contiguous", errs))
    return results


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ring_equals_single_process(world):
    results = run_cases(_correctness, world)
    assert_close(results)


def _low_precision(rank, world):
    results = []
    for dtype in (torch.bfloat16,):
        for layout, causal in (("zigzag", True), ("contiguous", False)):

            def shard(t, dim, layout=layout):
                return shard_sequence(t, layout=layout, dim=dim)

            def op(q, k, v, layout=layout, causal=causal):
                return ring_attention(q, k, v, causal=causal, layout=layout)

            errs = compare_low_precision(op, shard, dtype, causal=causal, seed=world, T=8 * world)
            results.append((f"rank {rank} {dtype} {layout} causal={causal}", errs))
    return results


def test_low_precision_flash_rule():
    """bf16 shards: error <= 2x that of the reference run in the same dtype (+ atol)."""
    assert_low_precision_close(run_cases(_low_precision, 2))


def _nonfinite(rank, world):
    """NaN/inf in some keys and values: rows that cannot see them equal a clean run, rows that can are NaN
    exactly where single-process attention gives NaN, and no gradient of a clean entry is touched."""
    from effattn.dist import token_ring_attention

    results = []
    for name, op in (("ring", ring_attention), ("token_ring", token_ring_attention)):
        for layout in ("zigzag", "contiguous"):
            g = torch.Generator().manual_seed(5)
            T = 4 * world
            q, k, v, do = (torch.randn(2, T, 4, 24, generator=g) for _ in range(4))
            k, v = k[:, :, :2].clone(), v[:, :, :2].clone()
            k[0, T - 2, 0, 3] = float("nan")  # late positions: most rows never see them
            v[1, T - 3, 1, 0] = float("inf")
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            o = effattn.attention(q, k, v, causal=True)
            (o.nan_to_num(0.0) * do).sum().backward()
            local = [shard_sequence(t.detach(), layout=layout).requires_grad_() for t in (q, k, v)]
            o_l = op(*local, causal=True, layout=layout)
            (o_l.nan_to_num(0.0) * shard_sequence(do, layout=layout)).sum().backward()
            ref = shard_sequence(o.detach(), layout=layout)
            same_nan = torch.equal(torch.isnan(o_l), torch.isnan(ref)) and bool(torch.isnan(o).any())
            clean = ~torch.isnan(ref)
            errs = {"o": rel_rms(o_l[clean], ref[clean]) + (0.0 if same_nan else 1.0)}
            for n, a, b in zip("qkv", local, (q, k, v)):
                ref_grad = shard_sequence(b.grad, layout=layout)
                errs[f"d{n}"] = rel_rms(a.grad, ref_grad) if torch.isfinite(ref_grad).all() else 1.0
            results.append((f"rank {rank} {name} {layout} non-finite keys", errs))
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_nonfinite_keys_reach_only_rows_that_see_them(world):
    assert_close(run_cases(_nonfinite, world))


def _traffic(rank, world):
    """Bytes per P2P call: each forward step moves exactly one K/V block, the backward one K/V block and
    one float32 dK/dV block."""
    torch.manual_seed(0)
    B, Tl, Hq, Hkv, D, Dv = 1, 6, 4, 2, 24, 16
    q = torch.randn(B, Tl, Hq, D, requires_grad=True)
    k = torch.randn(B, Tl, Hkv, D, requires_grad=True)
    v = torch.randn(B, Tl, Hkv, Dv, requires_grad=True)
    with count_bytes() as fwd:
        o = ring_attention(q, k, v, causal=True)
    with count_bytes() as bwd:
        o.sum().backward()
    return fwd.calls, bwd.calls, (k.numel() + v.numel()) * 4


@pytest.mark.parametrize("world", [2, 4])
def test_each_step_moves_one_kv_block(world):
    for fwd, bwd, block in spawn(_traffic, world, timeout=60, deadline=180):
        assert [c[0] for c in fwd] == ["kv"] * (world - 1)  # P-1 hops, nothing else travels
        assert all(sent == received == block for _, sent, received in fwd)  # one block in, one out
        kv = [c for c in bwd if c[0] == "kv"]
        dkv = [c for c in bwd if c[0] == "dkv"]
        assert len(kv) == world - 1 and len(dkv) == world  # dK/dV need one more hop to get home
        assert all(s == r == block for _, s, r in kv + dkv)
        assert sum(r for _, _, r in fwd) == (world - 1) * block  # never the full K/V at once, in total P-1 blocks


def _bad_inputs(rank, world):
    out = {}
    q = torch.randn(1, 6, 4, 8)
    out["odd zigzag"] = error_of(ring_attention, q[:, :5], q[:, :5], q[:, :5], causal=True)
    out["heads"] = error_of(ring_attention, q, q[:, :, :3], q[:, :, :3], layout="contiguous")
    out["lengths"] = error_of(ring_attention, q, q[:, :4], q[:, :4], layout="contiguous")
    # rank 1 holds a shard of another length: every rank must raise, none may wait for a block
    T = 4 if rank == 1 else 6
    x = torch.randn(1, T, 2, 8)
    out["mismatch"] = error_of(ring_attention, x, x, x, layout="contiguous")
    # the layout positions a rank would need for RoPE are available without communication
    out["positions"] = shard_positions(8 * world, layout="zigzag").tolist()  # rank and P from the group
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_bad_input_raises_on_every_rank(world):
    for rank, out in enumerate(spawn(_bad_inputs, world, timeout=20, deadline=60)):
        assert "local length must be even" in out["odd zigzag"] and "T = 5" not in out["odd zigzag"], out
        assert "heads_q (4) must be a multiple of heads_kv (3)" in out["heads"], out
        assert "one length" in out["lengths"], out
        assert "different shapes" in out["mismatch"] and "rank 1: q (1, 4, 2, 8)" in out["mismatch"], out
        c = 4  # T = 8 P tokens in 2 P chunks
        late = 2 * world - 1 - rank
        assert out["positions"] == [*range(c * rank, c * rank + c), *range(c * late, c * late + c)]


def _mismatched_groups(rank, world):
    group = torch.distributed.new_group(list(range(world)))  # the same members, another communicator
    x = torch.randn(1, 4, 2, 8)
    try:
        ring_attention(x, x, x, group=group if rank == 0 else None)
    except RuntimeError as e:
        return f"RuntimeError: {e}"
    return "no error"


def test_mismatched_groups_fail_on_every_rank_after_the_timeout():
    """Rank 0 passes one group, rank 1 another: no rank hangs past the group's timeout."""
    for out in spawn(_mismatched_groups, 2, timeout=3, deadline=60):
        assert out.startswith("RuntimeError") and ("Timed out" in out or "closed by peer" in out), out


def test_docstring_example():
    res = doctest.testmod(effattn.dist.ring, extraglobs={"torch": torch})
    assert res.attempted > 0 and res.failed == 0
