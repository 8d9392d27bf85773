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
