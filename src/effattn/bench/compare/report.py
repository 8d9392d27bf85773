"""The report of ``effattn compare``: tables, the short answer read off the measurements, and PNG plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from effattn.bench import harness
from effattn.bench.compare.config import CompareConfig, pair_counts
from effattn.bench.compare.plot_style import draw_dodged, series_style
from effattn.bench.compare.speed_report import speed_advice, speed_plots, speed_section
from effattn.bench.compare.sweep import (
    FALLS_BY,
    LEFT_CHANCE_FRACTION,
    SOLVED,
    aggregate_runs,
    chance_row,
    learning_rates,
    left_chance_threshold,
    seeds,
)
from effattn.bench.table import Column

RECALL_COLUMNS = ("mixer", "dim", "head_dim", "state_bytes", "params", "accuracy", "train_s", "final_loss", "error")


# after the accuracies: the sweep's columns (learning rate that won, seeds, how many runs left chance, verdict)
SWEEP_COLUMNS = ("best_lr", "seeds", "steps_run", "left_chance", "verdict")


def label_narrow_state_axis(ax, xs: Sequence[float], most: int = 6) -> list[float]:
    """Tick a log state axis at the data's own sizes where fewer than two powers of ten fall inside their
    range (the axis would show one label or none with the minor labels off): up to ``most`` of the distinct
    sizes, labelled in KB. Returns the ticks set (none where the range holds two powers of ten or more).

    Example::

        >>> import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
        >>> ax = plt.subplots()[1]; ax.set_xscale("log")
        >>> label_narrow_state_axis(ax, [10768, 12816, 16912]), label_narrow_state_axis(ax, [29200, 102928])
        ([10768, 12816, 16912], [29200, 102928])
        >>> label_narrow_state_axis(ax, [8000, 120000])   # 10^4 and 10^5 inside: the log ticks say enough
        []
    """
    xs = sorted({x for x in xs if x and x > 0})
    if not xs or math.floor(math.log10(xs[-1])) - math.ceil(math.log10(xs[0])) + 1 >= 2:
        return []
    ticks = [xs[round(i * (len(xs) - 1) / (most - 1))] for i in range(most)] if len(xs) > most else xs
    ticks = sorted(set(ticks))
    ax.set_xticks(ticks, [f"{t / 1e3:.1f} KB" for t in ticks])
    return ticks


def recall_columns(cfg: CompareConfig) -> tuple[str, ...]:
    """The recall table's columns: one accuracy per pair count where the run has several, then the sweep's
    columns (:data:`SWEEP_COLUMNS`)."""
    pairs = pair_counts(cfg)
    accs = ("accuracy",) if len(pairs) == 1 else tuple(f"acc@{p}" for p in pairs) + ("accuracy",)
    return RECALL_COLUMNS[:5] + accs + SWEEP_COLUMNS + RECALL_COLUMNS[6:]


def with_spread(rows: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """Rows whose ``keys`` read ``median (min-max)`` where a row holds ``<key>_lo`` / ``<key>_hi`` that differ
    (the spread over seeds), the median alone otherwise.

    Example::

        >>> with_spread([{"acc@2": 0.95, "acc@2_lo": 0.9, "acc@2_hi": 1.0}, {"acc@2": 0.5}], ["acc@2"])
        [{'acc@2': '0.95 (0.90-1.00)', 'acc@2_lo': 0.9, 'acc@2_hi': 1.0}, {'acc@2': '0.50'}]
    """
    out = []
    for r in rows:
        r = dict(r)
        for k in keys:
            if r.get(k) is None:
                continue
            lo, hi = r.get(f"{k}_lo"), r.get(f"{k}_hi")
            spread = f" ({lo:.2f}-{hi:.2f})" if lo is not None and hi is not None and hi - lo > 5e-4 else ""
            r[k] = f"{r[k]:.2f}{spread}"
        out.append(r)
    return out


def _shape(r: dict) -> str:
    """``dim=64 head_dim=8`` (reports made before head dims were swept have no ``head_dim``)."""
    return f"dim={r['dim']}" + (f" head_dim={r['head_dim']}" if r.get("head_dim") else "")


def recall_trend(recall: list[dict], pairs: Sequence[int], threshold: float = 0.9) -> list[str]:
    """Per pair count, which mixers reach ``threshold`` accuracy and at which smallest width and
    state: the reading of Zoology's finding off the measurements."""
    lines = []
    mixers = sorted({r["mixer"] for r in recall if r.get("accuracy") is not None})
    for p in pairs:
        key = f"acc@{p}" if len(pairs) > 1 else "accuracy"
        parts = []
        for m in mixers:
            ok = [r for r in recall if r["mixer"] == m and r.get(key) is not None and r[key] >= threshold]
            if ok:
                r = min(ok, key=lambda r: (r["state_bytes"], r["dim"]))
                parts.append(f"{m} from {_shape(r)} ({r['state_bytes']} B)")
            else:
                best = max((r[key] for r in recall if r["mixer"] == m and r.get(key) is not None), default=None)
                parts.append(f"{m} never (best {best:.2f})" if best is not None else f"{m} never")
        lines.append(f"MQAR {p} pairs, accuracy >= {threshold}: " + "; ".join(parts))
    return lines


