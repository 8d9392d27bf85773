"""``python -m effattn compare``: which attention should I use for my length and memory budget?

On the machine at hand, in one run:

1. **speed and memory** — for every registered mechanism (the exact backends ``sdpa``, ``tiled``,
   ``auto``, ``reference`` on causal attention and the tiled engine on sliding-window attention;
   every linear op's chunk form from :data:`effattn.linear.REGISTRY`; every sparse method in
   :data:`effattn.sparse.REGISTRY`) at each length (quick: 256, 512, 1024, 2048): forward and
   forward+backward time (median, min and max of the repeats), the speed-up over SDPA causal timed
   back to back call by call (paired: robust to the machine's drift), forward+backward peak memory,
   efficiency against the machine's own GEMM rate, and the time of one decode step with the state or
   KV cache it needs; rows whose timings spread by more than 1.5x (max/min) or whose forward is slower
   than their forward+backward are flagged, and the load average before and after is recorded (a
   warning is printed when it exceeds the CPU count); with ``--mixers``, also each named mixer layer of
   :mod:`effattn.nn` alone (family ``mixer``, :func:`effattn.bench.compare.speed.mixer_mechanisms`);
2. **recall** — MQAR (Zoology, Arora et al. 2023): a 2-layer :class:`effattn.nn.LM` per mixer and
   width is trained on generated data at every learning rate of ``--lrs`` and every one of ``--seeds``
   seeds (Zoology's protocol, :mod:`effattn.bench.compare.sweep`); accuracy at the query positions of a
   held-out set, best over learning rates, median and spread over seeds, against the model's state size
   (KV cache for attention, the recurrent state otherwise), with a verdict per cell;
3. **reasoning** — ListOps (Long Range Arena, Tay et al. 2021) at a CPU-sized length (the LRA
   length 500-2000 with ``--full``).

Presets: ``tiny`` (seconds; tests), ``quick`` (default, ``make demo``: about 6 minutes on 2 otherwise
idle CPU cores), ``recall`` (``--preset recall``: the recall section alone, Zoology's state-size trend at a CPU size:
attention and fixed-state mixers at three widths, trained on a mixture of pair counts and tested per
pair count, 3 learning rates x 3 seeds per cell: CPU-hours), ``state`` (the same task and sweep at width
64 with head dims 4-16: the state of GLA and DeltaNet spans 4x at one width), ``state-claims`` (4 cells of
``state`` that carried its single-seed claims, the same sweep at 800 steps: 36 trainings) and ``full`` (``--full``,
for a GPU; long: LRA length, 64k tokens, MQAR at Zoology's sizes and learning-rate grid).
A mechanism that fails is reported with its error in the tables and the run goes on. Output: tables
on the terminal (``rich`` where installed, plain text otherwise) and a report folder (default
``bench_out/compare``) with ``report.md``, ``results.json`` and PNG plots (speed-up over SDPA, time and
memory vs length, one panel per family; recall vs state size). ``--rerender RESULTS_JSON`` writes a stored
report again from its runs, without training (:mod:`effattn.bench.compare.rerender`).
"""

# the package: config (sizes, presets, options), speed, recall, listops (the three sections), report

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

import torch

from effattn.bench import harness
from effattn.bench.compare.config import (
    PRESETS,
    RECALL_MIXERS,
    RECALL_TASK,
    SECTIONS,
    CompareConfig,
    add_arguments,
    config_from_args,
    guard,
    heads_for,
    make_config,
    pair_counts,
)
from effattn.bench.compare.listops import DEFAULT_LISTOPS_MIXERS, run_listops
from effattn.bench.compare.lra import append_lra_section, run_lra
from effattn.bench.compare.recall import mixer_names, run_recall, run_recall_sweep
from effattn.bench.compare.report import (
    LISTOPS_COLUMNS,
    RECALL_COLUMNS,
    advice,
    recall_columns,
    recall_trend,
    terminal_columns,
    write_plots,
    write_report,
)
from effattn.bench.compare.rerender import config_from_results, rerender_report
from effattn.bench.compare.speed import (
    EXTERNAL_LABELS,
    SpeedMechanism,
    external_baselines,
    external_row,
    run_speed,
    speed_mechanisms,
)
from effattn.bench.compare.speed_report import (
    SPEED_COLUMNS,
    SPEED_TERMINAL_COLUMNS,
    SPEED_TERMINAL_TITLE,
    speed_terminal_rows,
)
from effattn.bench.compare.sweep import (
    LEFT_CHANCE_FRACTION,
    RecallRun,
    aggregate_runs,
    chance_row,
    classify,
    learning_rates,
    left_chance,
    left_chance_threshold,
    seeds,
    sweep_runs,
    train_kwargs,
)
from effattn.bench.table import print_table

