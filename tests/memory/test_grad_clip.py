"""Per-token gradient-norm clipping of the neural memories (``max_grad_norm``): each token's gradient is
scaled to at most ``tau`` (the norm over all layers), the same in the reference, the materialized and the
fast chunk forms (float64), and it keeps a memory whose plain update diverges bounded."""

from __future__ import annotations

import pytest
import torch

from effattn.memory import NeuralMemory, chunk_neural_memory, reference_neural_memory
from effattn.memory._neural import clip_scale, mlp_token_factors, mlp_token_grads

from .test_fast_chunk import F64, assert_states_close, inputs


def _norms(grads):
    return sum(g.square().sum((-1, -2)) for g in grads).sqrt()


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_clipped_token_gradient_has_norm_min_of_norm_and_tau(depth):
    (q, k, v, *_), w, _ = inputs(depth=depth, seed=depth)
    W = [x.unsqueeze(0).expand(2, *x.shape) for x in w]
    kc, vc = k.transpose(1, 2), v.transpose(1, 2)
    plain = mlp_token_grads(W, kc, vc, "l2", 2.0)
    n = _norms(plain)
    tau = float(n.median())  # about half the tokens clipped
    clipped = mlp_token_grads(W, kc, vc, "l2", 2.0, max_grad_norm=tau)
    torch.testing.assert_close(_norms(clipped), n.clamp(max=tau), **F64)
    for g, c in zip(plain, clipped):  # same direction
        torch.testing.assert_close(c, g * (tau / n.clamp(min=tau))[..., None, None], **F64)
    # the factored norm equals the norm of the materialized outer products
    ins, deltas = mlp_token_factors(W, kc, vc, "l2", 2.0)
    torch.testing.assert_close(clip_scale(ins, deltas, tau), tau / n.clamp(min=tau), **F64)


@pytest.mark.parametrize("depth,window", [(1, 1), (2, 3), (3, 1)])
@pytest.mark.parametrize("chunk", [1, 4])
def test_fast_materialized_and_reference_agree_with_clipping(depth, window, chunk):
    xs, w, gamma = inputs(depth=depth, seed=10 + depth)
    kw = dict(gamma=gamma, window=window, output_final_state=True, max_grad_norm=0.4)
    ref = reference_neural_memory(*xs, w, chunk_size=chunk, **kw)
    fast = chunk_neural_memory(*xs, w, chunk_size=chunk, fast=True, **kw)
    mat = chunk_neural_memory(*xs, w, chunk_size=chunk, fast=False, **kw)
    for y, st in (fast, mat):
        torch.testing.assert_close(y, ref[0], **F64)
        assert_states_close(st, ref[1], **F64)
    plain = reference_neural_memory(*xs, w, chunk_size=chunk, **{**kw, "max_grad_norm": None})
    assert (plain[0] - ref[0]).abs().max() > 1e-3  # the clip was active on these inputs
    huge = chunk_neural_memory(*xs, w, chunk_size=chunk, **{**kw, "max_grad_norm": 1e12})
    torch.testing.assert_close(huge[0], plain[0], **F64)


def test_clipping_bounds_a_diverging_memory():
    """A step size past heavy-ball stability (2 theta > 2 (1 + eta) for unit keys) makes the plain rule grow
    geometrically; clipped, every token moves the momentum by at most theta tau, so
    ``||A_t - A_0|| <= t theta tau / (1 - eta)``."""
    B, T, H, K = 1, 96, 1, 4
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(3, K, generator=g, dtype=torch.float64), dim=-1)
    k = keys[torch.arange(T) % 3].view(B, T, H, K)  # a repeating prompt, as passkey's filler
    v = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    theta, eta, alpha = (torch.full((B, T, H), x, dtype=torch.float64) for x in (3.0, 0.9, 0.0))
    w = [torch.zeros(H, K, K, dtype=torch.float64)]
    tau = 1.0
    bound = T * 3.0 * tau / (1 - 0.9)
    _, plain = chunk_neural_memory(k, k, v, theta, eta, alpha, w, chunk_size=8, output_final_state=True)
    assert not (plain["A"][0].norm() <= bound)  # diverged (or non-finite)
    for chunk in (1, 8):
        y, st = chunk_neural_memory(
            k, k, v, theta, eta, alpha, w, chunk_size=chunk, output_final_state=True, max_grad_norm=tau
        )
        assert torch.isfinite(y).all()
        assert st["A"][0].norm() <= bound


def test_layer_option_decode_equals_full_and_gradients_flow():
    torch.manual_seed(0)
    mem = NeuralMemory(8, 2, depth=2, chunk_size=4, theta_max=2.0, max_grad_norm=0.5).double()
    x = torch.randn(2, 11, 8, dtype=torch.float64, requires_grad=True)
    y, _ = mem(x)
    state, steps = None, []
    for t in range(11):
        yt, state = mem(x[:, t : t + 1], state)
        steps.append(yt)
    torch.testing.assert_close(torch.cat(steps, 1), y, rtol=1e-9, atol=1e-10)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert mem.gate_proj.weight.grad.abs().sum() > 0


def test_layer_clips_by_default():
    """NeuralMemory clips at norm 1 unless told otherwise: its default equals max_grad_norm=1.0 and differs
    from the unclipped layer on inputs whose token gradients exceed 1 (the unclipped layer diverges)."""
    torch.manual_seed(0)
    base = NeuralMemory(8, 2, depth=1, chunk_size=4, theta_max=4.0).double()
    x = 3 * torch.randn(1, 64, 8, dtype=torch.float64)
    layers = {}
    for tau in ("default", 1.0, None):
        mem = NeuralMemory(
            8, 2, depth=1, chunk_size=4, theta_max=4.0, **({} if tau == "default" else {"max_grad_norm": tau})
        )
        mem.double().load_state_dict(base.state_dict())
        layers[tau] = mem(x)[1]["A"][0]
    torch.testing.assert_close(layers["default"], layers[1.0], rtol=0, atol=0)
    assert torch.isfinite(layers[1.0]).all()
    assert not torch.allclose(layers[1.0], layers[None])


def test_gradcheck_with_active_clip():
    xs, w, gamma = inputs(B=1, T=6, H=1, K=3, V=2, depth=2, seed=3)
    leaves = [x.clone().requires_grad_() for x in xs[:3]] + [x.clone().requires_grad_() for x in w]

    def f(q, k, v, *ws):
        return chunk_neural_memory(q, k, v, *xs[3:], list(ws), chunk_size=3, max_grad_norm=0.3, fast=True)[0]

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_max_grad_norm(bad):
    xs, w, _ = inputs(depth=1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        chunk_neural_memory(*xs, w, max_grad_norm=bad)
    with pytest.raises(ValueError, match="max_grad_norm"):
        reference_neural_memory(*xs, w, max_grad_norm=bad)
