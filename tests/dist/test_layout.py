"""Sequence layouts: positions, shard/gather round trips, clear errors for lengths that do not divide."""

import doctest
import sys

import pytest
import torch

import effattn.dist.launch
import effattn.dist.layout
from effattn.dist import (
    all_to_all,
    check_shardable,
    gather_sequence,
    layout_permutation,
    shard_positions,
    shard_sequence,
    spawn,
)
from tests.dist.attention_cases import error_of


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("T,P", [(12, 2), (24, 4), (8, 4), (6, 3)])
def test_positions_cover_the_sequence_once(layout, T, P):
    perm = layout_permutation(T, P, layout)
    assert sorted(perm.tolist()) == list(range(T))
    for r in range(P):
        pos = shard_positions(T, r, P, layout)
        assert pos.numel() == T // P and bool((pos[1:] > pos[:-1]).all())


def test_zigzag_balances_causal_work():
    """Rank r holds chunks r and 2P-1-r: the causal pairs (i >= j) per rank are equal."""
    T, P = 32, 4
    work = [int((shard_positions(T, r, P, "zigzag") + 1).sum()) for r in range(P)]
    assert len(set(work)) == 1
    assert shard_positions(T, 1, P, "zigzag").tolist() == [4, 5, 6, 7, 24, 25, 26, 27]


def test_uneven_lengths_raise_naming_t_p_and_rule():
    with pytest.raises(ValueError, match=r"T=10 over P=4 .*T % P == 0.*multiple of 4.*12"):
        check_shardable(10, 4, "contiguous")
    with pytest.raises(ValueError, match=r"T=12 over P=4 .*T % \(2 P\) == 0.*multiple of 8.*16"):
        shard_positions(12, 0, 4, "zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        shard_positions(8, 0, 2, "striped")
    with pytest.raises(ValueError, match="rank"):
        shard_positions(8, 2, 2)


def _round_trips(rank, world):
    torch.manual_seed(0)
    out = {}
    x = torch.randn(2, 8 * world, 3, 5)
    for layout in ("contiguous", "zigzag"):
        for dim in (1, 2):
            y = x.transpose(1, 2) if dim == 2 else x
            local = shard_sequence(y, layout=layout, dim=dim)
            pos = shard_positions(y.shape[dim], rank, world, layout)
            out[f"shard {layout} dim {dim}"] = torch.equal(local, y.index_select(dim, pos))
            out[f"gather {layout} dim {dim}"] = torch.equal(gather_sequence(local, layout=layout, dim=dim), y)
        # gather is differentiable: a replicated loss gives each shard its slice of the gradient
        w = torch.randn(x.shape)
        local = shard_sequence(x, layout=layout).clone().requires_grad_()
        (gather_sequence(local, layout=layout) * w).sum().backward()
        out[f"gather grad {layout}"] = torch.equal(local.grad, shard_sequence(w, layout=layout))
    # all-to-all: sequence shards -> head shards and back
    local = shard_sequence(x)
    heads = all_to_all(local, scatter_dim=2, gather_dim=1) if x.shape[2] % world == 0 else None
    if heads is not None:
        out["all_to_all round trip"] = torch.equal(all_to_all(heads, scatter_dim=1, gather_dim=2), local)
    y = torch.randn(1, 4 * world, 2 * world, 3)
    heads = all_to_all(shard_sequence(y), scatter_dim=2, gather_dim=1)
    h = 2 * world // world
    out["all_to_all heads"] = torch.equal(heads, y[:, :, rank * h : (rank + 1) * h])
    out["uneven T"] = error_of(shard_sequence, torch.zeros(1, 8 * world + 2, 1), layout="zigzag")
    out["odd zigzag shard"] = error_of(gather_sequence, torch.zeros(1, 3, 1), layout="zigzag")
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_shard_and_gather_round_trip(world):
    for rank, out in enumerate(spawn(_round_trips, world, timeout=30, deadline=90)):
        checks = {k: v for k, v in out.items() if isinstance(v, bool)}
        assert checks and all(checks.values()), f"rank {rank}: {checks}"
        assert f"T={8 * world + 2} over P={world}" in out["uneven T"], out["uneven T"]
        assert "local length must be even" in out["odd zigzag shard"], out["odd zigzag shard"]


# the communication helpers' module, reached through a public name
COMM = sys.modules[effattn.dist.count_bytes.__module__]


@pytest.mark.parametrize("module", [effattn.dist.layout, effattn.dist.launch, COMM])
def test_docstring_examples(module):
    res = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0
