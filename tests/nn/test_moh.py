"""MoH attention: all-heads routing equals MHA, top-k selection, gate formula, load-balance loss."""

from __future__ import annotations

import doctest

import pytest
import torch

import effattn.nn.moh
from effattn.nn.attention import Attention
from effattn.nn.moh import MoHAttention
from tests.helpers import assert_fp32_close

DIM = 32


def _x(B: int = 2, T: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", [{}, {"kv_heads": 2, "window": 4}])
def test_all_heads_equals_mha(kw):
    torch.manual_seed(0)
    moh = MoHAttention(DIM, 8, shared_heads=2, top_k=3, routing="all", **kw)
    mha = Attention(DIM, 8, **kw)
    missing, unexpected = mha.load_state_dict(moh.state_dict(), strict=False)
    assert not missing and all(k.startswith("router") for k in unexpected)
    x = _x()
    assert_fp32_close(moh(x)[0], mha(x)[0], tol=1e-6)
    with torch.no_grad():  # also through the cache
        _, c1 = moh(x[:, :6])
        _, c2 = mha(x[:, :6])
        assert_fp32_close(moh(x[:, 6:7], c1)[0], mha(x[:, 6:7], c2)[0], tol=1e-6)


def test_topk_selects_k_heads_and_gates_follow_formula():
    torch.manual_seed(0)
    layer = MoHAttention(DIM, 8, shared_heads=2, top_k=3, kv_heads=4)
    x = _x()
    y, _ = layer(x)
    g = layer.last_gates
    assert g.shape == (2, 10, 8)
    assert ((g[..., :2] > 0).all(-1)).all()  # shared heads always on
    assert ((g[..., 2:] > 0).sum(-1) == 3).all()  # exactly top_k routed heads per token
    # the selected routed heads are the ones with the largest router probabilities
    p = layer.router_routed(x).softmax(-1)
    top = p.topk(3, -1).indices
    assert torch.equal((g[..., 2:] > 0), torch.zeros_like(p, dtype=torch.bool).scatter_(-1, top, True))
    # gate values and weighted head sum
    a = layer.router_mix(x).softmax(-1)
    g_ref = torch.cat([a[..., :1] * layer.router_shared(x).softmax(-1), a[..., 1:] * p * (g[..., 2:] > 0)], -1)
    assert_fp32_close(g, g_ref)
    o, _ = Attention.attend(layer, x)
    assert_fp32_close(y, layer.o_proj((o * g_ref[..., None]).flatten(2)))


def test_unselected_heads_do_not_affect_output():
    torch.manual_seed(0)
    layer = MoHAttention(DIM, 4, shared_heads=0, top_k=1, rope=False)
    x = _x(B=1, T=6)
    with torch.no_grad():
        y, _ = layer(x)
        sel = layer.last_gates[0] > 0  # [T, H]
        h = 0
        rows = ~sel[:, h]
        layer.v_proj.weight[h * 8 : (h + 1) * 8].mul_(-3.0)  # change head 0's values
        y2, _ = layer(x)
    assert torch.equal(layer.last_gates[0] > 0, sel)  # routing depends on x only
    assert rows.any() and sel[:, h].any()
    assert_fp32_close(y2[0, rows], y[0, rows], tol=1e-6)
    assert (y2[0, ~rows] - y[0, ~rows]).abs().max() > 1e-4


def test_load_balance_loss_finite_with_gradient():
    torch.manual_seed(0)
    layer = MoHAttention(DIM, 8, shared_heads=2, top_k=2)
    x = _x()
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :4] = False
    layer(x, valid=valid)
    lb = layer.load_balance_loss
    assert lb.dim() == 0 and torch.isfinite(lb)
    assert 2 / 6 - 1e-6 <= lb.item() <= 1.0 + 1e-6  # sum f_i P_i >= k / n at perfect balance, <= 1
    (g,) = torch.autograd.grad(lb, layer.router_routed.weight)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_decode_equals_full():
    torch.manual_seed(0)
    layer = MoHAttention(DIM, 8, shared_heads=2, top_k=3, kv_heads=2)
    x = _x(T=9)
    with torch.no_grad():
        full, _ = layer(x)
        c, ys = None, []
        for t in range(9):
            y, c = layer(x[:, t : t + 1], c)
            ys.append(y)
    assert_fp32_close(torch.cat(ys, 1), full)


def test_default_routing_sizes():
    layer = MoHAttention(DIM, 8)
    assert (layer.shared_heads, layer.routed_heads, layer.top_k) == (2, 6, 3)
    layer(_x())
    assert ((layer.last_gates > 0).sum(-1) == 5).all()


def test_bad_input():
    with pytest.raises(ValueError, match="shared_heads"):
        MoHAttention(DIM, 4, shared_heads=5, top_k=1)
    with pytest.raises(ValueError, match="top_k"):
        MoHAttention(DIM, 4, shared_heads=2, top_k=3)
    with pytest.raises(ValueError, match="routing"):
        MoHAttention(DIM, 4, shared_heads=2, top_k=1, routing="soft")
    with pytest.raises(ValueError, match="dim"):
        MoHAttention(30, 4, shared_heads=2, top_k=1)


def test_docstring_examples_run():
    res = doctest.testmod(effattn.nn.moh, extraglobs={"torch": torch})
    assert res.attempted > 0 and res.failed == 0


@pytest.mark.parametrize("kw", [{}, {"kv_heads": 2, "window": 5}, {"kv_heads": 1, "rope": False}])
def test_selected_heads_equal_compute_all_then_weight(kw):
    """``compute="selected"`` gathers, per head, the queries routed to it; output and gradients equal
    the dense reference (every head computed, then weighted), and its FLOPs fall with top-k."""
    from effattn.nn.moh import attention_flops

    torch.manual_seed(0)
    sel = MoHAttention(DIM, 8, shared_heads=2, top_k=2, **kw)
    dense = MoHAttention(DIM, 8, shared_heads=2, top_k=2, compute="dense", **kw)
    dense.load_state_dict(sel.state_dict())
    x = _x(B=2, T=13).requires_grad_(True)
    y, cache = sel(x)
    y_ref, cache_ref = dense(x)
    assert_fp32_close(y, y_ref)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    assert_fp32_close(gx, gx_ref, tol=1e-4)
    with torch.no_grad():  # the cache it leaves continues like the dense one
        x1 = _x(B=2, T=1, seed=5)
        assert_fp32_close(sel(x1, cache)[0], dense(x1, cache_ref)[0])
    g = sel.last_gates
    full = attention_flops(torch.ones_like(g), 4, kw.get("window"))
    assert attention_flops(g, 4, kw.get("window")) < full * (2 + 2 + 0.5) / 8  # 4 of 8 heads per token
    with pytest.raises(ValueError, match="compute"):
        MoHAttention(DIM, 8, compute="sparse")
