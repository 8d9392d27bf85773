"""Packed sequences (``cu_seqlens``) backward: for every op of ``effattn.linear.REGISTRY`` and both
forms that take ``cu_seqlens`` (naive and chunk), the gradients of every differentiable input (q, k,
v, gates, betas, ...) and of every ``initial_state`` row equal those of a loop that runs the naive form
on each sequence separately, under one random upstream gradient on the outputs and final states."""

from __future__ import annotations

import pytest
import torch

from effattn.linear import REGISTRY
from tests.helpers import assert_fp32_close
from tests.linear.test_consistency import cat_states, like_state, make, prefix_state, state_parts

OPS = sorted(REGISTRY)
LENGTHS = [5, 17, 1, 11]  # a one-token sequence and ones that straddle chunk boundaries (chunk_size 8)


def leaf_inputs(x, h0):
    """Fresh leaf copies of the op's differentiable inputs and of ``h0``."""
    names = [n for n in x.op.differentiable_args if isinstance(x.values.get(n), torch.Tensor)]
    assert names, f"{x.op.name}: no differentiable input"
    leaves = {n: x.values[n].detach().clone().requires_grad_(True) for n in names}
    h0 = like_state(h0, [p.detach().clone().requires_grad_(True) for p in state_parts(h0)])
    return x.copy(**leaves), leaves, h0


def grads_of(o, state, leaves, h0, d_o, d_s):
    loss = (o * d_o).sum() + sum((p * g).sum() for p, g in zip(state_parts(state), d_s, strict=True))
    names = list(leaves) + [f"initial_state[{i}]" for i in range(len(state_parts(h0)))]
    tensors = list(leaves.values()) + list(state_parts(h0))
    return dict(zip(names, torch.autograd.grad(loss, tensors, allow_unused=True), strict=True))


@pytest.mark.parametrize("form", ["naive", "chunk"])
@pytest.mark.parametrize("name", OPS)
def test_varlen_gradients_equal_per_sequence_loop(name, form):
    op = REGISTRY[name]
    bounds = [0]
    for n in LENGTHS:
        bounds.append(bounds[-1] + n)
    base = make(op, 1, bounds[-1], seed=21)
    h0_base = prefix_state(op, len(LENGTHS), seed=22)  # one state row per sequence
    extra = {"chunk_size": 8} if form == "chunk" else {}

    x, leaves, h0 = leaf_inputs(base, h0_base)
    o, s = x.call(
        getattr(op, form), cu_seqlens=torch.tensor(bounds), initial_state=h0, output_final_state=True, **extra
    )
    g = torch.Generator().manual_seed(23)
    d_o = torch.randn(o.shape, generator=g)
    d_s = [torch.randn(p.shape, generator=g) for p in state_parts(s)]
    got = grads_of(o, s, leaves, h0, d_o, d_s)

    x, leaves, h0 = leaf_inputs(base, h0_base)
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        h0_i = like_state(h0, [p[i : i + 1] for p in state_parts(h0)])
        o_i, s_i = x.seq_slice(a, b).call(op.naive, initial_state=h0_i, output_final_state=True)
        outs.append(o_i)
        finals.append(s_i)
    want = grads_of(torch.cat(outs, 1), cat_states(finals), leaves, h0, d_o, d_s)

    for n, gw in want.items():
        assert gw is not None and got[n] is not None, f"{name}/{form}: no gradient for {n}"
        assert gw.abs().sum() > 0, f"{name}/{form}: zero reference gradient for {n}"
        assert_fp32_close(got[n], gw, 1e-4, f"{name}/{form} packed d{n}")
