"""The fast (factored) chunk form of the neural memories: equal to the materialized chunked form on the same
chunk grid and to the reference at chunk size 1 (float64; depths 1-3; window 1 and > 1; momentum and
forgetting on/off; odd T), gradients through every input (gradcheck), no future leakage, and the chunk
grid carried across calls (a call split anywhere, one-token steps, rows at different grid positions)."""

from __future__ import annotations

import pytest
import torch

from effattn.memory import (
    NeuralMemory,
    chunk_neural_memory,
    fast_chunk_applies,
    init_memory_weights,
    reference_neural_memory,
    step_titans_memory,
)

F64 = dict(rtol=1e-9, atol=1e-10)


def inputs(B=2, T=23, H=2, K=5, V=3, depth=2, seed=0, momentum=True, forget=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    theta = 0.15 * torch.rand(B, T, H, generator=g, dtype=dtype)
    eta = torch.rand(B, T, H, generator=g, dtype=dtype) * momentum
    alpha = 0.2 * torch.rand(B, T, H, generator=g, dtype=dtype) * forget
    gamma = torch.rand(B, T, H, generator=g, dtype=dtype)
    w = [x.to(dtype) for x in init_memory_weights(H, K, V, depth=depth, generator=g)]
    if depth == 1:
        w = [0.1 * torch.randn(H, K, V, generator=g, dtype=dtype)]
    return (q, k, v, theta, eta, alpha), w, gamma


def assert_states_close(a, b, **tol):
    assert sorted(a) == sorted(b)
    for key in ("A", "S", "A0"):
        for x, y in zip(a.get(key, []), b.get(key, [])):
            torch.testing.assert_close(x, y, **tol)
    for key in ("k", "v", "gamma", "pos"):
        if key in a:
            torch.testing.assert_close(a[key], b[key], **tol)


CASES = [
    (depth, window, loss, momentum, forget)
    for depth in (1, 2, 3)
    for window in (1, 3)
    for loss, momentum, forget in (("l2", True, True), ("huber", True, False), ("l2", False, True))
]


@pytest.mark.parametrize("depth,window,loss,momentum,forget", CASES)
@pytest.mark.parametrize("chunk", [4, 5])
def test_fast_equals_materialized_and_token_grid(depth, window, loss, momentum, forget, chunk):
    xs, w, gamma = inputs(depth=depth, momentum=momentum, forget=forget, seed=depth + 7 * window)
    kw = dict(gamma=gamma, window=window, loss=loss, p=0.3 if loss == "huber" else 2.0, output_final_state=True)
    a, sa = chunk_neural_memory(*xs, w, chunk_size=chunk, fast=True, **kw)
    b, sb = chunk_neural_memory(*xs, w, chunk_size=chunk, fast=False, **kw)
    assert a.abs().max() < 1e3  # a stable run: the comparison means something
    torch.testing.assert_close(a, b, **F64)
    assert_states_close(sa, sb, **F64)
    # the same chunk semantics token by token (the decoding path)
    c, sc = reference_neural_memory(*xs, w, chunk_size=chunk, **kw)
    torch.testing.assert_close(a, c, **F64)
    assert_states_close(sa, sc, **F64)
    # and it is not the exact rule (chunks > 1 approximate it)
    r, _ = reference_neural_memory(*xs, w, **kw)
    assert (a - r).abs().max() > 1e-6


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("window", [1, 2])
def test_fast_chunk_size_one_is_the_reference(depth, window):
    xs, w, gamma = inputs(depth=depth, T=9)
    kw = dict(gamma=gamma, window=window, output_final_state=True)
    a, sa = chunk_neural_memory(*xs, w, chunk_size=1, fast=True, **kw)
    r, sr = reference_neural_memory(*xs, w, **kw)
    torch.testing.assert_close(a, r, **F64)
    assert_states_close(sa, sr, **F64)


@pytest.mark.parametrize("window", [1, 3])
def test_chunk_grid_continues_across_calls_and_steps(window):
    xs, w, gamma = inputs(depth=2, T=19)
    full, _ = chunk_neural_memory(*xs, w, gamma=gamma, window=window, chunk_size=4)
    ys, st = [], None
    for c0, c1 in ((0, 6), (6, 7), (7, 13), (13, 15), (15, 16), (16, 19)):  # splits inside chunks
        part = [x[:, c0:c1] for x in (*xs, gamma)]
        # one-token pieces: the token-by-token form of the same grid (the decoding step)
        fn = reference_neural_memory if c1 - c0 == 1 else chunk_neural_memory
        kw = dict(gamma=part[6], window=window, chunk_size=4, initial_state=st, output_final_state=True)
        y, st = fn(*part[:6], w, **kw)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), full, **F64)
    assert st["pos"].tolist() == [19 % 4] * 2


