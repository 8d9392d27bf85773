"""NeuralMemory's short convolution on q, k, v (Titans section 4.4; ``conv_size``, issue #18): ``conv_size=0``
is the layer before it, bitwise; with it: causal, decode and split calls equal one call, padding is skipped,
the conv weights learn, and a key depends on the tokens before it (what MQAR's key -> value binding needs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effattn.memory.titans as titans_module
from effattn.linear import causal_conv1d
from effattn.memory import NeuralMemory, chunk_neural_memory, reference_neural_memory
from effattn.nn.mixers.atlas import AtlasMixer
from effattn.nn.mixers.miras import MemoraMixer, MonetaMixer, YaadMixer
from effattn.nn.mixers.titans import TitansMAC, TitansMAG, TitansMAL


def _old_forward(mem, x, state=None, valid=None):
    """NeuralMemory.forward as it was before the convolution (commit 1c1610b), verbatim but for ``mem``."""
    B, T, _ = x.shape
    H, D = mem.heads, mem.head_dim
    q = mem.features(mem.q_proj(x).view(B, T, H, D))
    k = mem.features(mem.k_proj(x).view(B, T, H, D))
    v = mem.v_proj(x).view(B, T, H, D)
    gates = torch.sigmoid(mem.gate_proj(x)).view(B, T, -1, H)
    theta = mem.theta_max * gates[:, :, 0]
    eta = gates[:, :, 1] if mem.momentum else torch.zeros_like(gates[:, :, 1])
    alpha = gates[:, :, 2]
    gamma = gates[:, :, 3] if mem.opts["window"] > 1 else None
    if valid is not None:
        theta = theta * valid[..., None]
        alpha = alpha * valid[..., None]
        eta = torch.where(valid[..., None], eta, torch.ones_like(eta))
        gamma = None if gamma is None else gamma * valid[..., None]
        k = k * valid[..., None, None]
        v = v * valid[..., None, None]
    weights = list(mem.weights)
    if valid is not None and T > 1 and bool(valid.all()):
        valid = None
    common = dict(gamma=gamma, **mem.opts, initial_state=state, output_final_state=True)
    if mem.chunk_size > 1 and valid is None and T > 1:
        o, state = chunk_neural_memory(
            q, k, v, theta, eta, alpha, weights, **common, chunk_size=mem.chunk_size, fast=mem.fast
        )
    else:
        o, state = reference_neural_memory(
            q, k, v, theta, eta, alpha, weights, **common, valid=valid, chunk_size=mem.chunk_size
        )
    o = mem.o_norm(o.to(x.dtype)).reshape(B, T, -1)
    return mem.o_proj(o * F.silu(mem.g_proj(x))), state


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b))
    return a == b


@pytest.mark.parametrize(
    "cfg",
    [dict(depth=2, chunk_size=4), dict(depth=1, chunk_size=1), dict(depth=2, window=3, feature_degree=2)],
    ids=["titans", "token", "atlas"],
)
def test_conv_size_zero_is_the_old_layer(cfg):
    torch.manual_seed(0)
    mem = NeuralMemory(16, 2, conv_size=0, **cfg)
    assert not any("conv" in name for name, _ in mem.named_parameters())
    torch.manual_seed(0)  # the conv parameters are created last: the other parameters start the same
    with_conv = NeuralMemory(16, 2, conv_size=4, **cfg)
    old_names = dict(mem.named_parameters())
    for name, p in with_conv.named_parameters():
        assert ("conv" in name) != (name in old_names)
        assert name not in old_names or torch.equal(p, old_names[name])
    x = torch.randn(2, 11, 16)
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, :3] = False
    y, st = mem(x[:, :6])
    y_old, st_old = _old_forward(mem, x[:, :6])
    assert _equal((y, st), (y_old, st_old)) and "conv" not in st
    assert _equal(mem(x[:, 6:], st), _old_forward(mem, x[:, 6:], st_old))
    assert _equal(mem(x, valid=valid), _old_forward(mem, x, valid=valid))
    assert not torch.allclose(with_conv(x[:, :6])[0], y_old)  # and the conv is not a no-op


@pytest.mark.parametrize("K", [1, 2, 4])
def test_causal_conv1d_is_the_formula(K):
    x, w, b = torch.randn(2, 6, 5, dtype=torch.float64), torch.randn(5, K, dtype=torch.float64), torch.randn(5)
    state = torch.randn(2, K - 1, 5, dtype=torch.float64)
    xs = torch.cat([state, x], 1)
    want = torch.stack([b + sum(w[:, i] * xs[:, t + i] for i in range(K)) for t in range(6)], 1)
    y, new_state = causal_conv1d(x, w, b.double(), state, activation=False)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(causal_conv1d(x, w, b.double(), state)[0], F.silu(want))
    assert torch.equal(new_state, xs[:, 6:])
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, w[:4])
    with pytest.raises(ValueError, match="state"):
        causal_conv1d(x, w, state=torch.zeros(2, K, 5, dtype=torch.float64))


def _mem(**kw):
    torch.manual_seed(3)
    return NeuralMemory(16, 2, **{"depth": 2, "chunk_size": 4, **kw}).double().eval()


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_conv_no_future_leakage(chunk_size):
    mem = _mem(chunk_size=chunk_size)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        y = mem(x)[0]
        for t in (0, 4, 7):
            x2 = x.clone()
            x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 3
            y2 = mem(x2)[0]
            torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], atol=1e-12, rtol=1e-12)
            assert (y2[:, t + 1] - y[:, t + 1]).abs().max() > 1e-3  # the perturbation is seen where it may be


@pytest.mark.parametrize("conv_values", [False, True])
def test_conv_state_holds_the_last_projections(conv_values):
    mem = _mem(conv_values=conv_values)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        _, st = mem(x)
        _, st0 = _mem(conv_size=0)(x)
        assert set(st) == set(st0) | {"conv"}
        assert len(st["conv"]) == (3 if conv_values else 2)
        for proj, c in zip((mem.q_proj, mem.k_proj, mem.v_proj), st["conv"]):
            assert c.shape == (2, 3, 16)
            torch.testing.assert_close(c, proj(x)[:, -3:], atol=0, rtol=0)


@pytest.mark.parametrize("conv_values", [False, True])
def test_conv_decode_and_split_equal_one_call(conv_values):
    mem = _mem(conv_values=conv_values)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        full, st_full = mem(x)
        outs, st = [], None
        for t in range(11):  # token by token from the start
            y, st = mem(x[:, t : t + 1], st)
            outs.append(y)
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=1e-10)
        for c, c_full in zip(st["conv"], st_full["conv"]):
            torch.testing.assert_close(c, c_full, atol=1e-12, rtol=1e-12)
        for s in (1, 2, 4, 5, 9, 10):  # one call split anywhere (across and inside chunks of 4)
            y1, st1 = mem(x[:, :s])
            y2, _ = mem(x[:, s:], st1)
            torch.testing.assert_close(torch.cat([y1, y2], 1), full, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("conv_values", [False, True])
def test_conv_left_padding_equals_the_unpadded_row(conv_values):
    mem = _mem(conv_values=conv_values)
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        ref, st_ref = mem(x)
        ref_next, _ = mem(x[:, -1:] * 0.5, st_ref)
        pad = torch.cat([torch.full((1, 3, 16), 1e3, dtype=torch.float64), x], 1)
        both = torch.cat([pad, torch.cat([x, x[:, :3]], 1)], 0)  # row 0 left-padded, row 1 unpadded
        valid = torch.ones(2, 12, dtype=torch.bool)
        valid[0, :3] = False
        y, st = mem(both, valid=valid)
        torch.testing.assert_close(y[0, 3:], ref[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(y[1, :9], ref[0], atol=1e-10, rtol=1e-10)
        for c, c_ref in zip(st["conv"], st_ref["conv"]):
            torch.testing.assert_close(c[:1], c_ref, atol=1e-12, rtol=1e-12)
        y_next, _ = mem(x[:, -1:].expand(2, 1, 16) * 0.5, st)
        torch.testing.assert_close(y_next[:1], ref_next, atol=1e-10, rtol=1e-10)


def test_conv_padding_after_a_state_is_skipped():
    """Invalid tokens after a non-empty state (Titans' persistent tokens, a decode step of a padded row)
    are identity steps of the conv too: the row equals the row with them removed."""
    mem = _mem()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    with torch.no_grad():
        ref, _ = mem(x)
        _, st = mem(x[:, :5])
        mid = torch.cat([x[:, 5:6], torch.randn(1, 2, 16, dtype=torch.float64), x[:, 6:]], 1)
        valid = torch.tensor([[True, False, False, True, True, True, True]])
        y, _ = mem(mid, st, valid)
        torch.testing.assert_close(y[:, valid[0]], ref[:, 5:], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("conv_values", [False, True])
def test_conv_weights_get_gradients(conv_values):
    torch.manual_seed(4)
    mem = NeuralMemory(4, 2, depth=2, chunk_size=2, conv_size=3, conv_values=conv_values).double()
    x = torch.randn(1, 5, 4, dtype=torch.float64)
    params = list(mem.conv_weight) + list(mem.conv_bias)
    n = len(mem.conv_weight)

    def f(*ps):
        return torch.func.functional_call(
            mem,
            {f"conv_weight.{i}": p for i, p in enumerate(ps[:n])} | {f"conv_bias.{i}": p for i, p in enumerate(ps[n:])},
            (x,),
        )[0]

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(f, inputs, atol=1e-6)
    mem(x)[0].square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("bad", [-1, 2.0, True])
def test_bad_conv_size(bad):
    with pytest.raises(ValueError, match="conv_size"):
        NeuralMemory(16, 2, conv_size=bad)


def test_state_without_conv_entry_raises():
    mem = _mem()
    _, st = _mem(conv_size=0)(torch.randn(1, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="state"):
        mem(torch.randn(1, 1, 16, dtype=torch.float64), st)


def _keys_seen_by_memory(mem, x, monkeypatch):
    """The keys ``k [B, T, H, D]`` the layer hands to the memory rule (recorded at the call)."""
    seen = []

    def record(fn):
        def wrapped(q, k, *args, **kw):
            seen.append(k)
            return fn(q, k, *args, **kw)

        return wrapped

    monkeypatch.setattr(titans_module, "chunk_neural_memory", record(titans_module.chunk_neural_memory))
    monkeypatch.setattr(titans_module, "reference_neural_memory", record(titans_module.reference_neural_memory))
    mem(x)
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("conv_size", [0, 4])
def test_key_binds_the_previous_tokens(conv_size, monkeypatch):
    """d k_t / d x_s != 0 exactly for s in (t - K, t] with a kernel K conv; only s = t without one."""
    mem = _mem(conv_size=conv_size)
    x = torch.randn(1, 11, 16, dtype=torch.float64, requires_grad=True)
    t = 7
    k = _keys_seen_by_memory(mem, x, monkeypatch)
    (g,) = torch.autograd.grad(k[0, t].sum() + (k[0, t] * torch.linspace(-1, 1, 16).view(2, 8)).sum(), x)
    touched = [s for s in range(11) if g[0, s].abs().max() > 0]
    assert touched == (list(range(t - 3, t + 1)) if conv_size else [t])


MIXERS = [
    (TitansMAL, dict(window=4, num_persistent=2)),
    (TitansMAG, dict(window=4, num_persistent=2)),
    (TitansMAC, dict(segment=4)),
    (MonetaMixer, {}),
    (YaadMixer, {}),
    (MemoraMixer, {}),
    (AtlasMixer, {}),
]


@pytest.mark.parametrize("cls,kw", MIXERS, ids=[c.__name__ for c, _ in MIXERS])
def test_memory_mixers_take_conv_size(cls, kw):
    torch.manual_seed(0)
    assert cls(16, 2, **kw).memory.conv_size == 4  # the default
    assert cls(16, 2, conv_size=0, **kw).memory.conv_size == 0
    mixer = cls(16, 2, conv_size=2, chunk_size=4, **kw).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        full, _ = mixer(x)
        y, st = mixer(x[:, :5])
        outs = [y]
        for t in range(5, 9):
            y, st = mixer(x[:, t : t + 1], st)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_conv_values_false_convolves_q_and_k_only(monkeypatch):
    """``conv_values=False``: the rule gets ``v = W_v x`` unconvolved while q, k are as with ``True``;
    the conv state holds q and k; decode and split calls still equal one call."""
    mem = _mem(conv_values=False)
    full_conv = _mem(conv_values=True)
    assert len(mem.conv_weight) == 2 and len(full_conv.conv_weight) == 3
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    seen = []

    def record(q, k, v, *args, **kw):
        seen.append((q, k, v))
        return chunk(q, k, v, *args, **kw)

    chunk = titans_module.chunk_neural_memory
    monkeypatch.setattr(titans_module, "chunk_neural_memory", record)
    with torch.no_grad():
        full, st = mem(x)
        full_conv(x)
    (q, k, v), (q3, k3, v3) = seen
    torch.testing.assert_close(v, mem.v_proj(x).view(2, 11, 2, 8), atol=0, rtol=0)
    assert not torch.allclose(v3, v)  # True convolves v
    # same seed, conv weights drawn q, k (, v) last: q and k are True's, bitwise
    assert torch.equal(q, q3) and torch.equal(k, k3)
    assert len(st["conv"]) == 2
    monkeypatch.undo()
    with torch.no_grad():
        for s in (1, 5, 10):
            y1, st1 = mem(x[:, :s])
            y2, _ = mem(x[:, s:], st1)
            torch.testing.assert_close(torch.cat([y1, y2], 1), full, atol=1e-10, rtol=1e-10)
        outs, st = [], None
        for t in range(11):
            y, st = mem(x[:, t : t + 1], st)
            outs.append(y)
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cls,kw", MIXERS, ids=[c.__name__ for c, _ in MIXERS])
def test_memory_mixers_take_conv_values(cls, kw):
    assert not cls(16, 2, **kw).memory.conv_values  # the default: q, k convolved
    assert len(cls(16, 2, **kw).memory.conv_weight) == 2
    assert len(cls(16, 2, conv_values=True, **kw).memory.conv_weight) == 3  # the papers' block


@pytest.mark.parametrize("bad", [0, "no", None])
def test_bad_conv_values(bad):
    with pytest.raises(ValueError, match="conv_values"):
        NeuralMemory(16, 2, conv_values=bad)
