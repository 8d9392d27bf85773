"""``effattn compare --mixers``: one speed row per named mixer layer and length (family ``mixer``), issue #18."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from effattn.bench.compare import make_config, speed_mechanisms
from effattn.bench.compare import speed as speed_mod
from effattn.bench.compare.config import add_arguments, config_from_args
from effattn.bench.compare.speed_report import (
    MIXER_FAMILY,
    panels,
    speed_advice,
    speed_section,
    speed_table_rows,
    speed_terminal_rows,
)
from effattn.bench.memory_speed import DIM, HEADS
from effattn.nn import MIXERS, build_mixer, register_mixer

LENGTHS = (16, 32)


def _mixer_rows(monkeypatch, mixers, options=None):
    """``run_speed`` of a tiny config with ``--mixers``, its op mechanisms left out (they have their own
    tests and take most of the section's time): the rows, the notes and the mechanisms it was given."""
    cfg = make_config(
        "tiny", lengths=LENGTHS, repeats=1, only=("speed",), mixers=tuple(mixers), mixer_options=options or {}
    )
    real = speed_mod.speed_mechanisms

    def mixers_only(cfg, gemm):
        mechs, notes = real(cfg, gemm)
        return [m for m in mechs if m.family == MIXER_FAMILY], notes

    monkeypatch.setattr(speed_mod, "speed_mechanisms", mixers_only)
    rows, _, notes = speed_mod.run_speed(cfg)
    return rows, notes


def test_mixers_add_one_row_per_mixer_and_length(monkeypatch):
    names = ("gated_deltanet", "titans_mal")
    rows, notes = _mixer_rows(monkeypatch, names)
    assert sorted((r["mechanism"], r["T"]) for r in rows) == sorted((n, T) for n in names for T in LENGTHS)
    for r in rows:
        assert r["family"] == MIXER_FAMILY and "error" not in r, r
        for key in ("fwd_ms", "fwd_bwd_ms", "fwd_bwd_MiB", "step_us"):
            assert math.isfinite(r[key]) and r[key] >= 0, (key, r)
        assert r["fwd_ms_min"] <= r["fwd_ms"] <= r["fwd_ms_max"] and r["repeats"] == "1/1"
        assert r["fwd_bwd_ms"] > 0 and r["step_us"] > 0  # both mixers decode with a state
        assert r["state_bytes"] == build_mixer(r["mechanism"], dim=DIM, heads=HEADS).state_size(1, r["T"])
        assert "fwd_bwd_speedup_paired" not in r  # a layer is not paired with SDPA
    assert any("family mixer" in n for n in notes)


def test_without_mixers_the_speed_section_is_unchanged():
    base = make_config("tiny", lengths=LENGTHS)
    with_mixers = make_config("tiny", lengths=LENGTHS, mixers=("gla",))
    plain, _ = speed_mechanisms(base, 1.0)
    more, _ = speed_mechanisms(with_mixers, 1.0)
    assert MIXER_FAMILY not in {m.family for m in plain}
    assert [(m.family, m.name) for m in more] == [(m.family, m.name) for m in plain] + [(MIXER_FAMILY, "gla")]


def test_mixer_options_reach_the_layer_and_only_their_mixer(monkeypatch):
    options = {"sliding_window": {"window": 8}, "gated_deltanet": {"chunk_size": 0}}
    rows, _ = _mixer_rows(monkeypatch, ("sliding_window", "gated_deltanet", "gla"), options)
    by = {(r["mechanism"], r["T"]): r for r in rows}
    for T in LENGTHS:
        window = by[("sliding_window (window=8)", T)]
        assert window["state_bytes"] == build_mixer("sliding_window", dim=DIM, heads=HEADS, window=8).state_size(1, T)
        assert window["state_bytes"] != build_mixer("sliding_window", dim=DIM, heads=HEADS).state_size(1, T)
        # the chunk size reached the constructor: 0 is refused there, and the row says so instead of a crash
        assert "chunk_size" in by[("gated_deltanet (chunk_size=0)", T)]["error"]
        assert "error" not in by[("gla", T)] and by[("gla", T)]["fwd_ms"] > 0
    # the command line gives the same labels
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--mixers", "gla,sliding_window", "--mixer-options", "sliding_window:window=8"])
    names = [m.name for m in speed_mod.mixer_mechanisms(config_from_args(args))]
    assert names == ["gla", "sliding_window (window=8)"]


class _FailsAboveSixteen(torch.nn.Module):
    """A test mixer: runs up to T = 16, raises above; its decode step always raises."""

    def __init__(self, dim, heads):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, state=None, valid=None):
        if state is not None:
            raise RuntimeError("no step form")
        if x.shape[1] > 16:
            raise RuntimeError(f"cannot run at T={x.shape[1]}")
        return self.proj(x), torch.zeros(4)

    def state_size(self, batch, seq_len):
        return 16