def test_step_titans_memory_continues_a_chunked_prefill():
    xs, w, _ = inputs(depth=2, T=10)
    full, _ = chunk_neural_memory(*xs, w, chunk_size=4)
    _, st = chunk_neural_memory(*(x[:, :6] for x in xs), w, chunk_size=4, output_final_state=True)
    ys = []
    for t in range(6, 10):
        y, st = step_titans_memory(*(x[:, t : t + 1] for x in xs), st, chunk_size=4)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), full[:, 6:], **F64)


def test_rows_at_different_grid_positions():
    xs, w, gamma = inputs(depth=2, T=12)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False  # row 1: three padded (identity) tokens, so its grid lags by three
    _, st = reference_neural_memory(
        *(x[:, :6] for x in xs), w, chunk_size=4, valid=valid[:, :6], output_final_state=True
    )
    assert st["pos"].tolist() == [2, 3]
    y, _ = chunk_neural_memory(*(x[:, 6:] for x in xs), w, chunk_size=4, initial_state=st)
    for i in range(2):
        keep = valid[i]
        row = [x[i : i + 1, keep] for x in xs]
        ref, _ = chunk_neural_memory(*row, w, chunk_size=4)
        torch.testing.assert_close(y[i : i + 1], ref[:, -6:], **F64)


@pytest.mark.parametrize("depth,window", [(1, 1), (2, 2)])
def test_fast_gradcheck(depth, window):
    xs, w, gamma = inputs(B=1, T=5, H=1, K=2, V=2, depth=depth, seed=3)
    leaves = [x.clone().requires_grad_() for x in (*xs, gamma, *w)]

    def fn(q, k, v, th, et, al, ga, *ws):
        y, st = chunk_neural_memory(
            q, k, v, th, et, al, list(ws), gamma=ga, window=window, chunk_size=2, fast=True, output_final_state=True
        )
        return y, *st["A"], *st["S"]

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_fast_gradients_equal_materialized():
    xs, w, gamma = inputs(depth=3, T=13, seed=5)
    grads = []
    for fast in (True, False):
        leaves = [x.clone().requires_grad_() for x in (*xs, gamma, *w)]
        y, st = chunk_neural_memory(
            *leaves[:6], leaves[7:], gamma=leaves[6], window=2, chunk_size=4, fast=fast, output_final_state=True
        )
        (y.square().sum() + sum(a.square().sum() for a in st["A"] + st["S"])).backward()
        grads.append([x.grad for x in leaves])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, **F64)
        assert g1.abs().max() > 0


@pytest.mark.parametrize("window", [1, 3])
def test_no_future_leakage(window):
    xs, w, gamma = inputs(depth=2, T=17, seed=2)
    y, _ = chunk_neural_memory(*xs, w, gamma=gamma, window=window, chunk_size=4, fast=True)
    xs2 = [x.clone() for x in xs]
    for x in xs2[:3]:
        x[:, 10:] = torch.randn_like(x[:, 10:])
    y2, _ = chunk_neural_memory(*xs2, w, gamma=gamma, window=window, chunk_size=4, fast=True)
    torch.testing.assert_close(y2[:, :10], y[:, :10], rtol=0, atol=0)
    assert (y2[:, 10:] - y[:, 10:]).abs().max() > 1e-3


def test_which_rules_are_fast_and_bad_input():
    assert fast_chunk_applies("linear", False)
    assert not fast_chunk_applies("linear", True) and not fast_chunk_applies("lq", False)
    assert not fast_chunk_applies("softmax", False)
    xs, w, _ = inputs(T=4)
    with pytest.raises(ValueError, match="fast=True needs"):
        chunk_neural_memory(*xs, w, muon=True, fast=True)
    with pytest.raises(ValueError, match="fast=True needs"):
        chunk_neural_memory(*xs, w, retention="softmax", fast=True)


@pytest.mark.parametrize("window", [1, 3])
def test_neural_memory_layer_decode_equals_full(window):
    torch.manual_seed(0)
    mem = NeuralMemory(16, 2, depth=2, window=window, chunk_size=4).double().eval()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    y, _ = mem(x)
    ys, st = [], None
    for t in range(11):
        yt, st = mem(x[:, t : t + 1], st)
        ys.append(yt)
    torch.testing.assert_close(torch.cat(ys, 1), y, **F64)
    assert st["pos"].tolist() == [11 % 4] * 2
