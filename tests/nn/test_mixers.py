"""Every registered mixer against the mixer contract: decode == full forward, prefill + decode ==
full, batched left-padded == unbatched, causality, state size, gradients, bad input; plus the
registry. Parametrized over ``list_mixers()``, so a newly registered mixer is covered automatically."""

from __future__ import annotations

import pytest
import torch

from effattn.nn import build_mixer, list_mixers, register_mixer
from effattn.nn.registry import MIXERS
from tests.helpers import assert_fp32_close

DIM, HEADS = 32, 2

# every registered mixer with its defaults, plus variants that exercise other code paths
# (window eviction, other feature maps, several chunks)
CASES = [(name, {}) for name in list_mixers()] + [
    ("based", {"window": 4}),
    ("sliding_window", {"window": 4}),
    ("linear_attention", {"feature_map": "identity"}),
    ("linear_attention", {"feature_map": "taylor", "feature_dim": 4}),
    ("gla", {"chunk_size": 8}),
    ("gated_deltanet", {"chunk_size": 8}),
    ("mamba", {"chunk_size": 8}),
    ("mamba2", {"chunk_size": 8, "d_state": 16}),
    ("retnet", {"chunk_size": 8}),
    ("aaren", {"chunk_size": 8}),
    ("mom", {"chunk_size": 8, "shared_memory": False}),
    ("linear_attention", {"chunk_size": 8}),
    ("deltanet", {"chunk_size": 8}),
    ("based", {"window": 4, "chunk_size": 8}),
    ("infini_attention", {"conv_size": 4, "segment": 4}),
    ("topk_block", {"block": 4, "top_k": 1}),
    ("topk_block", {"block": 2, "top_k": 2, "rope": False}),
    # routing: rings that evict (cluster_window / window below the test lengths), all-routing, all-local
    ("routing", {"num_clusters": 2, "cluster_window": 3, "window": 4}),
    ("routing", {"local_heads": 0, "num_clusters": 3, "cluster_window": 2}),
    ("routing", {"local_heads": 2, "window": 3}),
    ("routing", {"rope": False, "num_clusters": 20, "cluster_window": 1, "window": 1}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in CASES]


def make(name: str, kw: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    mixer = build_mixer(name, dim=DIM, heads=HEADS, **kw)
    # non-trivial values everywhere (zero-initialised biases would hide masking mistakes)
    with torch.no_grad():
        for p in mixer.parameters():
            if p.dim() == 1 and torch.all(p == 0):
                p.uniform_(-0.5, 0.5)
    return mixer.eval()


def decode(mixer, x, state=None, valid=None):
    ys = []
    for t in range(x.shape[1]):
        y, state = mixer(x[:, t : t + 1], state, None if valid is None else valid[:, t : t + 1])
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_decode_equals_full(name, kw):
    mixer = make(name, kw)
    x = torch.randn(2, 13, DIM)
    y, _ = mixer(x)
    assert y.shape == x.shape
    y_dec, _ = decode(mixer, x)
    assert_fp32_close(y_dec, y, name=f"{name} token-by-token decode")


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_prefill_then_decode_and_chunked_prefill(name, kw):
    mixer = make(name, kw)
    x = torch.randn(2, 19, DIM)
    y, _ = mixer(x)
    y1, s = mixer(x[:, :7])
    y2, s = mixer(x[:, 7:12], s)  # a second multi-token call continues the state
    y3, _ = decode(mixer, x[:, 12:], s)
    assert_fp32_close(torch.cat([y1, y2, y3], dim=1), y, name=f"{name} prefill + prefill + decode")


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_left_padded_batch_equals_unbatched(name, kw):
    mixer = make(name, kw)
    lens, T, n_dec = (9, 13), 13, 4
    seqs = [torch.randn(1, n + n_dec, DIM) for n in lens]
    # garbage (large, nonzero) values at the padded positions: they must not matter
    x = 3.0 * torch.randn(2, T, DIM)
    valid = torch.zeros(2, T, dtype=torch.bool)
    for i, n in enumerate(lens):
        x[i, T - n :] = seqs[i][0, :n]
        valid[i, T - n :] = True
    y, s = mixer(x, valid=valid)
    x_dec = torch.stack([sq[0, n:] for sq, n in zip(seqs, lens)])
    y_dec, _ = decode(mixer, x_dec, s)
    for i, n in enumerate(lens):
        y_ref, s_ref = mixer(seqs[i][:, :n])
        assert_fp32_close(y[i : i + 1, T - n :], y_ref, name=f"{name} padded prefill row {i}")
        y_ref_dec, _ = decode(mixer, seqs[i][:, n:], s_ref)
        assert_fp32_close(y_dec[i : i + 1], y_ref_dec, name=f"{name} decode after padded prefill row {i}")


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_no_future_leakage(name, kw):
    mixer = make(name, kw)
    x = torch.randn(1, 16, DIM)
    x2 = x.clone()
    x2[:, 9:] = torch.randn(1, 7, DIM)
    y, _ = mixer(x)
    y2, _ = mixer(x2)
    assert_fp32_close(y2[:, :9], y[:, :9], name=f"{name} outputs before the perturbed tokens")
    assert (y2[:, 9:] - y[:, 9:]).abs().max() > 1e-3, "perturbed tokens did not change their own outputs"


@pytest.mark.parametrize("name", list_mixers())
def test_state_size_and_gradients(name):
    mixer = make(name, {})
    size = mixer.state_size(1, 64)
    assert isinstance(size, int) and size > 0
    assert mixer.state_size(2, 64) >= 2 * size * 0.9  # scales with the batch
    assert mixer.state_size(1, 256) >= size  # never shrinks with the context
    x = torch.randn(2, 11, DIM, requires_grad=True)
    y, _ = mixer.train()(x)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in mixer.named_parameters():
        assert p.grad is not None, f"{name}: parameter {pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"


@pytest.mark.parametrize("name", list_mixers())
def test_bad_input(name):
    mixer = make(name, {})
    with pytest.raises(ValueError, match="x"):
        mixer(torch.randn(2, 5, DIM + 1))
    with pytest.raises(ValueError, match="x"):
        mixer(torch.randn(5, DIM))
    with pytest.raises(ValueError, match="heads"):
        build_mixer(name, dim=30, heads=4)


def test_registry():
    names = list_mixers()
    for expected in (
        "linear_attention",
        "based",
        "retnet",
        "gla",
        "deltanet",
        "gated_deltanet",
        "mamba",
        "mamba2",
        "aaren",
        "mom",
    ):
        assert expected in names
    with pytest.raises(ValueError, match="registered mixers: .*gla"):
        build_mixer("no_such_mixer", dim=DIM, heads=HEADS)
    with pytest.raises(ValueError, match="already registered"):
        register_mixer("gla")(torch.nn.Identity)

    @register_mixer("test_identity_mixer")
    class IdentityMixer(torch.nn.Module):
        def __init__(self, dim, heads):
            super().__init__()

        def forward(self, x, state=None, valid=None):
            return x, state

    try:
        assert "test_identity_mixer" in list_mixers()
        assert isinstance(build_mixer("test_identity_mixer", dim=8, heads=2), IdentityMixer)
    finally:
        del MIXERS["test_identity_mixer"]
    assert "test_identity_mixer" not in list_mixers()


def test_every_mixer_module_registers_and_its_examples_run():
    """One module per mixer: each module of ``effattn.nn.mixers`` (``_base`` aside) registers at least one
    mixer, every registered mixer comes from one of them, and the docstring examples run."""
    import doctest
    import importlib
    import pkgutil

    import effattn.nn.mixers as pkg

    modules = [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]
    for mod in modules:
        if mod.__name__.endswith("._base"):
            continue
        here = [n for n, e in MIXERS.items() if getattr(mod, e.__name__, None) is e]
        assert here, f"{mod.__name__} registers no mixer"
    for name, entry in MIXERS.items():
        assert any(getattr(mod, entry.__name__, None) is entry for mod in modules), f"{name}: not in nn.mixers"
    for mod in modules:
        res = doctest.testmod(mod, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert res.attempted > 0, f"{mod.__name__} has no docstring example"
        assert res.failed == 0, f"{res.failed} docstring examples of {mod.__name__} failed"


def test_registry_module_imports_no_mixer():
    """The registry loads ``effattn.nn.mixers`` by name on first lookup; it imports none of it (no circle)."""
    import ast
    import inspect

    import effattn.nn.registry as registry

    tree = ast.parse(inspect.getsource(registry))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("effattn.nn")], imported
    assert registry.MIXERS.package == "effattn.nn.mixers"
    with pytest.raises(ValueError, match="unknown mixer"):
        del MIXERS["no_such_mixer"]


def test_based_has_the_papers_short_gated_convolution():
    """Based's gated convolution branch ``(W_g x) * conv_3(W_c x)``: its output at ``t`` sees exactly
    ``x_{t-2..t}``; ``conv_size=0`` is the mixer without it (linear + window only)."""
    from effattn.nn.mixers.based import BasedMixer

    torch.manual_seed(0)
    m = BasedMixer(DIM, HEADS, window=4, conv_size=3).eval()
    x = torch.randn(1, 11, DIM)
    o, _ = m._gated_conv(x, None, None)
    want = torch.zeros_like(o)
    u = m.conv_in(x)
    for t in range(11):  # the causal depthwise convolution written out, zeros before the start
        for i in range(3):
            if t - 2 + i >= 0:
                want[:, t] += m.conv.weight[:, i] * u[:, t - 2 + i]
    want = m.conv_gate(x) * (want + m.conv.bias)
    assert_fp32_close(o, want)
    x2 = x.clone()
    x2[:, 3] += 1.0  # changes the conv output at t = 3, 4, 5 only
    d = (m._gated_conv(x2, None, None)[0] - o).abs().amax(-1)[0]
    assert (d[3:6] > 0).all() and (d[:3] == 0).all() and (d[6:] == 0).all()
    assert m.o_proj.in_features == 3 * DIM and len(m(x)[1]) == 3
    plain = BasedMixer(DIM, HEADS, window=4, conv_size=0)
    assert plain.o_proj.in_features == 2 * DIM and not hasattr(plain, "conv")
    with pytest.raises(ValueError, match="conv_size"):
        BasedMixer(DIM, HEADS, conv_size=-1)
