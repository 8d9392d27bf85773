"""Zoology's protocol in ``effattn compare``'s recall section: learning-rate sweep, seeds, spread, early stop."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random

import pytest
import torch

from effattn.bench import compare
from effattn.bench.compare import aggregate_runs, make_config, run_recall_sweep, seeds, train_kwargs
from effattn.bench.train import EarlyStop, train_mqar

# known accuracies of a fake trainer: (mixer, dim) -> {seed index: {lr: (acc@2, acc@4)}}
KNOWN = {
    ("a", 16): {
        0: {1e-3: (0.50, 0.25), 1e-2: (1.00, 0.98)},
        1: {1e-3: (0.96, 0.90), 1e-2: (0.52, 0.26)},
        2: {1e-3: (0.99, 0.94), 1e-2: (0.99, 0.95)},
    },
    ("b", 16): {s: {1e-3: (0.51, 0.26), 1e-2: (0.49, 0.27)} for s in range(3)},
}


def fake_trainer(mixer: str, dim: int, **kw) -> dict:
    k = (kw["seed"] - 7) // 100  # the sweep's seeds are seed + 100 k (seed 7 below)
    acc2, acc4 = KNOWN[(mixer, dim)][k][kw["lr"]]
    return {
        "accuracy": (acc2 + acc4) / 2,
        "accuracy_by_pairs": {2: acc2, 4: acc4},
        "state_bytes": 100 * dim,
        "params": 10,
        "final_loss": 0.0,
        "train_s": 0.01,
        "steps": kw["steps"],
        "steps_run": kw["steps"],
    }


def _cfg(tmp_path, **kw):
    base = dict(
        out=str(tmp_path / "sweep"),
        only=("recall",),
        mixers=("a", "b"),
        mqar_widths=(16,),
        mqar_head_dims=(16,),
        mqar_kv_pairs=(2, 4),
        mqar_lrs=(1e-3, 1e-2),
        mqar_seeds=3,
        seed=7,
    )
    return make_config("tiny", **{**base, **kw})


def test_sweep_keeps_the_best_lr_per_seed_then_median_and_spread(tmp_path):
    rows, runs = run_recall_sweep(_cfg(tmp_path), trainer=fake_trainer)
    assert len(runs) == 2 * 2 * 3 and {r["seed"] for r in runs} == {7, 107, 207}
    a = next(r for r in rows if r["mixer"] == "a")
    # winners per seed: lr 1e-2 (0.99), lr 1e-3 (0.93), lr 1e-2 (0.97; beats 0.965)
    assert a["acc@2"] == pytest.approx(0.99) and (a["acc@2_lo"], a["acc@2_hi"]) == (0.96, 1.00)
    assert a["acc@4"] == pytest.approx(0.95) and (a["acc@4_lo"], a["acc@4_hi"]) == (0.90, 0.98)
    assert a["accuracy"] == pytest.approx(0.97) and a["accuracy_lo"] == pytest.approx(0.93)
    assert a["best_lr"] == "0.01 (0.01, 0.001, 0.01)" and a["seeds"] == 3 and a["runs"] == 6
    assert a["verdict"] == "solved" and a["left_chance"] == "4/6"
    b = next(r for r in rows if r["mixer"] == "b")
    assert b["verdict"] == "optimisation-limited" and b["left_chance"] == "0/6"


def test_seeds_change_data_and_init_and_nothing_else(tmp_path):
    cfg = _cfg(tmp_path, mqar_lrs=(1e-3, 3e-3), mqar_seeds=3)
    calls = []

    def recording(mixer, dim, **kw):
        calls.append(kw)
        return fake_trainer(mixer, dim, **{**kw, "lr": 1e-3 if kw["lr"] == 1e-3 else 1e-2})

    run_recall_sweep(cfg, trainer=recording)
    assert seeds(cfg) == (7, 107, 207) and len(calls) == 2 * 2 * 3
    varying = {k for kw in calls for k in kw if any(kw[k] != other[k] for other in calls)}
    assert varying == {"lr", "seed"}
    # the trainer draws the data and the initialisation from the seed: the loss of the first step (the
    # initial model on the first batch, before any update) is the same whatever the learning rate, and
    # another seed gives another one
    kw = train_kwargs(
        make_config("tiny", mqar_kv_pairs=(2, 4), mqar_steps=1), compare.RecallRun("attention", 16, 8, 1e-3, 0)
    )
    one = train_mqar("attention", 16, **kw)
    same = train_mqar("attention", 16, **{**kw, "lr": 3e-3})
    other = train_mqar("attention", 16, **{**kw, "seed": 100})
    assert one["final_loss"] == same["final_loss"] and one["final_loss"] != other["final_loss"]


def test_early_stop_never_stops_below_the_threshold():
    rng = random.Random(0)
    for _ in range(200):
        stop = EarlyStop(0.99, window=5)
        for step in range(60):
            total = rng.randint(1, 50)
            hits = total if rng.random() < 0.8 else rng.randint(0, total)
            if stop.update(hits, total):
                last = stop.history[-5:]
                assert step >= 4 and sum(h for h, _ in last) >= 0.99 * sum(t for _, t in last)
                break
    stop = EarlyStop(0.99, window=3)
    assert [stop.update(*ht) for ht in ((10, 10), (10, 10), (9, 10), (10, 10), (10, 10), (10, 10))] == [
        False,
        False,
        False,
        False,
        False,
        True,
    ]
    with pytest.raises(ValueError, match="threshold"):
        EarlyStop(1.5)


def test_early_stop_ends_a_solved_training_and_keeps_an_unsolved_one():
    """The tiny MQAR that attention solves in ~300 steps stops early (and holds its accuracy); a run that
    cannot reach the threshold in its budget trains every step, exactly as without early stopping."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kw = dict(heads=2, vocab_size=32, seq_len=16, num_kv_pairs=4, num_train=4000, num_test=128, batch_size=32)
        kw.update(lr=1e-3, weight_decay=0.0, random_non_queries=False, seed=0)
        solved = train_mqar("attention", 64, steps=450, early_stop=0.99, **kw)
        assert solved["steps_run"] < 450 and solved["accuracy"] > 0.9, solved
        short = dict(kw, num_train=256, num_test=32)
        plain = train_mqar("attention", 32, steps=12, **short)
        stopped = train_mqar("attention", 32, steps=12, early_stop=0.99, early_stop_window=4, **short)
        assert stopped["steps_run"] == plain["steps_run"] == 12
        assert stopped["final_loss"] == plain["final_loss"] and stopped["accuracy"] == plain["accuracy"]
    finally:
        torch.set_num_threads(threads)


