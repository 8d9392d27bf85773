"""The recall verdicts of ``effattn compare``: a plateau is not learning, and stored reports re-render with the rule."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from effattn.bench import compare
from effattn.bench.compare import aggregate_runs, left_chance, left_chance_threshold, rerender_report


def test_left_chance_threshold_is_a_quarter_of_the_room_above_chance():
    assert [left_chance_threshold(n) for n in (2, 4, 8)] == [0.625, 0.4375, 0.34375]
    assert left_chance_threshold(8, fraction=0.5) == 0.5625 and left_chance_threshold(1) == 1.0
    for kw, name in (({"pairs": 0}, "pairs"), ({"pairs": 2.0}, "pairs"), ({"pairs": 4, "fraction": 0.0}, "fraction")):
        with pytest.raises(ValueError, match=name):
            left_chance_threshold(**kw)
    with pytest.raises(ValueError, match=r"fraction must be a number in \(0.0, 1.0\], got 1.5"):
        left_chance_threshold(4, fraction=1.5)


def test_plateau_runs_have_not_left_chance_and_a_run_halfway_up_has():
    pairs = (2, 4, 8)
    # the plateau of the committed sweeps: 0.49-0.57 / 0.25-0.37 / 0.20-0.27 (no binding learned)
    for a2, a4, a8 in ((0.50, 0.27, 0.20), (0.53, 0.30, 0.23), (0.572, 0.366, 0.267), (0.465, 0.29, 0.225)):
        assert not left_chance({"acc@2": a2, "acc@4": a4, "acc@8": a8}, pairs), (a2, a4, a8)
    # halfway from chance to perfect at one pair count is enough, at any of them
    half = {n: 1 / n + 0.5 * (1 - 1 / n) for n in pairs}
    for n in pairs:
        run = {"acc@2": 0.5, "acc@4": 0.25, "acc@8": 0.125, f"acc@{n}": half[n]}
        assert left_chance(run, pairs), run
    # the bar itself counts, just under it does not; a pair count the run lacks does not count
    assert left_chance({"acc@8": 0.34375}, (8,)) and not left_chance({"acc@8": 0.3437}, (8,))
    assert not left_chance({"acc@2": 0.9, "acc@8": 0.2}, (4, 8))


def _run(mixer: str, state: int, seed: int, lr: float, a2: float, a8: float) -> dict:
    return {"mixer": mixer, "dim": 64, "head_dim": state, "lr": lr, "seed": seed, "state_bytes": state} | {
        "acc@2": a2,
        "acc@8": a8,
    }


def fake_runs() -> list[dict]:
    """Cells with known verdicts, two learning rates x three seeds each (see the comments)."""
    runs = []
    for s in range(3):
        lrs = ((1e-3, 0), (1e-2, 1))
        # p: every run on the plateau (0.53 / 0.23: at 8 pairs above 1/8 + 0.1, the rule before), and a larger
        # state of p solves: the plateau must not make this cell state-limited
        runs += [_run("p", 1, s, lr, 0.53 - 0.01 * i, 0.23 - 0.01 * i) for lr, i in lrs]
        runs += [_run("p", 4, s, lr, 1.0, 0.98 - 0.02 * i) for lr, i in lrs]
        # m: learns 2 pairs (0.95) but not 8 at state 1, solves both at state 4: state-limited
        runs += [_run("m", 1, s, lr, (0.95, 0.5)[i], (0.40, 0.2)[i]) for lr, i in lrs]
        runs += [_run("m", 4, s, lr, 1.0, 0.97) for lr, _ in lrs]
        # u: seed 0 halfway up at 8 pairs (0.5625), the other seeds on the plateau: the seeds disagree
        runs += [_run("u", 4, s, lr, *((0.80, 0.5625) if s == 0 and i == 0 else (0.52, 0.22))) for lr, i in lrs]
        # g: falls by 0.15 from 2 to 8 pairs (the fall needed is 0.1 of accuracy), a larger state solves
        runs += [_run("g", 1, s, lr, 0.80, 0.65) for lr, _ in lrs] + [_run("g", 8, s, lr, 1.0, 0.95) for lr, _ in lrs]
        # f: above the bar by the same at 2 and 8 pairs (does not fall), a larger state of f solves
        runs += [_run("f", 1, s, lr, 0.75, 0.70) for lr, _ in lrs] + [_run("f", 4, s, lr, 1.0, 1.0) for lr, _ in lrs]
        # w: learned some, no larger state of w
        runs += [_run("w", 4, s, lr, 0.9, 0.3) for lr, _ in lrs]
        # c: one run left chance at 2 pairs only (0.70), but the winner of every seed (best mean) is a plateau run
        runs += [_run("c", 4, s, 1e-3, 0.70, 0.13), _run("c", 4, s, 1e-2, 0.60, 0.30)]
    return runs


def test_verdicts_of_a_fake_sweep_come_out_for_each_class():
    rows = {(r["mixer"], r["state_bytes"]): r for r in aggregate_runs(fake_runs())}
    assert {k: r["verdict"] for k, r in rows.items()} == {
        ("p", 1): "optimisation-limited",
        ("p", 4): "solved",
        ("m", 1): "state-limited",
        ("m", 4): "solved",
        ("u", 4): "unsettled (seeds disagree)",
        ("g", 1): "state-limited",
        ("g", 8): "solved",
        ("f", 1): "unsettled (does not fall with the pairs)",
        ("f", 4): "solved",
        ("w", 4): "unsettled (no larger state solves)",
        ("c", 4): "unsettled (median at chance)",
    }
    counts = {k: r["left_chance"] for k, r in rows.items()}
    assert counts[("p", 1)] == "0/6" and counts[("m", 1)] == "3/6" and counts[("u", 4)] == "1/6"
    assert counts[("c", 4)] == "3/6"


def _stored(tmp_path):
    """A results.json as `effattn compare` writes it, with a verdict of the rule before (stale)."""
    cfg = compare.make_config("tiny", only=("recall",), mqar_kv_pairs=(2, 8), mqar_lrs=(1e-3, 1e-2), mqar_seeds=3)
    runs = fake_runs()
    recall = [{**r, "verdict": "state-limited"} if r["mixer"] == "p" else r for r in aggregate_runs(runs)]
    meta = {"command": "python -m effattn compare --preset state", "machine": {"torch": torch.__version__}}
    meta |= {"config": {k: v for k, v in vars(cfg).items() if k != "extra_mechanisms"}, "wall_s": 12.0}
    results = {"meta": meta, "speed": [], "recall": recall, "recall_runs": runs, "listops": []}
    results |= {"advice": ["MQAR: stored advice"], "notes": ["stored note"]}
    src = tmp_path / "run"
    src.mkdir()
    (src / "results.json").write_text(json.dumps(results, indent=2))
    return src


def test_rerender_recomputes_the_verdicts_from_the_stored_runs_and_keeps_the_rest(tmp_path):
    pytest.importorskip("matplotlib")
    src = _stored(tmp_path)
    before = (src / "results.json").read_text()
    report = rerender_report(src / "results.json", tmp_path / "again")
    assert (src / "results.json").read_text() == before  # --out elsewhere leaves the run's folder as it was
    md = report.read_text()
    assert "Command: `python -m effattn compare --preset state`" in md and "wall time 12 s" in md
    assert "Re-rendered " in md and "no training was re-run" in md
    assert "- MQAR: stored advice" in md and "- stored note" in md
    # the legend states the rule with its bars at the run's pair counts
    assert "1/n + 0.25 x (1 - 1/n)" in md and "0.625 at 2, 0.344 at 8 pairs" in md
    cells = md[md.index("## Recall") : md.index("### Every run")]
    p_row = next(line for line in cells.splitlines() if line.startswith("| p | 64 | 1 |"))
    assert "optimisation-limited" in p_row and "0/6" in p_row
    data = json.loads((tmp_path / "again" / "results.json").read_text())
    assert next(r for r in data["recall"] if r["mixer"] == "p" and r["state_bytes"] == 1)["verdict"] == (
        "optimisation-limited"
    )
    assert data["recall_runs"] == json.loads(before)["recall_runs"] and data["meta"]["rerendered"]["at"]
    assert (tmp_path / "again" / "recall_vs_state.png").stat().st_size > 0


def test_rerender_from_the_command_line_writes_in_place(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    src = _stored(tmp_path)
    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    compare.main(p.parse_args(["--rerender", str(src / "results.json")]))
    assert f"report: {src / 'report.md'}" in capsys.readouterr().out
    assert "optimisation-limited" in (src / "report.md").read_text()
    assert compare.config_from_args(p.parse_args([])).out == "bench_out/compare"  # --out's default is unchanged
    with pytest.raises(ValueError, match="results_json: no such file"):
        rerender_report(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="meta.config"):
        compare.config_from_results({"meta": {}}, tmp_path)


def test_narrow_state_axis_is_labelled_at_the_data():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from effattn.bench.compare.report import label_narrow_state_axis

    fig, ax = plt.subplots()
    ax.set_xscale("log")
    assert label_narrow_state_axis(ax, [10768, 16912, 12816, 12816]) == [10768, 12816, 16912]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["10.8 KB", "12.8 KB", "16.9 KB"]
    many = [11000 + 1000 * i for i in range(20)]
    ticks = label_narrow_state_axis(ax, many)
    assert len(ticks) == 6 and ticks[0] == many[0] and ticks[-1] == many[-1]
    fig2, ax2 = plt.subplots()
    ax2.set_xscale("log")
    assert label_narrow_state_axis(ax2, [4000, 120000]) == []  # spans powers of ten: majors are labelled
    assert label_narrow_state_axis(ax2, [29200, 53776, 102928]) == [29200, 53776, 102928]  # one power inside
    plt.close(fig)
    plt.close(fig2)
