"""Titans / Miras / ATLAS memories: chunked == reference at chunk size 1, the chunked form's mini-batch
semantics at larger chunks, the delta-rule special case, decode == full, carried state, causality,
bounded state, float64 gradchecks, gradients to the gates, bad input."""

from __future__ import annotations

import pytest
import torch

from effattn.linear import naive_delta_rule
from effattn.memory import (
    NeuralMemory,
    atlas_memory,
    chunk_neural_memory,
    chunk_titans_memory,
    init_memory_weights,
    miras_memory,
    mlp_apply,
    mlp_token_grads,
    polynomial_features,
    read_weights,
    reference_neural_memory,
    step_titans_memory,
    titans_memory,
)

RULES = {
    "titans": {},
    "moneta": dict(loss="lp", p=3.0, retention="lq", q_exp=4.0),
    "yaad": dict(loss="huber", p=0.3),
    "memora": dict(retention="softmax"),
    "atlas": dict(window=3),
    "atlas_muon": dict(window=2, muon=True),
}


def inputs(B=2, T=11, H=2, K=5, V=3, depth=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    theta = 0.3 * torch.rand(B, T, H, generator=g, dtype=dtype)
    eta, alpha = torch.rand(B, T, H, generator=g, dtype=dtype), 0.2 * torch.rand(B, T, H, generator=g, dtype=dtype)
    w = [x.to(dtype) for x in init_memory_weights(H, K, V, depth=depth, generator=g)]
    if depth == 1:
        w = [0.1 * torch.randn(H, K, V, generator=g, dtype=dtype)]
    return q, k, v, theta, eta, alpha, w


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_chunk_size_one_equals_reference(rule, depth):
    q, k, v, th, et, al, w = inputs(depth=depth, dtype=torch.float64)
    gamma = torch.rand(th.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = dict(RULES[rule], gamma=gamma, output_final_state=True)
    a, sa = reference_neural_memory(q, k, v, th, et, al, w, **kw)
    b, sb = chunk_neural_memory(q, k, v, th, et, al, w, chunk_size=1, **kw)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    for x, y in zip(sa["A"] + sa["S"], sb["A"] + sb["S"]):
        torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-10)


def minibatch_loop(q, k, v, th, et, al, w, C, **kw):
    """An independent statement of the chunked form: a token loop whose gradients use the weights frozen
    at the last chunk boundary."""
    B, T, H, _ = q.shape
    A = [x.unsqueeze(0).expand(B, *x.shape) for x in w]
    S = [torch.zeros_like(a) for a in A]
    ys = []
    for t in range(T):
        if t % C == 0:
            W0 = [read_weights(a, kw.get("retention", "linear"), kw.get("q_exp", 2.0)) for a in A]
        G = mlp_token_grads(W0, k[:, t, :, None], v[:, t, :, None], kw.get("loss", "l2"), kw.get("p", 2.0))
        e, a_, th_ = (x[:, t, :, None, None] for x in (et, al, th))
        S = [e * s - th_ * g[:, :, 0] for s, g in zip(S, G)]
        A = [(1 - a_) * a + s for a, s in zip(A, S)]
        W = [read_weights(a, kw.get("retention", "linear"), kw.get("q_exp", 2.0)) for a in A]
        ys.append(mlp_apply(W, q[:, t, :, None])[:, :, 0])
    return torch.stack(ys, 1)


@pytest.mark.parametrize("rule", ["titans", "moneta", "memora"])
def test_larger_chunks_are_minibatch_gradient_descent_not_the_reference(rule):
    q, k, v, th, et, al, w = inputs(T=13, depth=2, dtype=torch.float64)
    kw = RULES[rule]
    ref, _ = reference_neural_memory(q, k, v, th, et, al, w, **kw)
    for C in (4, 13):
        y, _ = chunk_neural_memory(q, k, v, th, et, al, w, chunk_size=C, **kw)
        torch.testing.assert_close(y, minibatch_loop(q, k, v, th, et, al, w, C, **kw), rtol=1e-9, atol=1e-9)
        assert (y - ref).abs().max() > 1e-4, "a larger chunk should approximate, not equal, the reference"
    # the first chunk's first token is exact in both
    torch.testing.assert_close(y[:, 0], ref[:, 0], rtol=1e-10, atol=1e-10)


def test_depth_one_without_momentum_or_forgetting_is_the_delta_rule():
    q, k, v, th, _, _, _ = inputs(T=17, depth=1)
    beta = torch.rand(th.shape, generator=torch.Generator().manual_seed(1))
    zero = torch.zeros_like(beta)
    o, s = naive_delta_rule(q, k, v, beta, scale=1.0, use_qk_l2norm=False, output_final_state=True)
    for fn in (titans_memory, lambda *a, **kw: chunk_titans_memory(*a, chunk_size=1, **kw)):
        y, st = fn(q, k, v, beta / 2, zero, zero, [torch.zeros(2, 5, 3)], output_final_state=True)
        torch.testing.assert_close(y, o, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st["A"][0], s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", list(RULES))
def test_step_and_carried_state_equal_one_call(rule):
    q, k, v, th, et, al, w = inputs(T=12, depth=2)
    kw = RULES[rule]
    full, _ = reference_neural_memory(q, k, v, th, et, al, w, **kw)
    y1, st = reference_neural_memory(*(x[:, :7] for x in (q, k, v, th, et, al)), w, output_final_state=True, **kw)
    ys = [y1]
    for t in range(7, 12):
        y, st = reference_neural_memory(
            *(x[:, t : t + 1] for x in (q, k, v, th, et, al)), w, initial_state=st, output_final_state=True, **kw
        )
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-5, atol=1e-6)
    # chunked form: a call boundary on the chunk grid continues exactly
    c_full, _ = chunk_neural_memory(q, k, v, th, et, al, w, chunk_size=4, **kw)
    c1, st = chunk_neural_memory(
        *(x[:, :8] for x in (q, k, v, th, et, al)), w, chunk_size=4, output_final_state=True, **kw
    )
    c2, _ = chunk_neural_memory(*(x[:, 8:] for x in (q, k, v, th, et, al)), w, chunk_size=4, initial_state=st, **kw)
    torch.testing.assert_close(torch.cat([c1, c2], 1), c_full, rtol=1e-5, atol=1e-6)


def test_step_titans_memory():
    q, k, v, th, et, al, w = inputs(T=6)
    full, _ = titans_memory(q, k, v, th, et, al, w)
    _, st = titans_memory(*(x[:, :5] for x in (q, k, v, th, et, al)), w, output_final_state=True)
    y, _ = step_titans_memory(*(x[:, 5:] for x in (q, k, v, th, et, al)), st)
    torch.testing.assert_close(y, full[:, 5:], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="q must be"):
        step_titans_memory(q, k, v, th, et, al, st)
    with pytest.raises(ValueError, match="state"):
        step_titans_memory(*(x[:, 5:] for x in (q, k, v, th, et, al)), None)


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("chunk", [None, 4])
def test_no_future_leakage(rule, chunk):
    q, k, v, th, et, al, w = inputs(T=12)
    kw = RULES[rule]

    def run(*xs):
        if chunk is None:
            return reference_neural_memory(*xs, w, **kw)[0]
        return chunk_neural_memory(*xs, w, chunk_size=chunk, **kw)[0]

    y = run(q, k, v, th, et, al)
    xs2 = [x.clone() for x in (q, k, v, th, et, al)]
    for x in xs2:
        x[:, 6:] = x[:, 6:].flip(1)  # same value ranges, different future
    y2 = run(*xs2)
    torch.testing.assert_close(y2[:, :6], y[:, :6], rtol=0, atol=1e-6)
    assert (y2[:, 6:] - y[:, 6:]).abs().max() > 1e-4


def test_state_is_bounded():
    for T in (5, 40):
        q, k, v, th, et, al, w = inputs(T=T)
        _, st = reference_neural_memory(q, k, v, th, et, al, w, window=3, output_final_state=True)
        sizes = [tuple(x.shape) for x in st["A"] + st["S"] + [st["k"], st["v"], st["gamma"]]]
        assert sizes == [(2, 2, 5, 10), (2, 2, 10, 3)] * 2 + [(2, 2, 2, 5), (2, 2, 2, 3), (2, 2, 2)]


def test_valid_false_is_an_identity_step():
    q, k, v, th, et, al, w = inputs(T=9)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, 3:5] = False
    kk = k.clone()
    kk[0, 3:5] = float("nan")  # invalid tokens never matter, whatever they hold
    y, st = reference_neural_memory(q, kk, v, th, et, al, w, window=2, valid=valid, output_final_state=True)
    keep = [0, 1, 2, 5, 6, 7, 8]
    y0, st0 = reference_neural_memory(
        *(x[:1, keep] for x in (q, k, v, th, et, al)), w, window=2, output_final_state=True
    )
    torch.testing.assert_close(y[:1, keep], y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st["A"][1][:1], st0["A"][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", list(RULES))
def test_gradcheck_float64(rule):
    q, k, v, th, et, al, w = inputs(B=1, T=4, H=1, K=3, V=2, depth=2, dtype=torch.float64)
    kw = RULES[rule]
    args = [x.clone().requires_grad_() for x in (q, k, v, th, et, al)] + [x.clone().requires_grad_() for x in w]

    def fn_ref(q, k, v, th, et, al, *w):
        return reference_neural_memory(q, k, v, th, et, al, list(w), **kw)[0]

    def fn_chunk(q, k, v, th, et, al, *w):
        return chunk_neural_memory(q, k, v, th, et, al, list(w), chunk_size=2, **kw)[0]

    assert torch.autograd.gradcheck(fn_ref, args, eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(fn_chunk, args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("chunk_size", [1, 4])
def test_finite_gradients_from_the_initial_memory(rule, chunk_size):
    """At the layer's own initialisation (a depth-1 memory starts at ``A = 0``, where Moneta's read
    ``A / ||A||_4^2`` is singular) every parameter's gradient is finite: it was NaN for Moneta's initial
    weights, and the clipped NaN update then spoiled every parameter on the first optimiser step."""
    torch.manual_seed(0)
    mem = NeuralMemory(16, 2, depth=1, chunk_size=chunk_size, **RULES[rule])
    if rule == "moneta":  # the singular case: the read starts at A = 0
        assert all(bool((w == 0).all()) for w in mem.weights)
    y, _ = mem(torch.randn(2, 9, 16))
    y.square().sum().backward()
    bad = [n for n, p in mem.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert torch.isfinite(y).all() and not bad, bad


def test_lq_read_at_zero_is_zero_with_a_finite_gradient():
    a = torch.zeros(2, 3, 4, requires_grad=True)
    w = read_weights(a, "lq", 4.0)
    w.sum().backward()
    assert bool((w == 0).all()) and torch.isfinite(a.grad).all()
    b = torch.randn(2, 3, 4, dtype=torch.float64)  # away from 0: A / ||A||_4^2, per matrix
    expect = b / b.abs().pow(4).sum((-1, -2), keepdim=True).pow(0.5)
    torch.testing.assert_close(read_weights(b, "lq", 4.0), expect)


def test_gradients_reach_the_gates_through_the_updates():
    torch.manual_seed(0)
    mem = NeuralMemory(16, 2, depth=2)
    x = torch.randn(2, 9, 16)
    y, _ = mem(x)
    y.square().sum().backward()
    for name, p in mem.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the step size theta only acts through the memory update: its gradient must be nonzero
    q, k, v, th, et, al, w = inputs(T=6)
    th.requires_grad_()
    reference_neural_memory(q, k, v, th, et, al, w)[0].sum().backward()
    assert th.grad[:, :-1].abs().sum() > 0


def test_miras_rules():
    q, k, v, th, et, al, w = inputs(T=10, depth=1)
    zero = torch.zeros_like(th)
    titans_no_momentum, _ = reference_neural_memory(q, k, v, th, zero, al, w)
    # Moneta with p = q = 2 and Yaad with a threshold above every error are Titans without momentum
    y, _ = miras_memory("moneta", q, k, v, th, al, w, p=2.0, q_exp=2.0)
    torch.testing.assert_close(y, titans_no_momentum, rtol=1e-5, atol=1e-6)
    y, _ = miras_memory("yaad", q, k, v, th, al, w, p=1e6)
    torch.testing.assert_close(y, titans_no_momentum, rtol=1e-5, atol=1e-6)
    # Memora: every read memory row is a distribution, and W_t = softmax((1-alpha) log W_{t-1} - theta g)
    _, st = miras_memory("memora", q, k, v, th, al, w, output_final_state=True)
    W = read_weights(st["A"][0], "softmax", 2.0)
    torch.testing.assert_close(W.sum(-1), torch.ones_like(W.sum(-1)))
    W0 = torch.softmax(w[0], -1).expand(2, *w[0].shape)
    g = mlp_token_grads([W0], k[:, :1].transpose(1, 2), v[:, :1].transpose(1, 2), "l2", 2.0)[0][:, :, 0]
    a = al[:, 0, :, None, None]
    expect = torch.softmax((1 - a) * W0.log() - th[:, 0, :, None, None] * g, -1)
    _, st1 = miras_memory("memora", *(x[:, :1] for x in (q, k, v, th, al)), w, output_final_state=True)
    torch.testing.assert_close(read_weights(st1["A"][0], "softmax", 2.0), expect, rtol=1e-5, atol=1e-6)
    # chunked == reference at chunk size 1, through the public wrapper
    for rule in ("moneta", "yaad", "memora"):
        a_, _ = miras_memory(rule, q, k, v, th, al, w)
        b_, _ = miras_memory(rule, q, k, v, th, al, w, chunk_size=1)
        torch.testing.assert_close(b_, a_, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rule"):
        miras_memory("titan", q, k, v, th, al, w)


def test_atlas_window_one_is_titans_and_polynomial_features():
    q, k, v, th, et, al, w = inputs(T=8)
    y, _ = atlas_memory(q, k, v, th, et, al, w, window=1)
    torch.testing.assert_close(y, titans_memory(q, k, v, th, et, al, w)[0])
    # a window of 2 with gamma zero on every other token = the window that skips those tokens
    gamma = torch.ones_like(th)
    y3, _ = atlas_memory(q, k, v, th, et, al, w, window=3, gamma=gamma)
    assert (y3 - y).abs().max() > 1e-4
    phi = polynomial_features(torch.tensor([[1.0, -2.0]]), 3)
    torch.testing.assert_close(phi, torch.tensor([[1.0, -2.0, 1 / 2**0.5, 4 / 2**0.5, 1 / 6**0.5, -8 / 6**0.5]]))


def test_bad_input():
    q, k, v, th, et, al, w = inputs(T=4)
    with pytest.raises(ValueError, match="theta"):
        reference_neural_memory(q, k, v, -th, et, al, w)
    with pytest.raises(ValueError, match="eta"):
        reference_neural_memory(q, k, v, th, et + 1.5, al, w)
    with pytest.raises(ValueError, match="alpha"):
        reference_neural_memory(q, k, v, th, et, al[:, :2], w)
    with pytest.raises(ValueError, match="k must"):
        reference_neural_memory(q, k[:, :3], v, th, et, al, w)
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        reference_neural_memory(q, k, v, th, et, al, [torch.zeros(2, 4, 3)])
    with pytest.raises(ValueError, match="value_dim"):
        reference_neural_memory(q, k, v, th, et, al, [torch.zeros(2, 5, 4)])
    with pytest.raises(ValueError, match="loss"):
        reference_neural_memory(q, k, v, th, et, al, w, loss="l1")
    with pytest.raises(ValueError, match="retention"):
        reference_neural_memory(q, k, v, th, et, al, w, retention="kl")
    with pytest.raises(ValueError, match="window"):
        reference_neural_memory(q, k, v, th, et, al, w, window=0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_neural_memory(q, k, v, th, et, al, w, chunk_size=0)
    with pytest.raises(ValueError, match="depth"):
        init_memory_weights(2, 4, 4, depth=0)
    with pytest.raises(ValueError, match="heads"):
        NeuralMemory(30, 4)