def test_verdicts_follow_the_rule():
    def run(mixer, state, seed, lr, a2, a8):
        return {"mixer": mixer, "dim": 64, "head_dim": state, "lr": lr, "seed": seed, "state_bytes": state} | {
            "acc@2": a2,
            "acc@8": a8,
        }

    runs = []
    for s in range(3):
        # m: at state 1 it learns 2 pairs but not 8 (falls with pairs), at state 4 it solves both
        runs += [run("m", 1, s, 1e-3, 0.95, 0.40), run("m", 1, s, 1e-2, 0.5, 0.125), run("m", 4, s, 1e-3, 1.0, 0.97)]
        # n: at chance at every lr and seed
        runs += [run("n", 4, s, lr, 0.52, 0.15) for lr in (1e-3, 1e-2)]
    # u: one seed solves, two stay at chance
    runs += [run("u", 4, s, 1e-3, *((1.0, 0.99) if s == 0 else (0.5, 0.13))) for s in range(3)]
    # w: partly learned, no larger state of w
    runs += [run("w", 4, s, 1e-3, 0.9, 0.3) for s in range(3)]
    # f: above chance by the same amount at 2 and 8 pairs (does not fall), a larger state of f solves
    runs += [run("f", 1, s, 1e-3, 0.75, 0.70) for s in range(3)] + [run("f", 4, s, 1e-3, 1.0, 1.0) for s in range(3)]
    verdict = {(r["mixer"], r["state_bytes"]): r["verdict"] for r in aggregate_runs(runs)}
    assert verdict == {
        ("m", 1): "state-limited",
        ("m", 4): "solved",
        ("n", 4): "optimisation-limited",
        ("u", 4): "unsettled (seeds disagree)",
        ("w", 4): "unsettled (no larger state solves)",
        ("f", 1): "unsettled (does not fall with the pairs)",
        ("f", 4): "solved",
    }


