"""The residual memory ``M(x) = x + LN(MLP(x))`` (``residual_norm=True``; TTT, Miras, titans-pytorch): the
hand-written per-token gradients equal autograd's, chunked == reference at chunk size 1, the fast form ==
the materialized one, split calls == one call, the layer's decode == its full forward, bad input."""

from __future__ import annotations

import pytest
import torch

from effattn.memory import NeuralMemory, chunk_neural_memory, mlp_apply, mlp_token_grads, reference_neural_memory

from .test_neural_memory import RULES, inputs


@pytest.mark.parametrize("loss,p", [("l2", 2.0), ("huber", 0.3), ("lp", 3.0)])
@pytest.mark.parametrize("depth", [1, 2])
def test_token_grads_equal_autograd(loss, p, depth):
    q, k, v, *_, w = inputs(B=1, T=3, H=2, K=4, V=4, depth=depth, dtype=torch.float64)
    W = [x.unsqueeze(0).clone().requires_grad_(True) for x in w]
    kk, vv = k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, d]
    got = mlp_token_grads([x.detach() for x in W], kk, vv, loss, p, residual_norm=True)
    for t in range(kk.shape[2]):
        e = mlp_apply(W, kk[:, :, t : t + 1], residual_norm=True) - vv[:, :, t : t + 1]
        per_head = {"l2": e.square(), "huber": None, "lp": e.abs().pow(p)}[loss]
        if loss == "huber":
            a = e.abs()
            per_head = torch.where(a <= p, e.square(), 2 * p * a - p * p)
        want = torch.autograd.grad(per_head.sum(), W)
        for g_got, g_want in zip(got, want):
            torch.testing.assert_close(g_got[:, :, t], g_want, rtol=1e-9, atol=1e-10)


def test_mlp_apply_residual_is_input_plus_layer_norm():
    *_, w = inputs(B=1, H=2, K=4, V=4, depth=2, dtype=torch.float64)
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    W = [a.unsqueeze(0) for a in w]
    plain = mlp_apply(W, x)
    want = x + torch.nn.functional.layer_norm(plain, (4,), eps=1e-5)
    torch.testing.assert_close(mlp_apply(W, x, residual_norm=True), want)


@pytest.mark.parametrize("rule", ["titans", "yaad", "memora", "moneta", "atlas"])
@pytest.mark.parametrize("depth", [1, 2])
def test_chunk_size_one_and_fast_equal_reference(rule, depth):
    q, k, v, th, et, al, w = inputs(K=4, V=4, depth=depth, dtype=torch.float64)
    kw = dict(RULES[rule], residual_norm=True, output_final_state=True)
    ref, sr = reference_neural_memory(q, k, v, th, et, al, w, **kw)
    one, s1 = chunk_neural_memory(q, k, v, th, et, al, w, chunk_size=1, **kw)
    torch.testing.assert_close(one, ref, rtol=1e-10, atol=1e-10)
    for x, y in zip(sr["A"], s1["A"]):
        torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-10)
    # larger chunks: the factored form (where it applies) == the materialized one == the token-by-token grid
    grid, _ = reference_neural_memory(q, k, v, th, et, al, w, **kw, chunk_size=4)
    mat, _ = chunk_neural_memory(q, k, v, th, et, al, w, chunk_size=4, fast=False, **kw)
    torch.testing.assert_close(mat, grid, rtol=1e-9, atol=1e-10)
    if rule in ("titans", "yaad", "atlas"):
        fast, _ = chunk_neural_memory(q, k, v, th, et, al, w, chunk_size=4, fast=True, **kw)
        torch.testing.assert_close(fast, grid, rtol=1e-9, atol=1e-10)
    # and the residual form is not the plain one
    plain, _ = reference_neural_memory(q, k, v, th, et, al, w, **RULES[rule])
    assert (plain - ref).abs().max() > 1e-3


@pytest.mark.parametrize("retention", ["linear", "softmax"])
def test_layer_decode_split_and_gradcheck(retention):
    torch.manual_seed(0)
    mem = NeuralMemory(8, 2, depth=2, retention=retention, residual_norm=True, chunk_size=4).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    full, _ = mem(x)
    y1, st = mem(x[:, :5])
    y2, st = mem(x[:, 5:6], st)
    y3, _ = mem(x[:, 6:], st)
    torch.testing.assert_close(torch.cat([y1, y2, y3], 1), full, rtol=1e-9, atol=1e-10)
    # padding never reaches a valid row, whatever it holds
    xp = torch.cat([x[:, :4], torch.full((2, 2, 8), float("nan"), dtype=torch.float64), x[:, 4:]], 1)
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[:, 4:6] = False
    yp, _ = mem(xp, valid=valid)
    torch.testing.assert_close(yp[valid].view(2, 9, 8), full, rtol=1e-9, atol=1e-10)
    small = NeuralMemory(4, 1, depth=2, retention=retention, residual_norm=True, chunk_size=2, conv_size=0).double()
    xs = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: small(z)[0], (xs,), eps=1e-6, atol=1e-6)


def test_bad_input():
    q, k, v, th, et, al, w = inputs(K=5, V=3, depth=1)
    with pytest.raises(ValueError, match="residual_norm.*key_dim == value_dim"):
        reference_neural_memory(q, k, v, th, et, al, w, residual_norm=True)
    with pytest.raises(ValueError, match="residual_norm must be a bool"):
        chunk_neural_memory(q, k, v, th, et, al, w, residual_norm=1)
    with pytest.raises(ValueError, match="feature_degree 2"):
        NeuralMemory(8, 2, feature_degree=2, residual_norm=True)
