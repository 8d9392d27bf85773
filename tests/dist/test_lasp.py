"""LASP-2 / LASP-1 on spawned gloo groups equal the single-process chunk form of every linear op."""

from __future__ import annotations

import doctest

import pytest
import torch

import effattn.dist.lasp as lasp_module
from effattn.dist import spawn
from effattn.dist.lasp import lasp2, lasp_schedule
from effattn.linear import REGISTRY

B, T, H, D = 2, 28, 2, 6  # T != D != H so that "dim 1 == T" finds exactly the sequence tensors


def _is_seq(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() >= 3 and t.shape[1] == T


def _case(name: str, seed: int = 0):
    """Full inputs, a realistic initial state (the op's final state after a short prefix) and
    loss weights, identical on every process."""
    op = REGISTRY[name]
    torch.manual_seed(seed)
    args, kw = op.make_inputs(B, T, H, D)
    pargs, pkw = op.make_inputs(B, 5, H, D)
    _, s0 = op.chunk(*pargs, **pkw, output_final_state=True)
    s0 = tuple(s.detach() for s in s0) if isinstance(s0, tuple) else s0.detach()
    o, fin = op.chunk(*args, **kw, initial_state=s0, output_final_state=True)
    w_o = torch.randn_like(o)
    w_f = tuple(torch.randn_like(f) for f in fin) if isinstance(fin, tuple) else torch.randn_like(fin)
    return op, args, kw, s0, w_o, w_f


def _shard(t, a: int, b: int):
    return t[:, a:b] if _is_seq(t) else t


def _leaves(args, kw, s0):
    def leaf(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.detach().clone().requires_grad_(True)
        return t

    s0 = tuple(leaf(s) for s in s0) if isinstance(s0, tuple) else leaf(s0)
    return [leaf(a) for a in args], {n: leaf(t) for n, t in kw.items()}, s0


def _flat(args, kw, s0):
    s = list(s0) if isinstance(s0, tuple) else [s0]
    return [*args, *kw.values(), *s]


def _loss(o, fin, w_o, w_f, with_final: bool):
    loss = (o.float() * w_o).sum()
    if with_final:
        fs, ws = (fin, w_f) if isinstance(fin, tuple) else ((fin,), (w_f,))
        loss = loss + sum((f * w).sum() for f, w in zip(fs, ws, strict=True))
    return loss


def _worker(rank, world, names):
    out = {}
    for name in names:
        op, args, kw, s0, w_o, w_f = _case(name)
        bounds = torch.linspace(0, T, world + 1).round().long().tolist()  # uneven shards allowed
        a, b = bounds[rank], bounds[rank + 1]
        largs, lkw, ls0 = _leaves(
            [_shard(x, a, b) for x in args], {n: _shard(t, a, b) for n, t in kw.items()}, s0
        )
        o, fin = lasp2(name, *largs, **lkw, initial_state=ls0, output_final_state=True)
        # the final state enters the loss on one rank only (every rank holds a copy)
        _loss(o, fin, w_o[:, a:b], w_f, with_final=rank == world - 1).backward()
        grads = [t.grad if isinstance(t, torch.Tensor) else None for t in _flat(largs, lkw, ls0)]
        seq = [_is_seq(t) for t in _flat(args, kw, s0)]
        fin_t = tuple(f.detach() for f in fin) if isinstance(fin, tuple) else (fin.detach(),)
        out[name] = (o.detach(), fin_t, grads, seq)
    return out


def _rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _check(results, names):
    for name in names:
        op, args, kw, s0, w_o, w_f = _case(name)
        rargs, rkw, rs0 = _leaves(args, kw, s0)
        o_ref, fin_ref = op.chunk(*rargs, **rkw, initial_state=rs0, output_final_state=True)
        _loss(o_ref, fin_ref, w_o, w_f, with_final=True).backward()
        ref_grads = [t.grad if isinstance(t, torch.Tensor) else None for t in _flat(rargs, rkw, rs0)]
        o = torch.cat([r[name][0] for r in results], dim=1)
        assert _rel(o, o_ref) < 1e-5, (name, "output", _rel(o, o_ref))
        fin_ref_t = fin_ref if isinstance(fin_ref, tuple) else (fin_ref,)
        for r in results:  # every rank holds the global final state
            for f, fr in zip(r[name][1], fin_ref_t, strict=True):
                assert _rel(f, fr) < 1e-5, (name, "final state", _rel(f, fr))
        seq = results[0][name][3]
        for i, g_ref in enumerate(ref_grads):
            gs = [r[name][2][i] for r in results]
            if g_ref is None:
                assert all(g is None or not g.any() for g in gs), (name, i)
                continue
            gs = [g if g is not None else torch.zeros_like(g_ref) for g in gs]
            if seq[i]:
                g = torch.cat(gs, dim=1)
            else:  # replicated input: per-rank partial gradients sum to the full one
                g = torch.stack([x if x.shape == g_ref.shape else torch.zeros_like(g_ref) for x in gs]).sum(0)
            assert _rel(g, g_ref) < 1e-4, (name, "grad of input", i, _rel(g, g_ref))


@pytest.mark.parametrize("world", [2, 4])
def test_every_registered_op_matches_single_process(world):
    names = sorted(REGISTRY)
    results = spawn(_worker, world, names, timeout=120)
    _check(results, names)


def test_schedules_cover_the_registry():
    sequential = {n for n in REGISTRY if lasp_schedule(n) == "sequential"}
    allgather = {n for n in REGISTRY if lasp_schedule(n) == "allgather"}
    assert sequential | allgather == set(REGISTRY)
    assert {"delta_rule", "gated_delta_rule", "mom", "aaren"} <= sequential
    assert {"linear_attn", "simple_gla", "gla", "retnet", "lightning_attn", "mamba"} <= allgather


def test_single_process_is_the_op():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 9, 2, 4) for _ in range(3))
    gk = -torch.rand(1, 9, 2, 4)
    o, s = lasp2("gla", q, k, v, gk, output_final_state=True)
    o_ref, s_ref = REGISTRY["gla"].chunk(q, k, v, gk, output_final_state=True)
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)


def test_bad_input():
    q = torch.randn(1, 4, 2, 4)
    with pytest.raises(ValueError, match="registered linear op name"):
        lasp2("no_such_op", q, q, q)
    with pytest.raises(ValueError, match="cu_seqlens"):
        lasp2("linear_attn", q, q, q, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="not initialized"):
        lasp2("linear_attn", q, q, q, group=object())


def test_docstring_examples():
    assert doctest.testmod(lasp_module).failed == 0


def _mismatched(rank, world):
    heads = 2 + rank  # rank 1 has one head more
    q, k, v = (torch.randn(1, 6, heads, 4) for _ in range(3))
    out = []
    for name, gates in (("simple_gla", (-torch.rand(1, 6, heads),)), ("delta_rule", (torch.rand(1, 6, heads),))):
        try:
            lasp2(name, q, k, v, *gates)
            out.append("no error")
        except ValueError as e:
            out.append(str(e))
    return out


def test_mismatched_shapes_raise_on_every_rank():
    results = spawn(_mismatched, 2, timeout=30)
    for msgs in results:
        assert all("rank 0" in m and "rank 1" in m for m in msgs), msgs
