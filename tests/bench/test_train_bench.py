"""bench train --quick: the step and loss parts run, rows carry ratios to the baseline, reports are written."""

import argparse
import json

import pytest

from effattn.bench import SUITES
from effattn.bench import train_memory as train_bench


def _args(tmp_path, *extra):
    p = argparse.ArgumentParser()
    train_bench.add_arguments(p)
    return p.parse_args(["--quick", "--out", str(tmp_path), *extra])


def test_quick_step_and_loss(tmp_path):
    assert SUITES["train"].run is train_bench.run
    train_bench.run(_args(tmp_path, "--options", "chunked_loss,reversible+chunked", "--loss-steps", "2"))
    rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
    assert [r["option"] for r in rows] == ["baseline", "chunked_loss", "reversible+chunked"]
    assert rows[0]["mem_vs_base"] == 1.0 and all(r["step_s"] > 0 for r in rows)
    notes = json.loads((tmp_path / "train_step.json").read_text())["notes"]
    assert any("goal" in n or "no option" in n for n in notes)
    loss = json.loads((tmp_path / "train_loss.json").read_text())["rows"]
    assert {r["option"] for r in loss} == {"baseline", "mesa", "reversible", "reversible+mesa"}
    assert all(r["steps"] == 2 and r["val_loss"] > 0 for r in loss)
    assert (tmp_path / "train_step.md").exists() and (tmp_path / "train_loss.png").exists()


def test_goal_verdict():
    rows = [
        dict(context=8, option="baseline", mem_vs_base=1.0, time_vs_base=1.0),
        dict(context=8, option="a", mem_vs_base=0.2, time_vs_base=1.4),
        dict(context=8, option="b", mem_vs_base=0.1, time_vs_base=2.0),
    ]
    assert train_bench.goal(rows) == ["T=8: best within 1.5x time is a at 0.20x memory, 1.40x time: goal met"]


def test_unknown_option_and_part(tmp_path):
    with pytest.raises(SystemExit, match="unknown --options"):
        train_bench.run(_args(tmp_path, "--options", "nope", "--parts", "step"))
    with pytest.raises(SystemExit, match="unknown --parts"):
        train_bench.run(_args(tmp_path, "--parts", "step,nope"))


def test_paired_ratios_are_per_round(tmp_path, monkeypatch):
    """--paired: each option's time ratio is taken against the baseline step of the same round; the
    memory column comes from the per-option fresh-process measurement."""
    fake = {"baseline": [10.0, 20.0, 40.0], "chunked_loss": [15.0, 20.0, 20.0]}  # ratios 1.5, 1.0, 0.5
    calls = []

    def timed(model, ids, device, peak):
        name = "baseline" if not model.lm.config.chunked_loss else "chunked_loss"
        calls.append((name, peak))
        return fake[name][sum(c[0] == name for c in calls) - 1], None

    monkeypatch.setattr(train_bench, "_timed_step", timed)
    monkeypatch.setattr(
        train_bench, "peaks_alone", lambda a, names, T: {"baseline": 100 * 2**20, "chunked_loss": 25 * 2**20}
    )
    train_bench.run(_args(tmp_path, "--options", "chunked_loss", "--parts", "step", "--paired", "3"))
    assert calls == [("baseline", False), ("chunked_loss", False)] * 3
    rows = {r["option"]: r for r in json.loads((tmp_path / "train_step.json").read_text())["rows"]}
    assert rows["chunked_loss"]["time_vs_base"] == 1.0 and rows["chunked_loss"]["time_vs_base_range"] == "0.500-1.500"
    assert rows["chunked_loss"]["mem_vs_base"] == 0.25 and rows["baseline"]["time_vs_base"] == 1.0
    assert rows["baseline"]["step_s"] == 20.0 and rows["baseline"]["step_s_range"] == "10-40"


def test_paired_runs_real_steps(tmp_path):
    train_bench.run(_args(tmp_path, "--options", "checkpoint=block", "--parts", "step", "--paired", "2"))
    rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
    assert [r["option"] for r in rows] == ["baseline", "checkpoint=block"]
    assert all(r["timed_steps"] == 2 and r["step_s"] > 0 for r in rows)
    assert all(r["peak_MiB"] > 0 for r in rows) and rows[0]["mem_vs_base"] == 1.0  # measured in fresh processes
    with pytest.raises(SystemExit, match="--paired must be >= 0"):
        train_bench.run(_args(tmp_path, "--parts", "step", "--paired", "-1"))
    with pytest.raises(SystemExit, match="--chunk must be >= 1"):
        train_bench.run(_args(tmp_path, "--parts", "step", "--chunk", "0"))


def test_chunk_option_reaches_the_model(tmp_path):
    args = _args(tmp_path, "--chunk", "24")
    args.dim, args.layers = 32, 2
    model = train_bench._model(args, train_bench.OPTIONS["reversible+chunked"], 64)
    assert (model.lm.config.chunked_mlp, model.lm.config.chunked_loss) == (24, 24)
    assert train_bench._model(args, train_bench.OPTIONS["streambp"], 64).lm.config.streambp == 24
