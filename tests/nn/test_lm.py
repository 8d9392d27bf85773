"""The hybrid language model: decode == full, batched left-padded generation == unbatched,
save/load round trip and its errors, a few training steps of every mixer family, generation
semantics (greedy, eos, sampling), bad input."""

from __future__ import annotations

import doctest
import json
import os

import pytest
import torch

from effattn.nn import LM, LMConfig, list_mixers, mixer_pattern
from tests.helpers import assert_fp32_close

VOCAB = 37


def tiny(mixers, seed: int = 0, **kw) -> LM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, dim=32, n_layers=2, heads=2, mixers=mixers)
    cfg.update(kw)
    return LM(LMConfig(**cfg)).eval()


HYBRIDS = [
    "gated_deltanet,attention",
    "mamba2,sliding_window",
    "mamba,retnet",
    "gla,deltanet",
    "based,aaren",
    "linear_attention,attention",
]


@pytest.mark.parametrize("mixers", HYBRIDS)
def test_hybrid_decode_equals_full(mixers):
    model = tiny(mixers, kv_heads=1)
    ids = torch.randint(0, VOCAB, (2, 12))
    logits, _ = model(ids)
    assert logits.shape == (2, 12, VOCAB)
    pre, state = model(ids[:, :5])
    steps = [pre]
    for t in range(5, 12):
        out, state = model(ids[:, t : t + 1], state)
        steps.append(out)
    assert_fp32_close(torch.cat(steps, dim=1), logits, name=f"{mixers} prefill + decode logits")


@pytest.mark.parametrize("mixers", ["gated_deltanet,attention", "mamba2,mamba", "based,sliding_window"])
def test_generate_left_padded_batch_equals_unbatched(mixers):
    model = tiny(mixers)
    prompts = [torch.randint(0, VOCAB, (1, n)) for n in (3, 7)]
    T = 7
    ids = torch.randint(0, VOCAB, (2, T))  # random tokens in the padding: they must not matter
    valid = torch.zeros(2, T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - p.shape[1] :] = p[0]
        valid[i, T - p.shape[1] :] = True
    out = model.generate(ids, max_new_tokens=6, temperature=0.0, valid=valid)
    assert out.shape == (2, T + 6)
    for i, p in enumerate(prompts):
        ref = model.generate(p, max_new_tokens=6, temperature=0.0)
        assert torch.equal(out[i, T:], ref[0, p.shape[1] :]), f"row {i}: {out[i, T:]} != {ref[0, p.shape[1] :]}"


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, tie):
    model = tiny("mamba2,attention", tie_embeddings=tie, mixer_kwargs={"mamba2": {"d_state": 8}})
    path = tmp_path / "model"
    model.save(path)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    loaded = LM.load(path).eval()
    assert loaded.config == model.config
    assert loaded.num_parameters() == model.num_parameters()
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    if tie:
        assert loaded.head.weight is loaded.embed.weight


def test_load_errors(tmp_path):
    model = tiny("gla,attention")
    model.save(tmp_path)
    # an incompatible config: every mismatched tensor is named
    with pytest.raises(ValueError, match=r"wrong shape.*embed\.weight"):
        LM.load(tmp_path, config=LMConfig(vocab_size=VOCAB, dim=64, n_layers=2, heads=2, mixers="gla,attention"))
    with pytest.raises(ValueError, match=r"missing \[.*blocks\.1\.mixer"):
        LM.load(tmp_path, config=LMConfig(vocab_size=VOCAB, dim=32, n_layers=2, heads=2, mixers="gla,mamba"))
    # a weight missing from the file
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["blocks.0.mlp.up.weight"]
    tensors["extra.weight"] = torch.zeros(3)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['blocks\.0\.mlp\.up\.weight'\], unexpected \['extra\.weight'\]"):
        LM.load(tmp_path)
    # a config file that does not describe an LM
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["mixers"] = ["no_such_mixer"] * 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown mixer 'no_such_mixer'"):
        LM.load(tmp_path)


