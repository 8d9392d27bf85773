"""Halo-exchange sliding-window attention on spawned gloo groups equals the single-process call."""

from __future__ import annotations

import doctest

import pytest
import torch

import effattn.dist.halo as halo_module
from effattn.dist import spawn
from effattn.dist.halo import halo_attention, halo_plan
from effattn.exact import attention

B, T, HQ, HKV, D = 2, 30, 4, 2, 20
# windows: 1 (no halo), smaller than a shard, larger than a shard (several ranks), larger than T
WINDOWS = [1, 4, 11, 40]


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=g)
    k = torch.randn(B, T, HKV, D, generator=g)
    v = torch.randn(B, T, HKV, D, generator=g)
    w = torch.randn(B, T, HQ, D, generator=g)
    return q, k, v, w


def _bounds(world: int, uneven: bool) -> list[int]:
    if uneven:  # shard lengths 1, 2, ... with the rest on the last rank
        b = [0]
        for r in range(world - 1):
            b.append(b[-1] + r + 1)
        return b + [T]
    return torch.linspace(0, T, world + 1).round().long().tolist()


def _worker(rank, world, uneven):
    q, k, v, w = _case()
    bounds = _bounds(world, uneven)
    a, b = bounds[rank], bounds[rank + 1]
    out = {}
    for window in WINDOWS:
        lq, lk, lv = (x[:, a:b].clone().requires_grad_(True) for x in (q, k, v))
        o = halo_attention(lq, lk, lv, window=window)
        (o * w[:, a:b]).sum().backward()
        out[window] = (o.detach(), lq.grad, lk.grad, lv.grad)
    return out


def _rel(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("world,uneven", [(2, False), (4, False), (4, True)])
def test_matches_full_sequence(world, uneven):
    results = spawn(_worker, world, uneven, timeout=60)
    q, k, v, w = _case()
    for window in WINDOWS:
        rq, rk, rv = (x.clone().requires_grad_(True) for x in (q, k, v))
        o_ref = attention(rq, rk, rv, causal=True, window=window)
        (o_ref * w).sum().backward()
        got = [torch.cat([r[window][i] for r in results], dim=1) for i in range(4)]
        for name, x, ref in zip(("o", "dq", "dk", "dv"), got, (o_ref, rq.grad, rk.grad, rv.grad), strict=True):
            tol = 1e-5 if name == "o" else 1e-4
            assert _rel(x, ref) < tol, (window, name, _rel(x, ref))


def test_plan():
    assert halo_plan([5, 5], window=1) == []
    plan = halo_plan([3, 3, 3, 3], window=8)  # 7 tokens before each shard: all earlier ones up to 7
    need = {dst: sum(n for _, d, n in plan if d == dst) for dst in range(4)}
    assert need == {0: 0, 1: 3, 2: 6, 3: 7}
    assert (0, 3, 1) in plan and (1, 3, 3) in plan and (2, 3, 3) in plan
    assert halo_plan([0, 4, 4], window=3) == [(1, 2, 2)]  # an empty shard sends nothing


def test_bad_input():
    q = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match="window"):
        halo_attention(q, q, q, window=0)
    with pytest.raises(ValueError, match="causal"):
        halo_attention(q, q, q, window=3, causal=False)
    with pytest.raises(ValueError, match="same shard"):
        halo_attention(q, q[:, :3], q[:, :3], window=3)


def test_docstring_examples():
    assert doctest.testmod(halo_module).failed == 0


def _mismatched(rank, world):
    q = torch.randn(1, 5, 2, 8 + rank)  # rank 1 has a larger head dim
    try:
        halo_attention(q, q, q, window=3)
    except ValueError as e:
        return str(e)
    return "no error"


def test_mismatched_shapes_raise_on_every_rank():
    msgs = spawn(_mismatched, 2, timeout=30)
    assert all("rank 0" in m and "rank 1" in m for m in msgs), msgs


def _previous_worker(rank, world, n):
    from effattn.dist import previous_tokens

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, T, 5, generator=g), torch.randn(2, n, 5, generator=g)
    bounds = _bounds(world, True)  # shards of 1, 2, 3 tokens, then the rest: a halo may span ranks
    a, b = bounds[rank], bounds[rank + 1]
    lx = x[:, a:b].clone().requires_grad_(True)
    prev = previous_tokens(lx, n)
    (prev * w).sum().backward()
    return prev.detach(), lx.grad


@pytest.mark.parametrize("n", [0, 1, 3])
def test_previous_tokens(n):
    """Each rank receives the n tokens before its shard (zeros before the start); each gradient goes back
    to the rank holding that token: the single-process equivalent indexes the padded sequence."""
    world = 4
    results = spawn(_previous_worker, world, n, timeout=60)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, T, 5, generator=g), torch.randn(2, n, 5, generator=g)
    x = x.clone().requires_grad_(True)
    padded = torch.cat([x.new_zeros(2, n, 5), x], dim=1)
    bounds = _bounds(world, True)
    ref = [padded[:, a : a + n] for a in bounds[:-1]]  # tokens a-n .. a-1 of the sequence
    sum((r * w).sum() for r in ref).backward()
    for rank, (prev, grad) in enumerate(results):
        assert torch.equal(prev, ref[rank].detach()), rank
        assert torch.allclose(grad, x.grad[:, bounds[rank] : bounds[rank + 1]], atol=1e-6), rank
