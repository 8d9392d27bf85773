"""usp_attention (Ulysses x ring on a 2-D DeviceMesh) equals single-process attention; its layout
covers the sequence once; heads not divisible by the Ulysses size raise on every rank."""

import doctest

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

import effattn.dist.usp
from effattn.dist import spawn, usp_attention, usp_gather_sequence, usp_shard_positions, usp_shard_sequence
from tests.dist.attention_cases import assert_close, compare, error_of, run_cases

CASES = [  # (layout, causal, Hq, Hkv, D, chunk tokens per half ring shard)
    ("zigzag", True, 4, 1, 24, 2),
    ("contiguous", True, 4, 2, 40, 2),
    ("zigzag", False, 2, 2, 40, 1),
]


def _correctness(rank, world, shape):
    mesh = init_device_mesh("cpu", shape)
    results = []
    for layout, causal, Hq, Hkv, D, c in CASES:
        if Hq % shape[1]:
            continue

        def shard(t, dim, layout=layout):
            return usp_shard_sequence(t, mesh, layout=layout, dim=dim)

        def op(q, k, v, layout=layout, causal=causal):
            return usp_attention(q, k, v, mesh=mesh, causal=causal, layout=layout, return_lse=True)

        T = 2 * shape[0] * shape[1] * c
        errs = compare(op, shard, seed=world, T=T, Hq=Hq, Hkv=Hkv, D=D, ref_kwargs={"causal": causal})
        results.append((f"rank {rank} mesh {shape} {layout} causal={causal} Hq={Hq} Hkv={Hkv} D={D}", errs))
    x = torch.arange(8 * world).view(1, -1)
    ok = torch.equal(usp_gather_sequence(usp_shard_sequence(x, mesh), mesh), x)
    results.append((f"rank {rank} round trip", {"o": 0.0 if ok else 1.0}))
    return results


@pytest.mark.parametrize("world,shape", [(4, (2, 2)), (2, (2, 1)), (2, (1, 2))])
def test_usp_equals_single_process(world, shape):
    """(2, 2): both; (2, 1): pure ring; (1, 2): pure Ulysses."""
    assert_close(run_cases(_correctness, world, shape))


def test_positions_cover_the_sequence_once():
    for layout in ("zigzag", "contiguous"):
        pos = torch.cat([usp_shard_positions(24, i, 2, j, 3, layout) for i in range(2) for j in range(3)])
        assert sorted(pos.tolist()) == list(range(24))
    with pytest.raises(ValueError, match="ring shard's length T=6 over P=4"):
        usp_shard_positions(12, 0, 2, 0, 4, "contiguous")


def _bad_inputs(rank, world):
    mesh = init_device_mesh("cpu", (2, 2))
    q = torch.randn(1, 4, 3, 8)
    x = torch.randn(1, 4, 2, 8)
    return {
        "heads": error_of(usp_attention, q, q, q, mesh=mesh),
        "mesh": error_of(usp_attention, x, x, x, mesh=None),
    }


def test_bad_input_raises_on_every_rank():
    for out in spawn(_bad_inputs, 4, timeout=20, deadline=60):
        assert "heads_q (3" in out["heads"] and "divisible by its size 2" in out["heads"], out
        assert "2-D DeviceMesh" in out["mesh"], out


def test_docstring_example():
    res = doctest.testmod(effattn.dist.usp, extraglobs={"torch": torch})
    assert res.attempted > 0 and res.failed == 0
