"""``step_*`` forms backward: for every op of ``effattn.linear.REGISTRY``, decoding a sequence with the
step form (token by token, and a few tokens at a time) from an initial state gives the same gradients
of every differentiable input (gates included) and of ``initial_state`` as the chunk form on the same
tokens, under one random upstream gradient on the outputs and the final state."""

from __future__ import annotations

import pytest
import torch

from effattn.linear import REGISTRY
from tests.helpers import assert_fp32_close
from tests.linear.test_consistency import make, prefix_state, state_parts
from tests.linear.test_varlen_grads import grads_of, leaf_inputs

OPS = sorted(REGISTRY)
T = 19


@pytest.mark.parametrize("sizes", [[1] * T, [1, 4, 2, 7, 5]], ids=["token_by_token", "few_at_a_time"])
@pytest.mark.parametrize("name", OPS)
def test_step_gradients_equal_chunk(name, sizes):
    op = REGISTRY[name]
    assert sum(sizes) == T
    base = make(op, 2, T, seed=31)
    h0_base = prefix_state(op, 2, seed=32)

    x, leaves, h0 = leaf_inputs(base, h0_base)
    o, s = x.call(op.chunk, initial_state=h0, output_final_state=True, chunk_size=8)
    g = torch.Generator().manual_seed(33)
    d_o = torch.randn(o.shape, generator=g)
    d_s = [torch.randn(p.shape, generator=g) for p in state_parts(s)]
    want = grads_of(o, s, leaves, h0, d_o, d_s)

    x, leaves, h0 = leaf_inputs(base, h0_base)
    state, outs, a = h0, [], 0
    for n in sizes:
        o_i, state = x.seq_slice(a, a + n).call(op.step, initial_state=state, output_final_state=True)
        outs.append(o_i)
        a += n
    got = grads_of(torch.cat(outs, 1), state, leaves, h0, d_o, d_s)

    for n, gw in want.items():
        assert gw is not None and got[n] is not None, f"{name}: no gradient for {n}"
        assert gw.abs().sum() > 0, f"{name}: zero reference gradient for {n}"
        assert_fp32_close(got[n], gw, 1e-4, f"{name} step{sizes[:3]} d{n}")
