"""Mixture-of-Depths: top-C routing, predictor routing, decode == full forward, no future leakage."""

import doctest
import importlib
import math

import pytest
import torch
from torch import nn

from effattn.moe import MixtureOfDepths
from tests.helpers import assert_fp32_close


class RunningMeanBlock(nn.Module):
    """Causal stateful residual block: h + W(mean of h up to t) + an MLP (state: running sum, count)."""

    def __init__(self, dim):
        super().__init__()
        self.mix = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))

    def forward(self, h, state=None):
        s, n = state if state is not None else (h.new_zeros(h.shape[0], h.shape[2]), 0)
        c = s[:, None] + h.cumsum(1)
        mean = c / (n + torch.arange(1, h.shape[1] + 1, dtype=h.dtype))[:, None]
        h = h + self.mix(mean)
        return h + self.mlp(h), (c[:, -1], n + h.shape[1])


def _mod(dim=8, capacity=0.3, **kw):
    torch.manual_seed(0)
    return MixtureOfDepths(RunningMeanBlock(dim), dim, capacity=capacity, **kw)


@pytest.mark.parametrize("T,prefill", [(17, 5), (9, 0), (1, 0)])
def test_predictor_decode_equals_full_forward(T, prefill):
    mod = _mod()
    with torch.no_grad():
        mod.predictor[-1].bias.fill_(0.1)  # some tokens in, some out
    x = torch.randn(3, T, 8, generator=torch.Generator().manual_seed(1))
    y_full, _ = mod(x, causal=True)
    chosen = mod.last_selected
    assert 0 < chosen.sum() < chosen.numel() or T == 1
    outs = []
    state = [None] * 3
    if prefill:
        y0, state = mod(x[:, :prefill], causal=True)
        outs.append(y0)
    for t in range(prefill, T):
        y_t, state = mod(x[:, t : t + 1], state)
        outs.append(y_t)
    assert_fp32_close(torch.cat(outs, 1), y_full)


def test_predictor_routing_is_causal():
    mod = _mod()
    x = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(2))
    y, _ = mod(x, causal=True)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(2, 5, 8)
    y2, _ = mod(x2, causal=True)
    assert torch.equal(y[:, :7], y2[:, :7])


def test_topk_routes_capacity_and_matches_block_on_subsequence():
    mod = _mod(capacity=0.25)
    x = torch.randn(2, 13, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    y, _ = mod(x)
    C = math.ceil(0.25 * 13)
    chosen = mod.last_selected
    assert chosen.sum(1).tolist() == [C, C]
    assert torch.equal(y[~chosen], x[~chosen])  # skipped tokens pass unchanged
    r = mod.router(x).squeeze(-1)
    for b in range(2):
        idx = chosen[b].nonzero().squeeze(1)
        assert set(idx.tolist()) == set(r[b].topk(C).indices.tolist())
        out, _ = mod.block(x[b, idx][None])
        want = x[b, idx] + torch.sigmoid(r[b, idx])[:, None] * (out[0] - x[b, idx])
        assert_fp32_close(y[b, idx], want)
    (y.sum() + mod.last_aux_loss).backward()
    assert mod.router.weight.grad.abs().sum() > 0 and mod.predictor[0].weight.grad.abs().sum() > 0


def test_topk_equals_decode_where_predictor_agrees():
    mod = _mod(capacity=0.3, predictor_hidden=0)
    x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        r = mod.router(x).squeeze(-1)[0]
        C = math.ceil(0.3 * 16)
        top = r.sort(descending=True).values
        thr = (top[C - 1] + top[C]) / 2  # predictor fires exactly on the top-C
        mod.predictor.weight.copy_(mod.router.weight)
        mod.predictor.bias.copy_(mod.router.bias - thr)
    y_topk, _ = mod(x)
    assert mod.last_agreement == 1.0
    state, outs = [None], []
    for t in range(16):
        y_t, state = mod(x[:, t : t + 1], state)
        outs.append(y_t)
    assert_fp32_close(torch.cat(outs, 1), y_topk)


def test_bad_input():
    with pytest.raises(ValueError, match="capacity"):
        MixtureOfDepths(RunningMeanBlock(8), 8, capacity=0.0)
    with pytest.raises(ValueError, match="capacity"):
        MixtureOfDepths(RunningMeanBlock(8), 8, capacity=1.5)
    mod = _mod()
    with pytest.raises(ValueError, match="last dim 8"):
        mod(torch.randn(1, 4, 6))
    with pytest.raises(ValueError, match="state"):
        mod(torch.randn(2, 1, 8), [None])


def test_docstring_example():
    assert doctest.testmod(importlib.import_module("effattn.moe.mod")).failed == 0