@pytest.mark.parametrize("mixer", list_mixers())
def test_tiny_lm_learns_a_repeating_sequence(mixer):
    torch.manual_seed(0)
    model = LM(LMConfig(vocab_size=16, dim=32, n_layers=1, heads=2, mixers=mixer)).train()
    period = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    starts = torch.randint(0, 8, (8,))
    seq = torch.stack([period.roll(-int(s)).repeat(5)[:33] for s in starts])
    x, y = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # the unigram entropy of the period is 1.91 nats: going well below it needs the context
    assert losses[-1] < min(0.6 * losses[0], 1.2), f"{mixer}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_generate_greedy_deterministic_and_eos():
    model = tiny("gated_deltanet,attention")
    ids = torch.randint(0, VOCAB, (1, 5))
    a = model.generate(ids, max_new_tokens=8, temperature=0.0)
    b = model.generate(ids, max_new_tokens=8, temperature=0.0)
    assert torch.equal(a, b) and torch.equal(a[:, :5], ids)
    # greedy = argmax of the full forward at every step
    logits, _ = model(a[:, :-1])
    assert torch.equal(logits[0, 4:].argmax(-1), a[0, 5:])
    # eos: generation stops at the first eos (one row), and a finished row keeps emitting eos
    eos = int(a[0, 7])
    first = int((a[0, 5:] == eos).nonzero()[0])
    c = model.generate(ids, max_new_tokens=8, temperature=0.0, eos=eos)
    assert torch.equal(c, a[:, : 5 + first + 1])
    ids2 = torch.cat([ids, torch.randint(0, VOCAB, (1, 5))])
    d = model.generate(ids2, max_new_tokens=8, temperature=0.0, eos=eos)
    assert torch.equal(d[0, : c.shape[1]], c[0]) and (d[0, c.shape[1] :] == eos).all()


def test_generate_sampling():
    model = tiny("mamba2,attention")
    ids = torch.randint(0, VOCAB, (2, 4))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = model.generate(ids, max_new_tokens=6, temperature=1.0, top_p=0.9, generator=g1)
    b = model.generate(ids, max_new_tokens=6, temperature=1.0, top_p=0.9, generator=g2)
    assert torch.equal(a, b)
    greedy = model.generate(ids, max_new_tokens=6, temperature=0.0)
    assert torch.equal(model.generate(ids, max_new_tokens=6, temperature=0.7, top_k=1), greedy)
    assert torch.equal(model.generate(ids, max_new_tokens=6, temperature=1.0, top_p=1e-6), greedy)
    assert model.generate(ids, max_new_tokens=0).shape == ids.shape


def test_config_pattern_state_size_and_parameters():
    assert mixer_pattern("mamba2,mamba2,attention", 5) == ["mamba2", "mamba2", "attention", "mamba2", "mamba2"]
    cfg = LMConfig(vocab_size=VOCAB, dim=32, n_layers=3, heads=2, mixers="mamba2")
    assert cfg.mixers == ["mamba2"] * 3
    model = LM(cfg)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    untied = LM(LMConfig(vocab_size=VOCAB, dim=32, n_layers=3, heads=2, mixers="mamba2", tie_embeddings=False))
    assert untied.num_parameters() == model.num_parameters() + VOCAB * 32
    # a recurrent model's state does not grow with the context; attention's does
    assert model.state_size(64) == model.state_size(4096) > 0
    att = tiny("attention,attention")
    assert att.state_size(256) > att.state_size(64) > 0
    assert att.state_size(64, batch=2) >= 2 * att.state_size(64) * 0.9


def test_bad_input():
    with pytest.raises(ValueError, match="unknown mixer"):
        LMConfig(vocab_size=VOCAB, dim=32, n_layers=1, heads=2, mixers="nope")
    with pytest.raises(ValueError, match="heads"):
        LMConfig(vocab_size=VOCAB, dim=30, n_layers=1, heads=4)
    with pytest.raises(ValueError, match="kv_heads"):
        LMConfig(vocab_size=VOCAB, dim=32, n_layers=1, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        LMConfig(vocab_size=0)
    model = tiny("mamba2,attention")
    with pytest.raises(TypeError, match="ids"):
        model(torch.randn(1, 4))
    with pytest.raises(ValueError, match="ids"):
        model(torch.tensor([[0, VOCAB]]))
    with pytest.raises(ValueError, match="ids"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="state"):
        model(torch.tensor([[1, 2]]), state=[None])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, valid=torch.tensor([[True, False]]))


def test_docstring_examples():
    import effattn.nn.lm
    import effattn.nn.registry

    for module in (effattn.nn.lm, effattn.nn.registry):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, f"{module.__name__}: {result}"
