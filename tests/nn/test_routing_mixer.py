"""The Routing Transformer mixer beyond the generic mixer contract (tests/nn/test_mixers.py covers
decode == full, padding, causality, gradients for it): the layer is the op, the decoding state stays
bounded and keeps matching the full forward over long contexts, the k-means centroids move only in
training (one EMA step over the real tokens, no gradient) and survive save/load, bad input."""

from __future__ import annotations

import doctest

import pytest
import torch

from effattn.nn import LM, LMConfig, build_mixer
from effattn.nn.mixers import RoutingMixer, state_nbytes
from effattn.sparse import routing_attention
from tests.helpers import assert_fp32_close

DIM, HEADS = 32, 4


def _mixer(seed: int = 0, **kw) -> RoutingMixer:
    torch.manual_seed(seed)
    return build_mixer("routing", dim=DIM, heads=HEADS, **kw).eval()


def test_layer_is_projections_around_the_op():
    m = _mixer(num_clusters=3, cluster_window=5, window=6)
    assert isinstance(m, RoutingMixer) and m.local_heads == 2 and m.routing_heads == 2  # the paper's half and half
    x = torch.randn(2, 40, DIM)
    q, k, v = (t.reshape(2, 40, HEADS, 8) for t in m.wqkv(x).chunk(3, -1))
    pos = torch.arange(40)
    q = torch.cat([m.rope.apply(q[:, :, :2], pos), q[:, :, 2:]], 2)  # RoPE on the local heads only
    k = torch.cat([m.rope.apply(k[:, :, :2], pos), k[:, :, 2:]], 2)
    o = routing_attention(q, k, v, router=m.router, causal=True, local_heads=2, window=6, cluster_window=5)
    assert_fp32_close(m(x)[0], m.o_proj(o.flatten(2)))


def test_long_decode_with_bounded_state():
    m = _mixer(num_clusters=3, cluster_window=4, window=5)
    x = torch.randn(2, 90, DIM)
    with torch.no_grad():
        full, _ = m(x)
        y, s = m(x[:, :30])
        ys = [y]
        for t in range(30, 90):
            y, s = m(x[:, t : t + 1], s)
            ys.append(y)
            assert s["lk"].shape[1] == 5 and s["rk"].shape[3] == 4  # rings never outgrow their bounds
    assert_fp32_close(torch.cat(ys, 1), full, name="prefill 30 + 60 decoding steps")
    assert int(s["rcount"].sum()) == 2 * 2 * 90 and bool((s["pos"] == 90).all())
    held = state_nbytes(s)
    assert held <= m.state_size(2, 90) == m.state_size(2, 10**6)  # bounded: constant past the windows
    assert m.state_size(2, 2) < m.state_size(2, 90)  # a short context holds less


def test_centroids_move_only_in_training_and_get_no_gradient():
    m = _mixer(num_clusters=4)
    assert "router.centroids" in dict(m.named_buffers())
    assert all("centroids" not in n for n, _ in m.named_parameters())
    x = torch.randn(2, 24, DIM)
    before = m.router.centroids.clone()
    m(x)
    assert torch.equal(m.router.centroids, before)  # eval: unchanged
    # training: one EMA step over the real tokens (padding excluded), after the selection
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[0, :10] = False
    ref = _mixer(num_clusters=4)
    ref.load_state_dict(m.state_dict())
    q, k, _ = (t.reshape(2, 24, HEADS, 8) for t in ref.wqkv(x).chunk(3, -1))
    ref.router.update(q[:, :, 2:][valid][None].detach(), k[:, :, 2:][valid][None].detach())
    m.train()
    y, _ = m(x, valid=valid)
    assert not torch.equal(m.router.centroids, before)
    assert_fp32_close(m.router.centroids, ref.router.centroids, name="centroids after one training call")
    y[valid].square().sum().backward()
    assert m.router.centroids.grad is None and not m.router.centroids.requires_grad


def test_save_load_keeps_the_centroids(tmp_path):
    torch.manual_seed(0)
    model = LM(
        LMConfig(
            vocab_size=23,
            dim=DIM,
            n_layers=2,
            heads=HEADS,
            mixers="routing,gla",
            mixer_kwargs={"routing": {"num_clusters": 3, "cluster_window": 4}},
        )
    )
    ids = torch.randint(0, 23, (2, 16))
    model.train()(ids)  # a training forward moves the centroids away from their initialisation
    model.eval()
    model.save(tmp_path)
    loaded = LM.load(tmp_path).eval()
    fresh = LM(loaded.config).eval()
    c = model.blocks[0].mixer.router.centroids
    assert torch.equal(loaded.blocks[0].mixer.router.centroids, c)
    assert not torch.equal(fresh.blocks[0].mixer.router.centroids, c)
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    out = loaded.generate(ids[:, :5], max_new_tokens=6, temperature=0.0)
    logits, _ = loaded(out[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), out[:, 5:])  # greedy decoding == full forward argmax


def test_bad_input():
    with pytest.raises(ValueError, match="num_clusters"):
        build_mixer("routing", dim=DIM, heads=HEADS, num_clusters=0)
    with pytest.raises(ValueError, match="cluster_window"):
        build_mixer("routing", dim=DIM, heads=HEADS, cluster_window=1.5)
    with pytest.raises(ValueError, match="local_heads"):
        build_mixer("routing", dim=DIM, heads=HEADS, local_heads=5)
    m = _mixer()
    x = torch.randn(2, 6, DIM)
    with pytest.raises(ValueError, match="left padding"):
        m(x, valid=torch.tensor([[True, False, True, True, True, True]] * 2))
    _, s = m(x)
    with pytest.raises(ValueError, match="state"):
        m(x[:, :1], {"pos": s["pos"]})
    with pytest.raises(ValueError, match="batch"):
        m(x[:1, :1], s)


def test_docstring_example():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(RoutingMixer, "RoutingMixer", globs={"torch": torch, "RoutingMixer": RoutingMixer}):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0, runner.summarize()