LISTOPS_COLUMNS = ("mixer", "dim", "params", "accuracy", "majority", "train_s", "final_loss", "error")

# the terminal summaries of recall and ListOps (the report holds every column; the speed table's are in
# speed_report): short headers, long text cut to fit 80-100 columns
_SHORT = {
    "head_dim": "hd",
    "state_bytes": "state B",
    "accuracy": "acc",
    "train_s": "train s",
    "final_loss": "loss",
    "steps_run": "steps",
    "left_chance": "left",
}


def terminal_columns(columns: Sequence[str]) -> tuple[Column, ...]:
    """The terminal form of a recall or ListOps table's columns: short headers, the text columns cut to fit."""
    text = {"mixer": 12, "error": 8, "verdict": 10, "best_lr": 6}  # text columns and their minimum widths
    keys = ("mixer", "dim", "head_dim")  # what names a row
    return tuple(
        Column(c, text=True, min_width=text[c], key_column=c in keys)
        if c in text
        else Column(c, _SHORT.get(c, c), key_column=c in keys)
        for c in columns
    )


def advice(speed: list[dict], recall: list[dict], pairs: Sequence[int] = ()) -> list[str]:
    """Short answers read off the measurements: per length the fastest and the leanest mechanism,
    the smallest state that reached the best recall and, with several MQAR pair counts
    (``pairs``), per pair count which mixers reach 0.9 and from which width."""
    lines = speed_advice(speed)
    good = [r for r in recall if r.get("accuracy") is not None]
    if good:
        best = max(r["accuracy"] for r in good)
        near = [r for r in good if r["accuracy"] >= best - 0.05 and r.get("state_bytes") is not None]
        if best < 0.5:
            lines.append(f"MQAR: best accuracy {best:.3f}: no mixer learned the task at this budget (train longer)")
        elif near:
            r = min(near, key=lambda r: r["state_bytes"])
            lines.append(
                f"MQAR: best accuracy {best:.3f}; the smallest state within 0.05 of it is {r['mixer']} "
                f"{_shape(r)} ({r['state_bytes']} B, accuracy {r['accuracy']:.3f})"
            )
    if len(pairs) > 1 and good:
        lines += recall_trend(recall, pairs)
    return lines


def _plot_label(machine: dict) -> str:
    """The machine line under every plot's title."""
    hw = machine.get("gpu") or machine.get("cpu_model") or machine.get("processor", "")
    return (
        f"{hw} | torch {machine.get('torch')} | python {machine.get('python')} | {machine.get('torch_threads')} threads"
    )