def test_report_spread_and_chance_come_from_the_stored_runs(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = _cfg(tmp_path)
    _, runs = run_recall_sweep(cfg, trainer=fake_trainer)
    results = {
        "meta": {"command": "test", "machine": {"torch": torch.__version__}, "config": {}},
        "speed": [],
        "recall": [{"mixer": "stale", "dim": 1, "accuracy": 0.0}],  # the table is rebuilt from the runs
        "recall_runs": runs,
        "listops": [],
        "advice": [],
        "notes": [],
    }
    compare.write_report(cfg, results)
    md = (tmp_path / "sweep" / "report.md").read_text()
    cells = md[md.index("## Recall") : md.index("### Every run")]
    rows = {line.split("|")[1].strip(): line for line in cells.splitlines() if line.startswith("| ")}
    assert "stale" not in rows
    chance = [c.strip() for c in rows["(chance: 1/n)"].split("|")[6:9]]
    assert chance == ["0.5", "0.25", "0.375"]
    a = [c.strip() for c in rows["a"].split("|")[6:9]]
    assert a == ["0.99 (0.96-1.00)", "0.95 (0.90-0.98)", "0.97 (0.93-0.99)"]
    assert "0.01 (0.01, 0.001, 0.01)" in rows["a"] and "optimisation-limited" in rows["b"]
    assert "### Every run" in md and md.count("| a | 16 | 16 |") == 1 + 6  # the cell and its runs
    data = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert len(data["recall_runs"]) == 12 and {r["lr"] for r in data["recall_runs"]} == {1e-3, 1e-2}
    assert (tmp_path / "sweep" / "recall_vs_state.png").stat().st_size > 0


def test_worker_processes_give_the_runs_of_one_process(tmp_path):
    """--jobs 2 spreads the trainings over two spawned one-thread workers; each run is the run of one process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = make_config(
            "tiny",
            out=str(tmp_path / "jobs"),
            only=("recall",),
            mixers=("attention",),
            mqar_widths=(16,),
            mqar_kv_pairs=(2, 4),
            mqar_steps=2,
            mqar_lrs=(1e-3, 1e-2),
            mqar_seeds=2,
        )
        _, serial = run_recall_sweep(cfg)
        _, spread = run_recall_sweep(dataclasses.replace(cfg, mqar_jobs=2))
    finally:
        torch.set_num_threads(threads)
    keys = ("lr", "seed", "acc@2", "acc@4", "final_loss", "steps_run")
    assert [tuple(r[k] for k in keys) for r in serial] == [tuple(r[k] for k in keys) for r in spread]


def test_sweep_flags_and_presets():
    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    cfg = compare.config_from_args(
        p.parse_args(["--lrs", "1e-3,3e-3", "--seeds", "4", "--jobs", "3", "--early-stop", "0", "--steps", "2000"])
    )
    assert cfg.mqar_lrs == (1e-3, 3e-3) and cfg.mqar_seeds == 4 and cfg.mqar_jobs == 3
    assert cfg.mqar_early_stop is None and cfg.mqar_steps == 2000
    assert compare.config_from_args(p.parse_args([])).mqar_steps == make_config("quick").mqar_steps
    bad_args = (["--lrs", "1e-3,x"], ["--lrs", "0"], ["--lrs", "1e-3,1e-3"], ["--seeds", "0"], ["--early-stop", "2"])
    for bad in bad_args + (["--steps", "0"],):
        with pytest.raises(SystemExit):
            compare.config_from_args(p.parse_args(bad))
    quick = make_config("quick")
    assert compare.learning_rates(quick) == (quick.mqar_lr,) and quick.mqar_seeds == 1  # make demo's budget
    for name in ("recall", "state"):
        c = make_config(name)
        assert len(c.mqar_lrs) >= 3 and c.mqar_seeds >= 3 and c.mqar_early_stop == 0.99
        assert min(c.mqar_lrs) >= 1e-4 and max(c.mqar_lrs) <= 1e-2
    full = make_config("full")
    assert (min(full.mqar_widths), max(full.mqar_widths), full.mqar_seq_len) == (64, 512, 512)
    assert max(full.mqar_kv_pairs) == 64 and full.mqar_lrs[0] == 1e-4 and full.mqar_lrs[-1] == 1e-2


def test_cached_mqar_data_is_make_mqar_and_a_warm_cache_changes_no_training():
    """The sweep's runs of one seed share generated data; it is make_mqar's, and a training that finds it in the
    cache (after a training that read it) equals one that generated it."""
    from effattn.bench.tasks.mqar import make_mqar
    from effattn.bench.train import cached_mqar

    x, y = cached_mqar(40, 32, 4, 34, True, 5)
    ref = make_mqar(40, input_seq_len=32, num_kv_pairs=4, vocab_size=34, random_non_queries=True, seed=5)
    assert torch.equal(x, ref[0]) and torch.equal(y, ref[1])
    kw = dict(heads=2, vocab_size=34, seq_len=32, num_kv_pairs=(2, 4), num_train=96, num_test=16, steps=6)
    kw.update(batch_size=16, lr=1e-3, seed=3)
    cached_mqar.cache_clear()
    cold = train_mqar("attention", 16, **kw)
    warm = train_mqar("attention", 16, **kw)
    assert cached_mqar.cache_info().hits >= 4
    assert cold["final_loss"] == warm["final_loss"] and cold["accuracy_by_pairs"] == warm["accuracy_by_pairs"]


def test_cells_restrict_the_grid_and_state_claims_sweeps_them(tmp_path):
    cfg = _cfg(tmp_path, mixers=("a", "b"), mqar_widths=(16,), mqar_head_dims=(4, 16), mqar_cells=(("a", 16), ("b", 4)))
    runs = compare.sweep_runs(cfg, cfg.mixers)
    assert [(r.mixer, r.head_dim) for r in runs[:: 2 * 3]] == [("a", 16), ("b", 4)]
    assert len(runs) == 2 * 2 * 3 and {(r.lr, r.seed) for r in runs if r.mixer == "b"} == {
        (lr, s) for lr in (1e-3, 1e-2) for s in (7, 107, 207)
    }
    with pytest.raises(ValueError, match="mqar_cells"):
        compare.sweep_runs(dataclasses.replace(cfg, mqar_cells=(("c", 16),)), cfg.mixers)
    claims = make_config("state-claims")
    cells = {(r.mixer, r.head_dim) for r in compare.sweep_runs(claims, claims.mixers)}
    assert cells == set(claims.mqar_cells) and len(cells) == 4
    assert len(claims.mqar_lrs) >= 3 and claims.mqar_seeds >= 3 and claims.mqar_early_stop == 0.99