__all__ = [
    "DEFAULT_LISTOPS_MIXERS",
    "EXTERNAL_LABELS",
    "LEFT_CHANCE_FRACTION",
    "LISTOPS_COLUMNS",
    "PRESETS",
    "RECALL_COLUMNS",
    "RECALL_MIXERS",
    "RECALL_TASK",
    "RecallRun",
    "SECTIONS",
    "SPEED_COLUMNS",
    "SPEED_TERMINAL_COLUMNS",
    "CompareConfig",
    "SpeedMechanism",
    "add_arguments",
    "advice",
    "aggregate_runs",
    "chance_row",
    "classify",
    "config_from_args",
    "config_from_results",
    "external_baselines",
    "external_row",
    "guard",
    "heads_for",
    "learning_rates",
    "left_chance",
    "left_chance_threshold",
    "main",
    "make_config",
    "mixer_names",
    "pair_counts",
    "print_table",
    "recall_columns",
    "recall_trend",
    "rerender_report",
    "run_compare",
    "run_listops",
    "run_lra",
    "run_recall",
    "run_recall_sweep",
    "run_speed",
    "seeds",
    "speed_mechanisms",
    "speed_terminal_rows",
    "sweep_runs",
    "terminal_columns",
    "train_kwargs",
    "write_plots",
    "write_report",
]


def run_compare(cfg: CompareConfig) -> dict:
    """Run the selected sections, print the tables, write the report folder; returns the results."""
    unknown = set(cfg.only) - set(SECTIONS)
    if unknown:
        raise ValueError(f"only: unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    results: dict = {
        "meta": {
            "command": harness.command_line(),
            "machine": harness.machine_info(cfg.device),
            "config": {k: v for k, v in asdict(cfg).items() if k != "extra_mechanisms"},
        },
        "speed": [],
        "recall": [],
        "recall_runs": [],
        "listops": [],
        "notes": [],
    }
    if "speed" in cfg.only:
        rows, extra, notes = run_speed(cfg)
        results["speed"], results["notes"] = rows, results["notes"] + notes
        results["meta"].update(extra)
        print_table(SPEED_TERMINAL_TITLE, speed_terminal_rows(rows), SPEED_TERMINAL_COLUMNS)
    if "recall" in cfg.only:

        def partial_report(rows: list[dict], runs: list[dict]) -> None:
            # a long recall run leaves a readable report after every training, not only at its end
            done = {
                **results,
                "recall": rows,
                "recall_runs": runs,
                "advice": advice(results["speed"], rows, pair_counts(cfg)),
                "meta": {**results["meta"], "wall_s": time.perf_counter() - t0},
                "notes": results["notes"] + [f"partial report: {len(runs)} of {n_runs} trainings done"],
            }
            write_report(cfg, done)

        n_runs = len(sweep_runs(cfg, mixer_names(cfg)))
        results["recall"], results["recall_runs"] = run_recall_sweep(cfg, partial_report if n_runs > 1 else None)
        # the terminal keeps the accuracies and the verdict (params, loss and times are in the report)
        shown = [c for c in recall_columns(cfg) if c not in ("params", "final_loss", "train_s", "steps_run")]
        print_table("recall: MQAR accuracy vs state size", results["recall"], terminal_columns(shown))
    if "listops" in cfg.only:
        results["listops"] = run_listops(cfg)
        print_table("reasoning: ListOps", results["listops"], terminal_columns(LISTOPS_COLUMNS))
    if "lra" in cfg.only:  # its own report page, lra.md (bench.compare.lra)
        results["lra"] = run_lra(cfg)
        print_table("Long Range Arena", results["lra"], ["task", "tokens", "mixer", "accuracy", "paper_transformer"])
    results["advice"] = advice(results["speed"], results["recall"], pair_counts(cfg))
    results["meta"]["wall_s"] = time.perf_counter() - t0
    path = write_report(cfg, results)
    if "lra" in cfg.only:
        append_lra_section(path, cfg)
    for a in results["advice"]:
        print(a)
    print(f"report: {path}", flush=True)
    return results


def main(args: argparse.Namespace) -> None:
    """``effattn compare`` with the parsed options of :func:`add_arguments`."""
    if getattr(args, "rerender", None):  # no training: the report again from a stored results.json
        print(f"report: {rerender_report(args.rerender, args.out)}", flush=True)
        return
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    run_compare(config_from_args(args))
