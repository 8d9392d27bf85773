"""``bench memory --parts speed``: the paired before/after row (fast vs materialized chunk form: same numbers),
the external titans-pytorch row (present, or a note when the package is missing), the report."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from effattn.bench.memory import add_arguments
from effattn.bench.memory_speed import external_rows, paired_row, run_speed, speed_row


def test_paired_row_compares_equal_forms():
    row = paired_row("titans_mag", dict(window=4), 11, 4, repeats=1)
    assert row["max_abs_diff"] < 1e-5
    assert row["speedup"] > 0 and row["fwd_bwd"]["ms"] > 0 and row["fwd_bwd_materialized"]["ms"] > 0
    assert speed_row("titans_mal", dict(window=4), 8, 4, repeats=1, fast=False)["form"] == "chunk 4 materialized"


def test_external_row_is_a_note_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "titans_pytorch", None)  # import fails as if not installed
    ours, ext = external_rows(8, 4, repeats=1)
    assert ours["fwd_bwd"]["ms"] > 0
    assert "not installed" in ext["error"] and "fwd" not in ext


def test_external_row_runs_when_installed():
    pytest.importorskip("titans_pytorch")
    _, ext = external_rows(8, 4, repeats=1)
    assert "error" not in ext, ext
    assert ext["fwd_bwd"]["ms"] > 0


def test_run_speed_writes_rows_and_report(tmp_path):
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--lengths", "9", "--repeats", "1", "--chunk-size", "4", "--token-max-len", "9"])
    args.speed_mixers = "titans_mal,sliding_window"
    run_speed(args, tmp_path, {"command": "test"})
    rows = [json.loads(line) for line in (tmp_path / "speed_rows.jsonl").read_text().splitlines()]
    assert [(r["mixer"], r["form"]) for r in rows] == [
        ("titans_mal", "chunk 4"),
        ("titans_mal", "chunk 4: materialized vs fast (paired)"),
        ("titans_mal", "token"),
        ("sliding_window", "-"),
    ]
    assert "speedup" in (tmp_path / "speed.md").read_text()