def write_plots(
    out: Path, speed: list[dict], recall: list[dict], machine: dict, pairs: Sequence[int] = ()
) -> tuple[list[str], list[str]]:
    """PNG plots (matplotlib, Agg); returns (files written, notes)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ["matplotlib is not installed (pip install 'effattn[bench]'): no plots"]
    label = _plot_label(machine)
    files = speed_plots(out, speed, label)  # the speed figures: one panel per family (speed_report)
    if not recall:  # the recall section did not run (--only): no empty recall figure
        return files, []

    pts = [r for r in recall if r.get("accuracy") is not None and r.get("state_bytes")]
    # one panel per pair count where the run has several (Zoology's figure), else one panel
    panels = [(f"acc@{p}", f"{p} key-value pairs") for p in pairs] if len(pairs) > 1 else [("accuracy", "")]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8, 4.6 * len(panels)), 5.5), sharey=True, squeeze=False)
    names = sorted({r["mixer"] for r in pts})
    # points are labelled with what the run varies: the width, the head dim, or both ("64/8")
    vary_dim, vary_hd = len({r["dim"] for r in pts}) > 1, len({r.get("head_dim") for r in pts}) > 1

    def point_label(r: dict) -> str:
        return "/".join([str(r["dim"])] * vary_dim + [str(r.get("head_dim"))] * vary_hd)

    dodged: dict = {}  # axes -> markers, drawn once the layout is final (overlapping ones spread apart)
    for ax, (key, sub) in zip(axes[0], panels):
        for i, name in enumerate(names):
            style = series_style(i)
            rs = sorted(
                (r for r in pts if r["mixer"] == name and r.get(key) is not None), key=lambda r: r["state_bytes"]
            )
            ys = [r[key] for r in rs]
            # error bars: min and max over seeds of the best-over-lr accuracy (none for a one-seed run)
            err = [
                [y - r.get(f"{key}_lo", y) for r, y in zip(rs, ys)],
                [r.get(f"{key}_hi", y) - y for r, y in zip(rs, ys)],
            ]
            ax.errorbar(
                [r["state_bytes"] for r in rs],
                ys,
                yerr=err if any(e > 0 for side in err for e in side) else None,
                color=style["color"],
                linestyle=style["linestyle"],
                linewidth=1.0,
                capsize=3,
            )
            ax.plot([], [], color=style["color"], marker=style["marker"], linestyle=style["linestyle"], label=name)
            varied = len(panels) > 1 and (vary_dim or vary_hd)
            for r in rs:
                dodged.setdefault(ax, []).append(
                    {"x": r["state_bytes"], "y": r[key], "color": style["color"], "marker": style["marker"]}
                    | {"label": f"{name} {point_label(r)}" if varied else name}
                )
                if varied:
                    xy = (r["state_bytes"], r[key])
                    ax.annotate(point_label(r), xy, fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        # a state range under a decade gets labelled minor ticks that run into each other: label majors only
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        label_narrow_state_axis(ax, [d["x"] for d in dodged.get(ax, [])])
        ax.set_xlabel("state size (bytes, batch 1, at the MQAR length)")
        ax.set_ylim(-0.02, 1.02)
        if sub:
            ax.set_title(sub, fontsize=9)
        if len(panels) > 1:
            ax.axhline(0.9, color="gray", linewidth=0.6, linestyle=":")
        n = int(key[4:]) if key.startswith("acc@") else (pairs[0] if len(pairs) == 1 else None)
        if n:
            ax.axhline(
                1.0 / n, color="firebrick", linewidth=0.8, linestyle="--", label="chance (1/n)" * (ax is axes[0][-1])
            )
            bar = left_chance_threshold(n)
            ax.axhline(bar, color="firebrick", linewidth=0.6, linestyle=":", alpha=0.8)
            ax.text(
                0.01,
                bar + 0.01,
                f"left chance >= {bar:.3g}",
                transform=ax.get_yaxis_transform(),
                ha="left",
                va="bottom",
                fontsize=7,
                color="firebrick",
            )
            ax.text(
                0.01,
                1.0 / n - 0.01,
                f"chance 1/{n} = {1.0 / n:.2f}",
                transform=ax.get_yaxis_transform(),
                ha="left",
                va="top",
                fontsize=7,
                color="firebrick",
            )
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy at query positions")
    what = " / ".join(["model width"] * vary_dim + ["head dim"] * vary_hd)
    what = f"; points labelled with the {what}" if len(panels) > 1 and what else ""
    spread = (
        "\nmedian over seeds of the best run over learning rates; bars: min and max over seeds"
        if any("accuracy_lo" in r and (r.get("seeds") or 2) > 1 for r in pts)  # one seed: no spread to show
        else ""
    )
    if pts:
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        axes[0][0].text(0.5, 0.5, "no successful MQAR run", ha="center", transform=axes[0][0].transAxes)
    fig.suptitle(f"effattn compare: recall vs state size{what}{spread}\n{label}", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    if sum(draw_dodged(ax, markers) for ax, markers in dodged.items()):
        note = "markers that would overlap are spread sideways and labelled; lines and bars sit at the exact values"
        fig.text(0.01, 0.005, note, fontsize=7, color="0.3")
    fig.savefig(out / "recall_vs_state.png", dpi=110)
    plt.close(fig)
    files.append("recall_vs_state.png")
    return files, []


def recall_section(cfg: CompareConfig, rows: list[dict], runs: list[dict], plots: Sequence[str] = ()) -> list[str]:
    """The report's recall section: the task, the protocol, the chance row, one row per cell computed from the
    stored ``runs`` (``rows`` where a report has none) with the spread over seeds, and every run."""
    pairs = pair_counts(cfg)
    if runs:
        rows = aggregate_runs(runs, pairs)
    if len(pairs) == 1:
        task = f"{pairs[0]} key-value pairs"
        acc = f"accuracy on {cfg.mqar_test} held-out examples at the query positions"
    else:
        task = f"trained on an even mixture of {', '.join(map(str, pairs))} key-value pairs ({cfg.mqar_train} examples)"
        acc = (
            f"acc@n: accuracy at the query positions of {cfg.mqar_test} held-out examples with n pairs; "
            "accuracy: their mean"
        )
    lrs, sds = learning_rates(cfg), seeds(cfg)
    stop = (
        f"early stop once training accuracy held >= {cfg.mqar_early_stop:g} over 20 steps"
        if cfg.mqar_early_stop
        else "no early stop"
    )
    protocol = (
        f"learning rates {', '.join(f'{x:g}' for x in lrs)} x seeds {', '.join(map(str, sds))}; per seed the best "
        "run over the learning rates, then per cell the median over seeds with (min-max); best_lr: the rate that "
        "won most often (the winner per seed in brackets)"
        if len(lrs) * len(sds) > 1
        else f"lr {lrs[0]:g}, one seed ({sds[0]}), no learning-rate sweep"
    )
    accs = [f"acc@{p}" for p in pairs] + ["accuracy"]
    columns = recall_columns(cfg)
    table_rows = [chance_row(pairs)] + with_spread(rows, accs)
    md = [
        "## Recall: MQAR (Zoology)",
        "",
        f"2-layer LM per mixer, width and head dim (heads = width / head_dim, head_dim in "
        f"{', '.join(map(str, cfg.mqar_head_dims))}); T={cfg.mqar_seq_len}, {task}, "
        f"vocab {cfg.mqar_vocab}, random_non_queries={cfg.mqar_random_non_queries}, up to {cfg.mqar_steps} AdamW "
        f"steps of batch {cfg.mqar_batch} (weight decay {cfg.mqar_weight_decay:g}; {stop}); {protocol}; {acc}; "
        "state_bytes = LM.state_size(1, T).",
        "",
        f"Chance (first row) is 1/n at n pairs: a model that outputs one of the n values of its context without "
        f"binding it to its key. A run left chance where its accuracy at some pair count n reached 1/n + "
        f"{LEFT_CHANCE_FRACTION:g} x (1 - 1/n), {LEFT_CHANCE_FRACTION:g} of the way from chance to perfect ("
        + ", ".join(f"{left_chance_threshold(p):.3g} at {p}" for p in pairs)
        + " pairs; a run that binds nothing plateaus a little above 1/n, below this); left_chance: how many runs "
        f"of the cell did. Verdict: solved (median >= {SOLVED} at every pair count); optimisation-limited (no run, "
        "at any learning rate or seed, left chance); state-limited (the median left chance, falls with the pairs "
        f"by >= {FALLS_BY:g} from the fewest to the most, and a larger state of the same mixer is solved); "
        "unsettled otherwise (the reason in brackets).",
        "",
        harness.format_markdown_table(table_rows, columns),
        "",
        "![recall vs state size](recall_vs_state.png)" if "recall_vs_state.png" in plots else "",
        "",
    ]
    if runs and len(runs) > len(rows):
        run_columns = ("mixer", "dim", "head_dim", "lr", "seed") + tuple(accs) + ("steps_run", "train_s", "error")
        shown = [{**r, "accuracy": r.get("accuracy")} for r in runs]
        md += [
            "### Every run",
            "",
            harness.format_markdown_table(sorted(shown, key=_run_order), run_columns),
            "",
        ]
    return md


def _run_order(r: dict) -> tuple:
    return (r["mixer"], r["dim"], r.get("head_dim") or 0, r.get("lr") or 0.0, r.get("seed") or 0)


def write_report(cfg: CompareConfig, results: dict) -> Path:
    """``report.md``, ``results.json`` and the plots of ``results`` in ``cfg.out``; returns the report's path."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = results["meta"]["machine"]
    plots, plot_notes = write_plots(out, results["speed"], results["recall"], machine, pair_counts(cfg))
    results["plots"] = plots
    results["notes"] += plot_notes
    payload = {k: v for k, v in results.items()}
    for sec in ("speed", "recall", "recall_runs", "listops"):
        payload[sec] = [{k: v for k, v in r.items() if k != "traceback"} for r in results.get(sec) or []]
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    meta = results["meta"]
    md = [
        "# effattn compare: which attention for my length and memory budget?",
        "",
        f"Command: `{meta['command']}`  ",
    ]
    if meta.get("rerendered"):  # a report written again from its stored runs (bench.compare.rerender)
        again = meta["rerendered"]
        md.append(f"Re-rendered {again['at']} with `{again['command']}`: {again['what']}.  ")
    md += [
        f"Preset: {cfg.preset}; sections: {', '.join(cfg.only)}; wall time {meta.get('wall_s', 0):.0f} s  ",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()),
        "",
    ]
    if results["advice"]:
        md += ["## Short answer", ""] + [f"- {a}" for a in results["advice"]] + [""]
    if "speed" in cfg.only:
        md += speed_section(payload["speed"], meta, plots)
    if "recall" in cfg.only:
        md += recall_section(cfg, payload["recall"], payload.get("recall_runs") or [], plots)
    if "listops" in cfg.only:
        md += [
            "## Reasoning: ListOps (LRA)",
            "",
            f"Length {cfg.listops_min_len}-{cfg.listops_max_len}, depth <= {cfg.listops_depth}, "
            f"{cfg.listops_steps} steps of batch {cfg.listops_batch}; accuracy over 10 classes on "
            f"{cfg.listops_test} held-out examples (majority = the most frequent test label's share).",
            "",
            harness.format_markdown_table(payload["listops"], LISTOPS_COLUMNS),
            "",
        ]
    md += ["## Notes", ""] + [f"- {n}" for n in results["notes"]]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out / "report.md"
