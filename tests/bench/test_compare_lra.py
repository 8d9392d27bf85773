"""effattn compare --preset lra: the preset, the section's rows and report page (tiny budget)."""

from __future__ import annotations

import json

from effattn.bench.compare import make_config, run_compare
from effattn.bench.compare.lra import LRA_PAPER_TRANSFORMER


def test_lra_preset_sizes():
    cfg = make_config("lra")
    assert cfg.only == ("lra",)
    assert (cfg.lra_listops_min_len, cfg.lra_listops_max_len) == (500, 2000)  # LRA's ListOps lengths
    assert cfg.lra_mixers == ("attention",)
    assert make_config("quick").only == ("speed", "recall", "listops")  # lra is not in the default run


def test_lra_section_runs_and_reports(tmp_path):
    cfg = make_config(
        "lra",
        out=str(tmp_path),
        lra_dim=16,
        lra_steps=1,
        lra_train=8,
        lra_test=4,
        lra_batch=4,
        lra_listops_min_len=10,
        lra_listops_max_len=40,
        lra_pathfinder_difficulty="easy",
    )
    res = run_compare(cfg)
    rows = res["lra"]
    assert [(r["task"], r["mixer"]) for r in rows] == [("ListOps", "attention"), ("Pathfinder", "attention")]
    for r in rows:
        assert "error" not in r, r
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["paper_transformer"] == LRA_PAPER_TRANSFORMER[r["task"]] / 100
    assert rows[1]["tokens"] == 1024 and rows[1]["majority"] == 0.5
    md = (tmp_path / "lra.md").read_text()
    assert "0.3637" in md and "0.7140" in md and "Table 1" in md
    assert json.loads((tmp_path / "lra.json").read_text())["rows"][0]["task"] == "ListOps"
    assert md in (tmp_path / "report.md").read_text()  # the run's report carries the section
    # the paper's Table 1 Transformer row, average included
    vals = [LRA_PAPER_TRANSFORMER[k] for k in ("ListOps", "Text", "Retrieval", "Image", "Pathfinder")]
    assert abs(sum(vals) / 5 - LRA_PAPER_TRANSFORMER["Avg"]) < 0.01  # the average leaves Path-X out
