"""``effattn bench sparse`` end to end at one tiny length (rows and columns; not speed)."""

from __future__ import annotations

import json

import effattn.bench.sparse as suite
import effattn.sparse as sparse
from effattn.__main__ import main
from effattn.bench.harness import matmul_flops_per_second


def test_sparse_suite_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "matmul_flops_per_second", lambda device: matmul_flops_per_second(device, sizes=(256,)))
    out = tmp_path / "sparse"
    main(["bench", "sparse", "--lengths", "256", "--repeats", "1", "--paired", "--out", str(out)])
    rows = json.loads((out / "sparse.json").read_text())["rows"]
    for r in rows:
        assert "error" not in r, r
    by = {(r["method"], r["causal"]): r for r in rows}
    assert by["sdpa", True]["visible_per_query"] == 128.5 and by["sdpa", False]["visible_per_query"] == 256
    for name, m in sparse.REGISTRY.items():
        for causal in m.causal_modes:
            r = by[name, causal]
            assert r["fwdbwd_s"] > 0 and r["speedup_vs_causal"] > 0 and r["fwdbwd_eff"] > 0
            assert r["speedup_vs_causal_paired"] > 0
            assert 0 < r["visible_per_query"] <= r["scores_per_query"]
            if "density" in r:  # the dense selection, materialized: the same pairs the engine counted
                assert abs(r["density"] * 256 - r["visible_per_query"]) < 1e-6 * 256
    assert "scores_per_query" in (out / "sparse.md").read_text()


def test_paired_ratio_is_the_median_of_back_to_back_ratios(monkeypatch):
    from effattn.bench import harness

    calls = []
    # clock readings around each timed call: a takes 2, 2, 3 and b takes 1 in the three pairs
    readings = iter([0, 2, 2, 3, 10, 12, 12, 13, 20, 23, 23, 24])
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(readings))
    ratio = harness.paired_ratio(lambda: calls.append("a"), lambda: calls.append("b"), repeats=3)
    assert calls == ["a", "b"] * 4  # one warm-up of each, then alternating pairs
    assert ratio == 2.0
