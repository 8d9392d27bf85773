"""bench hf --quick: both parts run, write their reports and state the issue's targets."""

import argparse
import json

import pytest

pytest.importorskip("transformers")

from effattn.bench import SUITES  # noqa: E402
from effattn.bench import hf as hf_bench  # noqa: E402


def _args(tmp_path, *extra):
    p = argparse.ArgumentParser()
    hf_bench.add_arguments(p)
    return p.parse_args(["--quick", "--repeats", "1", "--out", str(tmp_path), *extra])


def test_registered_with_its_own_options():
    assert "hf" in SUITES.names()
    p = argparse.ArgumentParser()
    SUITES["hf"].add_arguments(p)
    assert {"--eager-max", "--decode-context", "--budget", "--models"} <= set(p._option_string_actions)


def test_quick_prefill_and_decode(tmp_path):
    hf_bench.run(_args(tmp_path, "--models", "llama,mistral,gemma2", "--lengths", "300"))
    rows = json.loads((tmp_path / "hf_prefill.json").read_text())["rows"]
    got = {(r["model"], r["impl"]) for r in rows if "error" not in r}
    assert {("llama", "effattn"), ("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa")} <= got
    assert ("gemma2", "eager") in got  # HF has no sdpa path for Gemma 2: a row says so
    assert any(r["model"] == "gemma2" and r["impl"] == "sdpa" and "error" in r for r in rows)
    for r in rows:
        if r["impl"] != "effattn" and "error" not in r:
            assert r["logits_rel_rms_vs_effattn"] < 1e-4, r  # same model, same logits
            assert r["speedup"] > 0 and r["peak_MiB"] >= 0
    dec = json.loads((tmp_path / "hf_decode.json").read_text())["rows"]
    caches = [r["cache"].split()[0] for r in dec if r["model"] == "llama"]
    assert caches == ["dynamic"] + ["compressed"] * 4 + ["dynamic"]  # ring / ring=False, reindex on / off
    assert all(r["tokens_per_s"] > 0 for r in dec), dec
    # greedy tokens agree between implementations on the full cache
    assert all(r.get("same_tokens_as_first", True) for r in dec if r["cache"].startswith("dynamic"))
    targets = (tmp_path / "hf_targets.md").read_text()
    assert "plain causal within 5%" in targets and "not measured" in targets  # no 16k in a quick run


def test_bad_options_exit(tmp_path):
    with pytest.raises(SystemExit, match="unknown --models"):
        hf_bench.run(_args(tmp_path, "--models", "llama,nope"))
    with pytest.raises(SystemExit, match="unknown --parts"):
        hf_bench.run(_args(tmp_path, "--parts", "prefill,nope"))


def test_effattn_alone_when_nothing_to_pair_with(tmp_path):
    """Gemma 2 past --eager-max: HF has no sdpa path and eager is skipped; effattn is still timed."""
    args = _args(tmp_path, "--models", "gemma2", "--lengths", "200", "--eager-max", "100", "--parts", "prefill")
    rows = hf_bench.prefill_rows(args)
    ours = [r for r in rows if r["impl"] == "effattn"]
    assert len(ours) == 1 and ours[0]["runs"] == 1 and ours[0]["median_s"] > 0


def test_baseline_repeats_zero_times_the_baselines_memory_call(tmp_path):
    """--baseline-repeats 0: HF sdpa runs once (its memory call, also its timing), effattn --repeats times."""
    args = _args(tmp_path, "--models", "mistral", "--lengths", "200", "--parts", "prefill", "--eager-max", "100")
    args.repeats, args.baseline_repeats = 2, 0
    calls = []
    build = hf_bench.build

    def counting_build(*a, **kw):
        models = build(*a, **kw)
        for impl, m in models.items():
            m.register_forward_pre_hook(lambda *_, impl=impl: calls.append(impl))
        return models

    hf_bench.build = counting_build
    try:
        rows = {r["impl"]: r for r in hf_bench.prefill_rows(args)}
    finally:
        hf_bench.build = build
    assert calls.count("sdpa") == 1 and calls.count("effattn") == 3
    assert rows["sdpa"]["runs"] == 1 and rows["sdpa"]["median_s"] == rows["sdpa"]["first_call_s"]
    assert rows["effattn"]["runs"] == 2 and rows["sdpa"]["speedup"] > 0
