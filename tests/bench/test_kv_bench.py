"""``effattn bench kv --quick`` end to end at a tiny size (a 5-step model: rows, files, caching; not accuracy)."""

from __future__ import annotations

import json

import pytest
import torch

from effattn.__main__ import main
from effattn.bench import kv as kv_bench
from effattn.bench.tasks.passkey import DEFAULT_VOCAB_SIZE, make_passkey
from effattn.bench.train import build_lm
from effattn.kv import list_policies


def test_quick_preset_end_to_end(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = [
        "bench",
        "kv",
        "--quick",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--lengths",
        "64",
        "--ratios",
        "0.5",
        "--prompts",
        "2",
    ]
    main(argv)
    payload = json.loads((out / "kv.json").read_text())
    assert (out / "kv.md").read_text().count("| 64 |") == len(payload["rows"])
    assert (out / "kv_accuracy.png").stat().st_size > 1000
    rows = payload["rows"]
    methods = [r["method"] for r in rows]
    assert methods[0] == "full" and set(list_policies()) <= set(methods)
    assert {"kivi_2bit", "kivi_4bit"} <= set(methods)
    for r in rows:
        assert "error" not in r, r
        assert r["T"] == 64 and 0.0 <= r["accuracy"] <= r["digit_acc"] + 1e-9 <= 1.0 + 1e-9
        assert r["cache_bytes"] > 0 and r["tok_per_s"] > 0 and r["prefill_s"] > 0
        if r["method"] in list_policies():
            assert r["ratio"] == 0.5 and 0.0 <= r["mass_kept"] <= 1.0 + 1e-5 and 0.0 <= r["needle_kept"] <= 1.0
            if r["method"] != "duo_attention":  # retrieval heads keep everything
                assert r["cache_frac"] < 0.8
        if r["method"].startswith("kivi"):
            assert r["cache_frac"] <= 1.0
    full = rows[0]
    assert full["cache_bytes"] == 2 * 2 * 64 * 64 * 4  # layers x (k, v) x tokens x dim x float32
    meta = payload["meta"]
    assert meta["train"]["steps"] == 5 and meta["train"]["cached"] is False and "machine" in meta
    # the second run loads the saved weights instead of training
    main([*argv, "--policies", "streaming_llm"])
    assert json.loads((out / "kv.json").read_text())["meta"]["train"]["cached"] is True


def test_training_is_deterministic():
    # a tiny extension stage too: the default `extend` (300 steps at 1k-8k tokens) took 5 minutes per run
    cfg = kv_bench.PasskeyModelConfig(
        stages=((1, 16, 32, 64), (1, 32, 48, 96)), extend=((1, 48, 64, 64),), dim=16, heads=2
    )
    a, _ = kv_bench.train_passkey_lm(cfg, log=None)
    b, _ = kv_bench.train_passkey_lm(cfg, log=None)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert cfg.key() != kv_bench.PasskeyModelConfig(seed=1).key()


@pytest.mark.parametrize("policy", ["streaming_llm", "snapkv"])
def test_mass_kept_matches_the_kept_positions(policy):
    """mass_kept / needle_kept from the cache positions, checked by brute force on one layer."""
    from effattn.kv import make_policy

    cfg = kv_bench.PasskeyModelConfig(dim=16, heads=2)
    torch.manual_seed(0)
    model = build_lm("attention", 16, 2, cfg.vocab_size, 2, rope_fraction=0.25).eval()
    batch = make_passkey(2, 48, 5, depth=0.5, seed=0)
    probs = kv_bench.reference_probs(model, batch.prompts)
    assert all(torch.allclose(p.sum(-1), torch.ones(2, 2)) for p in probs)
    state = model.compressed_state(make_policy(policy, budget=12))
    with torch.no_grad():
        model(batch.prompts, state)
    cache = state[0].cache
    mass, needle = kv_bench._kept_stats(cache, probs, batch.needle_pos, 6, 2)
    want_m, want_n = [], []
    for layer, p in enumerate(probs):
        for h in range(2):
            for b in range(2):
                kept = cache.kept(layer, h)[2][b].tolist()
                want_m.append(float(p[b, h, kept].sum()))
                lo = int(batch.needle_pos[b])
                want_n.append(sum(lo <= x < lo + 6 for x in kept) / 6)
    assert mass == pytest.approx(sum(want_m) / len(want_m), abs=1e-5)
    assert needle == pytest.approx(sum(want_n) / len(want_n), abs=1e-6)


def _tiny_passkey_model():
    torch.manual_seed(0)
    model = build_lm("attention", 16, 2, DEFAULT_VOCAB_SIZE, 2, rope_fraction=0.25).eval()
    return model, make_passkey(2, 48, 5, depth=0.5, seed=1)


def test_tova_in_the_model_keeps_the_top_of_the_last_query_attention():
    """TOVA after a prefill keeps exactly the top-``budget`` tokens of the last prompt query's attention
    (RoPE'd q and k, mean over the layer's heads), as the full model computes it (reference_probs)."""
    from effattn.kv import make_policy

    model, batch = _tiny_passkey_model()
    probs = kv_bench.reference_probs(model, batch.prompts)
    state = model.compressed_state(make_policy("tova", budget=12))
    with torch.no_grad():
        model(batch.prompts, state)
    cache = state[0].cache
    for layer, p in enumerate(probs):
        for b in range(2):
            want = set(p[b].mean(0).topk(12).indices.tolist())
            for h in range(2):
                assert set(cache.kept(layer, h)[2][b].tolist()) == want


def test_knorm_in_the_model_keeps_the_smallest_cached_keys():
    """K-norm keeps the keys of smallest L2 norm among the keys the full cache holds (per layer, head)."""
    from effattn.kv import make_policy

    model, batch = _tiny_passkey_model()
    full = model.cache_state("contiguous")
    state = model.compressed_state(make_policy("knorm", budget=12))
    with torch.no_grad():
        model(batch.prompts, full)
        model(batch.prompts, state)
    cache = state[0].cache
    for layer in model.policy_layers():
        norms = full[layer].k.float().norm(dim=-1)  # [B, T, H_kv]
        for b in range(2):
            for h in range(2):
                want = set(norms[b, :, h].topk(12, largest=False).indices.tolist())
                assert set(cache.kept(layer, h)[2][b].tolist()) == want


def test_extended_config_keeps_the_base_key_and_continues_from_the_base_model(tmp_path):
    base = kv_bench.PasskeyModelConfig(stages=((2, 16, 32, 64),), extend=(), dim=16, heads=2)
    cfg = kv_bench.PasskeyModelConfig(stages=((2, 16, 32, 64),), extend=((2, 32, 64, 128),), dim=16, heads=2)
    assert cfg.base() == base and cfg.key() != base.key() and cfg.steps == 4
    # the key of a config without extension hashes the fields it had before `extend` existed
    assert kv_bench.PasskeyModelConfig(extend=()).key() == "passkey-lm-c37d63c5730a"
    model, info = kv_bench.load_or_train(cfg, tmp_path, log=None)
    assert (tmp_path / base.key() / "train.json").exists() and info["base"]["steps"] == 2
    b, _ = kv_bench.load_or_train(base, tmp_path, log=None)
    again, _ = kv_bench.train_passkey_lm(cfg, log=None, base_model=b)
    scratch, _ = kv_bench.train_passkey_lm(cfg, log=None)
    for x, y, z in zip(model.state_dict().values(), again.state_dict().values(), scratch.state_dict().values()):
        assert torch.equal(x, y) and torch.equal(x, z)