def test_a_failing_mixer_gives_error_rows_and_the_section_goes_on(monkeypatch):
    register_mixer("test_fails_above_16")(_FailsAboveSixteen)
    try:
        rows, _ = _mixer_rows(monkeypatch, ("test_fails_above_16", "no_such_mixer", "gla"))
    finally:
        del MIXERS["test_fails_above_16"]
    by = {(r["mechanism"], r["T"]): r for r in rows}
    assert len(rows) == 6
    short = by[("test_fails_above_16", 16)]
    assert short["fwd_ms"] > 0 and short["state_bytes"] == 16 and "step_us" not in short
    assert "decode: RuntimeError: no step form" in short["note"]
    assert by[("test_fails_above_16", 32)]["error"] == "RuntimeError: cannot run at T=32"
    assert all("unknown mixer" in by[("no_such_mixer", T)]["error"] for T in LENGTHS)
    assert all(by[("gla", T)]["step_us"] > 0 for T in LENGTHS)


def test_report_renders_mixer_rows_apart_from_the_ops():
    op = {"family": "exact", "mechanism": "sdpa causal", "T": 64, "fwd_ms": 1.0, "fwd_bwd_ms": 3.0}
    op |= {"fwd_bwd_speedup_paired": 1.0, "fwd_bwd_MiB": 2.0, "state_bytes": 65536}
    mix = {"family": MIXER_FAMILY, "mechanism": "gla", "T": 64, "fwd_ms": 0.5, "fwd_ms_min": 0.4}
    mix |= {"fwd_ms_max": 0.6, "fwd_bwd_ms": 9.0, "fwd_bwd_MiB": 0.5, "step_us": 80.0, "state_bytes": 4096}
    bad = {"family": MIXER_FAMILY, "mechanism": "rmt", "T": 64, "error": "RuntimeError: boom"}
    rows = [op, mix, bad]
    table = {r["mechanism"]: r for r in speed_table_rows(rows)}
    assert table["gla"]["family"] == "mixer" and table["gla"]["fwd ms"] == "0.5 (0.4-0.6)"
    assert table["gla"]["x sdpa"] is None and table["rmt"]["error"] == "RuntimeError: boom"
    md = "\n".join(speed_section(rows, {}))
    assert "| mixer | gla | 64 |" in md and "Family mixer (`--mixers`)" in md and "RuntimeError: boom" in md
    assert "Family mixer" not in "\n".join(speed_section([op], {}))
    advice = speed_advice(rows)
    # the ops' answer ignores the layer rows (smaller memory and state, but not the same size)
    assert advice[0].startswith("T=64: fastest fwd+bwd is sdpa causal") and "gla" not in advice[0]
    assert advice[1].startswith("T=64 mixer layers: fastest fwd+bwd is gla (9 ms)")
    assert speed_terminal_rows([bad])[0]["remark"] == "RuntimeError: boom"
    assert panels(rows)[f"mixer layers alone (width {DIM}, {HEADS} heads)"] == ["gla", "rmt"]


@pytest.mark.parametrize("flag", ["--mixers", "--mixer-options"])
def test_help_names_the_speed_rows(flag):
    p = argparse.ArgumentParser()
    add_arguments(p)
    action = next(a for a in p._actions if flag in a.option_strings)
    assert "speed" in action.help and "default" in action.help


def test_docstring_examples_of_the_new_functions():
    import doctest
    import sys

    from effattn.bench import memory_speed
    from effattn.bench.compare.speed_report import mixer_advice

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    objs = (speed_mod.mixer_label, mixer_advice, memory_speed.build_layer, memory_speed.decode_step_stats)
    for obj in objs:
        tests = finder.find(obj, globs={**vars(sys.modules[obj.__module__]), "torch": torch})
        assert tests and tests[0].examples, obj.__name__
        for t in tests:
            runner.run(t)
    assert runner.summarize(verbose=False).failed == 0
