"""bench moe --quick: the dispatch and expert-parallel parts run and write their reports."""

import argparse
import json

import pytest

from effattn.bench import moe as moe_bench


def _args(tmp_path, parts, **kw):
    p = argparse.ArgumentParser()
    moe_bench.add_arguments(p)
    args = p.parse_args(["--quick", "--repeats", "1", "--parts", parts, "--out", str(tmp_path), *kw.get("extra", [])])
    return args


def test_dispatch_and_ep_quick(tmp_path):
    moe_bench.run(_args(tmp_path, "dispatch,ep", extra=["--ep-ranks", "1,2"]))
    rows = json.loads((tmp_path / "moe_dispatch.json").read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert methods == {"dense", "dropless", "dropless_loop", "capacity", "reference"}
    assert all(r.get("tokens_per_s", 0) > 0 for r in rows), rows
    assert (tmp_path / "moe_dispatch.png").exists() and (tmp_path / "moe_dispatch.md").exists()
    ep = json.loads((tmp_path / "moe_ep.json").read_text())["rows"]
    assert [(r["ranks"], r["ep_chunks"]) for r in ep] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    assert all("error" not in r for r in ep), ep
    assert ep[0]["MiB_sent_per_rank"] == 0 and ep[2]["MiB_sent_per_rank"] > 0


def test_reference_skipped_above_limit(tmp_path):
    args = _args(tmp_path, "dispatch", extra=["--tokens", "64", "--reference-max", "32"])
    rows = moe_bench.dispatch_rows(args)
    ref = [r for r in rows if r["method"] == "reference"]
    assert ref and all("skipped" in r["note"] for r in ref)


def test_unknown_part(tmp_path):
    with pytest.raises(SystemExit, match="unknown --parts"):
        moe_bench.run(_args(tmp_path, "dispatch,nope"))


def test_train_quick(tmp_path):
    moe_bench.run(_args(tmp_path, "train", extra=["--train-steps", "2"]))
    rows = json.loads((tmp_path / "moe_train.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["dense", "moe_micro_lbl", "moe_global_lbl"]
    assert all("error" not in r and r["val_bits_per_byte"] > 0 for r in rows), rows
    assert rows[1]["active_params"] == rows[2]["active_params"] < rows[1]["params"]
    assert rows[1]["max_over_mean_load"] >= 1.0
