"""ulysses_attention on spawned gloo groups equals single-process attention for any local attention call
(causal, windows, ALiBi, sinks, softcap, packed sequences, backends), with GQA KV heads replicated when
fewer than ranks; heads not divisible by P raise on every rank."""

import doctest

import pytest
import torch

import effattn
import effattn.dist.ulysses
from effattn.dist import count_bytes, replicate_kv_heads, shard_sequence, spawn, ulysses_attention
from tests.dist.attention_cases import assert_close, compare, error_of, run_cases
from tests.helpers import rel_rms


def _cases(world):
    g = torch.Generator().manual_seed(3)
    T = 4 * world
    cases = [  # (name, layout, Hq, Hkv, D, kwargs for both the op and the reference, op-only kwargs)
        ("causal", "contiguous", 4, 4, 40, {"causal": True}, {}),
        ("causal zigzag MQA", "zigzag", 4, 1, 24, {"causal": True}, {}),
        ("window GQA", "contiguous", 8, 2, 24, {"window": (3, 2)}, {"backend": "tiled"}),
        ("sinks (per-head, sliced)", "zigzag", 4, 2, 24, {"causal": True, "sinks": torch.randn(4, generator=g)}, {}),
        ("packed sequences", "contiguous", 4, 2, 40,
         {"causal": True, "cu_seqlens": torch.tensor([0, 3, T - 1, T])}, {}),
    ]
    if world == 2:  # ALiBi's first tiled backward costs ~2 s of start-up per process: one world size
        cases.append(("alibi (per-head slopes, sliced)", "contiguous", 4, 2, 24,
                      {"causal": True, "alibi_slopes": effattn.exact.alibi_slopes(4)}, {}))
    return cases


def _correctness(rank, world):
    results = []
    for name, layout, Hq, Hkv, D, kwargs, op_only in _cases(world):
        B = 1 if "cu_seqlens" in kwargs else 2

        def shard(t, dim, layout=layout):
            return shard_sequence(t, layout=layout, dim=dim)

        def op(q, k, v, layout=layout, kwargs=kwargs, op_only=op_only):
            return ulysses_attention(q, k, v, layout=layout, return_lse=True, **kwargs, **op_only)

        errs = compare(op, shard, seed=world, B=B, T=4 * world, Hq=Hq, Hkv=Hkv, D=D, ref_kwargs=kwargs)
        results.append((f"rank {rank} {name} ({layout}, Hq={Hq}, Hkv={Hkv}, D={D})", errs))
    # without the LSE the output alone is returned
    torch.manual_seed(0)
    full = torch.randn(1, 4 * world, world, 8)
    o = ulysses_attention(*(shard_sequence(full),) * 3)
    results.append((f"rank {rank} output only", {"o": rel_rms(o, shard_sequence(effattn.attention(full, full, full)))}))
    return results


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ulysses_equals_single_process(world):
    assert_close(run_cases(_correctness, world))


def _bad_inputs(rank, world):
    q = torch.randn(1, 4, 2 * world + 1, 8)
    x = torch.randn(1, 4, 2 * world, 8)
    return {
        "heads": error_of(ulysses_attention, q, q, q),
        "slopes": error_of(ulysses_attention, x, x, x, alibi_slopes=torch.ones(3)),
        "odd zigzag": error_of(ulysses_attention, x[:, :3], x[:, :3], x[:, :3], layout="zigzag"),
        "mismatch": error_of(ulysses_attention, *(x[:, : 2 + (rank == 0) * 2],) * 3),
    }


@pytest.mark.parametrize("world", [2, 4])
def test_bad_input_raises_on_every_rank(world):
    for out in spawn(_bad_inputs, world, timeout=20, deadline=60):
        assert f"heads_q ({2 * world + 1}" in out["heads"] and f"divisible by P={world}" in out["heads"], out
        assert f"alibi_slopes must be a tensor [heads_q] = [{2 * world}]" in out["slopes"], out
        assert "even local length" in out["odd zigzag"], out
        assert "different shapes" in out["mismatch"], out


def _traffic(rank, world):
    x = torch.randn(1, 6, 2 * world, 40, requires_grad=True)
    with count_bytes() as fwd:
        o = ulysses_attention(x, x, x, causal=True)
    with count_bytes() as bwd:
        o.sum().backward()
    return fwd.calls, bwd.calls, x.numel() * 4


@pytest.mark.parametrize("world", [2, 4])
def test_four_all_to_alls_of_the_shard(world):
    """q, k, v to head shards and the output back: 4 all-to-alls moving (P-1)/P of a shard each."""
    for fwd, bwd, shard in spawn(_traffic, world, timeout=20, deadline=60):
        moved = shard * (world - 1) // world
        assert fwd == [("all_to_all", moved, moved)] * 4
        assert bwd == [("all_to_all", moved, moved)] * 4  # the backward is the inverse all-to-alls


def test_replicate_kv_heads():
    k = torch.arange(2.0).view(1, 1, 2, 1)
    assert replicate_kv_heads(k, 4, 4)[0, 0, :, 0].tolist() == [0, 0, 1, 1]
    assert replicate_kv_heads(k, 4, 2) is k
    # 6 KV heads, 12 query heads, 4 ranks: lcm(6, 4) = 12 copies, q head h still reads KV head h // 2
    k6 = torch.arange(6.0).view(1, 1, 6, 1)
    assert replicate_kv_heads(k6, 12, 4)[0, 0, :, 0].tolist() == [h // 2 for h in range(12)]


def test_docstring_example():
    res = doctest.testmod(effattn.dist.ulysses, extraglobs={"torch": torch})
    assert res.attempted > 0 and res.failed == 0
