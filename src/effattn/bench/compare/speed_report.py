"""The speed part of the ``effattn compare`` report: tables, trust flags, load, short answers and plots.

What a reader needs to judge a timing is stored with it and shown beside it: the repeats, the spread
(min and max of the timed calls), the ratio to SDPA causal timed back to back (``x sdpa``, robust to the
machine's drift), flags on rows whose timings disagree with themselves (spread above
:data:`effattn.bench.harness.SPREAD_LIMIT`, or a forward slower than its forward+backward) and the
load average before and after the section. Every figure is read off the stored rows, so a report
rebuilt from ``results.json`` says the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from effattn.bench import harness
from effattn.bench.compare.plot_style import series_style
from effattn.bench.memory_speed import DIM, HEADS
from effattn.bench.table import Column

__all__ = [
    "MEMORY_KEY",
    "MIXER_FAMILY",
    "SPEED_COLUMNS",
    "SPEED_TERMINAL_COLUMNS",
    "SPEED_TERMINAL_TITLE",
    "flagged_rows",
    "load_lines",
    "speed_advice",
    "speed_plots",
    "speed_section",
    "speed_table_rows",
    "speed_terminal_rows",
]

# the one peak-memory figure of the report, table, plots and short answers: forward+backward (training)
MEMORY_KEY = "fwd_bwd_MiB"

# the family of the --mixers rows: one effattn.nn mixer layer alone (projections included, width 64), not the ops'
# size and not paired with SDPA, so the short answers rank them apart from the op rows
MIXER_FAMILY = "mixer"

# the report's table (every row and column; results.json holds every key, forward-only peaks included)
SPEED_COLUMNS = (
    "family",
    "mechanism",
    "T",
    "fwd ms",
    "f+b ms",
    "n",
    "x sdpa",
    "f+b MiB",
    "eff_%",
    "step_us",
    "state_bytes",
    "flags",
    "note",
    "error",
)

# the terminal summary: short headers; flags, note and error of a row in one text column
SPEED_TERMINAL_COLUMNS = (
    Column("family", text=True, min_width=6, key_column=True),
    Column("mechanism", text=True, min_width=15, key_column=True),
    Column("T", key_column=True),
    Column("fwd_ms", "fwd ms"),
    Column("fwd_bwd_ms", "f+b ms"),
    Column("fwd_bwd_speedup_paired", "x sdpa"),
    Column(MEMORY_KEY, "f+b MiB"),
    Column("eff_%", "eff%"),
    Column("step_us", "step us"),
    Column("state_bytes", "state KiB", scale=1 / 1024),
    Column("remark", text=True),
)


def memory_key(rows: Sequence[dict]) -> str:
    """``fwd_bwd_MiB``, or ``fwd_MiB`` for a forward-only run (no row has a forward+backward peak)."""
    return MEMORY_KEY if any(r.get(MEMORY_KEY) is not None for r in rows) else "fwd_MiB"


def time_key(rows: Sequence[dict]) -> str:
    """``fwd_bwd_ms``, or ``fwd_ms`` for a forward-only run."""
    return "fwd_bwd_ms" if any(r.get("fwd_bwd_ms") is not None for r in rows) else "fwd_ms"


def _row_flags(r: dict) -> list[str]:
    return harness.timing_flags(r)


def flagged_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows whose stored timings :func:`effattn.bench.harness.timing_flags` flags.

    Example::

        >>> rows = [{"mechanism": "a", "fwd_ms": 3.0, "fwd_bwd_ms": 2.0}, {"mechanism": "b", "fwd_ms": 1.0}]
        >>> [r["mechanism"] for r in flagged_rows(rows)]
        ['a']
    """
    return [r for r in rows if _row_flags(r)]


def _timing(r: dict, key: str) -> str | None:
    """``median (min-max)`` of a stored timing, three significant digits; the median alone without a spread."""
    if r.get(key) is None:
        return None
    med, lo, hi = r[key], r.get(f"{key}_min"), r.get(f"{key}_max")
    if lo is None or hi is None:
        return f"{med:.3g}"
    return f"{med:.3g} ({lo:.3g}-{hi:.3g})"


def speed_table_rows(rows: Sequence[dict]) -> list[dict]:
    """The report table's rows: timings as ``median (min-max)``, ``n`` = timed calls (fwd/f+b), ``x sdpa``
    = the paired speed-up over SDPA causal (forward+backward, forward in a forward-only run), the flags.

    Example::

        >>> r = {"family": "exact", "mechanism": "tiled causal", "T": 512, "fwd_ms": 4.0, "fwd_ms_min": 3.9,
        ...      "fwd_ms_max": 7.0, "repeats": "3/3", "fwd_bwd_ms": 9.0, "fwd_bwd_speedup_paired": 0.93}
        >>> row = speed_table_rows([r])[0]
        >>> row["fwd ms"], row["n"], row["x sdpa"], row["flags"]
        ('4 (3.9-7)', '3/3', 0.93, 'fwd spread 1.8x')
    """
    paired = "fwd_bwd_speedup_paired" if time_key(rows) == "fwd_bwd_ms" else "fwd_speedup_paired"
    mem = memory_key(rows)
    out = []
    for r in rows:
        flags = _row_flags(r)
        out.append(
            {
                **{k: r.get(k) for k in ("family", "mechanism", "T", "eff_%", "step_us", "state_bytes", "note")},
                "fwd ms": _timing(r, "fwd_ms"),
                "f+b ms": _timing(r, "fwd_bwd_ms"),
                "n": r.get("repeats"),
                "x sdpa": r.get(paired),
                "f+b MiB": r.get(mem),
                "flags": "; ".join(flags) or None,
                "error": r.get("error"),
            }
        )
    return out


# the terminal table's title: what its ratio and its short flags mean
SPEED_TERMINAL_TITLE = "speed and memory: x sdpa = paired speed-up over SDPA; flags: ±2.1x = spread, f>fb = fwd > f+b"


def _short_flag(flag: str) -> str:
    """``"f+b spread 2.1x"`` -> ``"±2.1x"``, ``"fwd > f+b"`` -> ``"f>fb"`` (the remark column is narrow)."""
    return "f>fb" if flag == "fwd > f+b" else "±" + flag.rsplit(" ", 1)[-1]


def speed_terminal_rows(rows: Sequence[dict]) -> list[dict]:
    """Speed rows with their error, flags (short: ``±2.1x`` the largest spread, ``f>fb``) or note in one
    ``remark``, in that order of precedence.

    Example::

        >>> r = {"fwd_ms": 9.0, "fwd_ms_min": 5.0, "fwd_ms_max": 12.0, "fwd_bwd_ms": 8.0, "note": "n"}
        >>> speed_terminal_rows([r])[0]["remark"], speed_terminal_rows([{"note": "n"}])[0]["remark"]
        ('±2.4x f>fb', 'n')
    """
    out = []
    for r in rows:
        flags = [_short_flag(f) for f in _row_flags(r)]
        spreads = sorted((f for f in flags if f.startswith("±")), key=lambda f: -float(f[1:-1]))[:1]
        short = " ".join(spreads + [f for f in flags if not f.startswith("±")])
        out.append({**r, "remark": r.get("error") or short or r.get("note")})
    return out


def _fmt_load(snap: dict | None) -> str:
    if not snap or snap.get("load_1m") is None:
        return "unknown"
    return f"{snap['load_1m']:.2f} / {snap['load_5m']:.2f} / {snap['load_15m']:.2f}"


def load_lines(meta: dict) -> list[str]:
    """The report's lines on the machine's load during the speed section (1/5/15-minute load averages
    before and after, CPU count, torch threads) and a warning where it exceeded the CPU count.

    Example::

        >>> snap = {"load_1m": 7.5, "load_5m": 6.0, "load_15m": 4.0, "cpu_count": 2, "torch_threads": 2}
        >>> lines = load_lines({"load_before": snap, "load_after": snap})
        >>> print(lines[0])
        Load average (1/5/15 min) before the speed section 7.50 / 6.00 / 4.00, after 7.50 / 6.00 / 4.00; 2 CPU...
        >>> lines[1].startswith("**Busy machine**")
        True
    """
    before, after = meta.get("load_before"), meta.get("load_after")
    if before is None and after is None:
        return []
    snap = before or after
    lines = [
        f"Load average (1/5/15 min) before the speed section {_fmt_load(before)}, after {_fmt_load(after)}; "
        f"{snap.get('cpu_count')} CPU cores, {snap.get('torch_threads')} torch threads."
    ]
    warnings = [w for w in (harness.busy_warning(before or {}), harness.busy_warning(after or {})) if w]
    if warnings:
        lines.append(
            f"**Busy machine**: {warnings[0]}. Absolute times below are inflated by an unknown factor that "
            "varied during the run; the x sdpa column (paired with SDPA, call by call) is the figure to compare."
        )
    return lines


def speed_section(rows: Sequence[dict], meta: dict, plots: Sequence[str] = ()) -> list[str]:
    """The report's ``Speed and memory`` section (markdown lines): load, how to read the table, how many
    rows are flagged, the table and the speed plots."""
    flagged = flagged_rows(rows)
    timed = [r for r in rows if r.get("fwd_ms") is not None]
    md = ["## Speed and memory", ""] + [f"{line}  " for line in load_lines(meta)]
    md += [
        "",
        "Times in ms: median of the timed calls (min-max); n = timed calls of the forward / forward+backward "
        "after a first call that measured the peak memory; x sdpa = speed-up over SDPA causal at the same T, "
        "the median over calls each timed back to back with an SDPA call (> 1: faster than SDPA); f+b MiB = "
        "peak memory rise of one forward+backward. Flags: a timing whose max/min over its calls exceeds "
        f"{harness.SPREAD_LIMIT} (spread), or a forward median above the forward+backward median (fwd > f+b): "
        "the machine changed speed while the row was measured.",
        "",
        f"**{len(flagged)} of {len(timed)} timed rows flagged**"
        + (f": {', '.join(sorted({r['mechanism'] for r in flagged}))}." if flagged else "."),
        "",
    ]
    if any(r.get("family") == MIXER_FAMILY for r in rows):
        md += [
            "Family mixer (`--mixers`): each named mixer of `effattn.nn` as one layer alone, projections "
            f"included, width {DIM}, {HEADS} heads, batch 1 (`bench memory`'s size), its defaults plus "
            "`--mixer-options`; "
            "not paired with SDPA (no x sdpa) and not the size of the op rows above, so compare mixer rows "
            "with each other; step_us = one token after a prefill of T tokens, state_bytes = the layer's "
            "`state_size(1, T)`.",
            "",
        ]
    md += [
        harness.format_markdown_table(speed_table_rows(rows), SPEED_COLUMNS),
        "",
    ]
    md += [f"![{p[:-4].replace('_', ' ')}]({p})" for p in plots if p in SPEED_PLOTS] + [""]
    return md


def speed_advice(speed: Sequence[dict]) -> list[str]:
    """Per length: the fastest mechanism by the paired speed-up over SDPA (by the median time where no row
    was paired; SDPA itself counts as 1, and its paired ratio with a second SDPA call is given as the noise
    of these ratios), the leanest by forward+backward peak memory, the smallest decode state.

    Example::

        >>> rows = [
        ...     {"family": "exact", "mechanism": "sdpa causal", "T": 64, "fwd_bwd_ms": 2.0,
        ...      "fwd_bwd_speedup_paired": 1.06, "fwd_bwd_MiB": 1.0},
        ...     {"family": "linear", "mechanism": "gla", "T": 64, "fwd_bwd_ms": 2.5,
        ...      "fwd_bwd_speedup_paired": 1.3, "fwd_bwd_MiB": 3.0, "state_bytes": 64},
        ... ]
        >>> for part in speed_advice(rows)[0].split("; "):
        ...     print(part)
        T=64: fastest fwd+bwd is gla (linear, 1.3x SDPA causal paired
        median 2.5 ms
        SDPA vs SDPA 1.06)
        least peak memory (f+b): sdpa causal (1 MiB)
        smallest decode state: gla (64 B)
    """
    lines = []
    key = time_key(speed)
    paired = "fwd_bwd_speedup_paired" if key == "fwd_bwd_ms" else "fwd_speedup_paired"
    mk = memory_key(speed)
    what = "fwd+bwd" if key == "fwd_bwd_ms" else "fwd"
    ops = [r for r in speed if r.get("family") != MIXER_FAMILY]
    for T in sorted({r["T"] for r in ops}):
        ok = [r for r in ops if r["T"] == T and r.get(key) is not None and "error" not in r]
        if not ok:
            continue
        # SDPA's own row is paired with a second SDPA call: its ratio is 1 by definition and its measured
        # value the noise of the pairing at this length, said beside the answer
        sdpa = next((r for r in ok if r["mechanism"] == SDPA and r.get(paired) is not None), None)
        ranked = [{**r, paired: 1.0} if r is sdpa else r for r in ok if r.get(paired) is not None]
        if ranked:
            fast = max(ranked, key=lambda r: r[paired])
            how = f"{fast[paired]:.3g}x SDPA causal paired; median {fast[key]:.3g} ms"
            if sdpa is not None:
                how += f"; SDPA vs SDPA {sdpa[paired]:.2f}"
        else:
            fast = min(ok, key=lambda r: r[key])
            how = f"{fast[key]:.3g} ms"
        flags = _row_flags(fast)
        how += f"; flagged: {', '.join(flags)}" if flags else ""
        line = f"T={T}: fastest {what} is {fast['mechanism']} ({fast['family']}, {how})"
        mem = [r for r in ok if r.get(mk) is not None]
        if mem:
            low = min(r[mk] for r in mem)
            lean = [r["mechanism"] for r in mem if r[mk] <= low + 1e-9]
            more = f" and {len(lean) - 3} more" if len(lean) > 3 else ""
            label = "f+b" if mk == MEMORY_KEY else "fwd"
            line += f"; least peak memory ({label}): {', '.join(lean[:3])}{more} ({low:.3g} MiB)"
        lines.append(line + _smallest_state(ok))
    return lines + mixer_advice(speed)


def _smallest_state(rows: Sequence[dict]) -> str:
    """The short answer's clause naming the row with the smallest decode state ('' when none has one)."""
    dec = [r for r in rows if r.get("state_bytes")]
    if not dec:
        return ""
    small = min(dec, key=lambda r: r["state_bytes"])
    return f"; smallest decode state: {small['mechanism']} ({small['state_bytes']} B)"


def mixer_advice(speed: Sequence[dict]) -> list[str]:
    """Per length, among the ``mixer`` rows only (one layer alone, not the op rows' size): the fastest by
    median time, the leanest by peak memory, the smallest decode state.

    Example::

        >>> rows = [{"family": "mixer", "mechanism": "gla", "T": 64, "fwd_bwd_ms": 2.0, "fwd_bwd_MiB": 3.0,
        ...          "state_bytes": 4096},
        ...         {"family": "mixer", "mechanism": "rmt", "T": 64, "fwd_bwd_ms": 5.0, "fwd_bwd_MiB": 1.0,
        ...          "state_bytes": 5128}]
        >>> for part in mixer_advice(rows)[0].split("; "):
        ...     print(part)
        T=64 mixer layers: fastest fwd+bwd is gla (2 ms)
        least peak memory (f+b): rmt (1 MiB)
        smallest decode state: gla (4096 B)
    """
    mixers = [r for r in speed if r.get("family") == MIXER_FAMILY]
    key, mk = time_key(mixers), memory_key(mixers)
    lines = []
    for T in sorted({r["T"] for r in mixers}):
        ok = [r for r in mixers if r["T"] == T and r.get(key) is not None and "error" not in r]
        if not ok:
            continue
        fast = min(ok, key=lambda r: r[key])
        what, label = ("fwd+bwd", "f+b") if key == "fwd_bwd_ms" else ("fwd", "fwd")
        line = f"T={T} mixer layers: fastest {what} is {fast['mechanism']} ({fast[key]:.3g} ms)"
        mem = [r for r in ok if r.get(mk) is not None]
        if mem:
            lean = min(mem, key=lambda r: r[mk])
            line += f"; least peak memory ({label}): {lean['mechanism']} ({lean[mk]:.3g} MiB)"
        lines.append(line + _smallest_state(ok))
    return lines


# ------------------------------------------------------------------------------------------------ plots

SPEED_PLOTS = ("speedup_vs_length.png", "time_vs_length.png", "memory_vs_length.png")
SDPA = "sdpa causal"
# families drawn in one panel: the external and compiled baselines beside the exact backends
PANEL_OF = {"exact": "exact attention (and baselines)", "baseline": "exact attention (and baselines)"}
PANEL_TITLES = {
    "linear": "linear attention, SSM and recurrent",
    "sparse": "sparse and content-routed",
    MIXER_FAMILY: f"mixer layers alone (width {DIM}, {HEADS} heads)",
}


def panels(speed: Sequence[dict]) -> dict[str, list[str]]:
    """Panel title -> the mechanisms it draws (``family: name`` keys), exact attention first."""
    out: dict[str, list[str]] = {}
    order = {"exact": 0, "baseline": 0, "sparse": 1, "linear": 2}
    for r in sorted(speed, key=lambda r: (order.get(r["family"], 3), r["family"])):
        title = PANEL_OF.get(r["family"], PANEL_TITLES.get(r["family"], r["family"]))
        names = out.setdefault(title, [])
        if r["mechanism"] not in names:
            names.append(r["mechanism"])
    return out


def _points(speed: Sequence[dict], mechanism: str, key: str) -> list[dict]:
    return sorted(
        (r for r in speed if r["mechanism"] == mechanism and r.get(key) is not None and "error" not in r),
        key=lambda r: r["T"],
    )


def speed_plots(out: Path, speed: Sequence[dict], label: str) -> list[str]:
    """``speedup_vs_length.png`` (paired speed-up over SDPA), ``time_vs_length.png`` (median with min-max
    bars) and ``memory_vs_length.png`` (forward+backward peak): one panel per family, SDPA causal drawn
    in every panel as the grey reference. Returns the files written (matplotlib must be importable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tk, mk = time_key(speed), memory_key(speed)
    paired = "fwd_bwd_speedup_paired" if tk == "fwd_bwd_ms" else "fwd_speedup_paired"
    what = "forward+backward" if tk == "fwd_bwd_ms" else "forward"
    plots = (
        (
            "speedup_vs_length.png",
            paired,
            f"speed-up over SDPA causal, {what} (paired: median of time(SDPA) / time(row))",
        ),
        ("time_vs_length.png", tk, f"{what} time, ms (median; bars: min-max of the calls)"),
        ("memory_vs_length.png", mk, f"peak memory of one {what}, MiB (rise during the call)"),
    )
    files = []
    for fname, key, ylabel in plots:
        # the panels with something to draw (a family whose every row failed has none)
        groups = {t: ns for t, ns in panels(speed).items() if any(_points(speed, n, key) for n in ns if n != SDPA)}
        if not groups:
            continue
        n = len(groups)
        fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 7.2), squeeze=False, sharey=True)
        for ax, (title, names) in zip(axes[0], groups.items()):
            timing = fname == "time_vs_length.png"  # flags are about the timings: ringed where they are drawn
            sdpa_label = "SDPA vs a 2nd SDPA (pairing noise)" if key == paired else f"{SDPA} (reference)"
            _draw_panel(ax, speed, names, key, bars=timing, rings=timing, sdpa_label=sdpa_label)
            ax.set_title(title, fontsize=10)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ts = sorted({r["T"] for r in speed})
            ax.set_xticks(ts, [str(t) for t in ts])
            ax.minorticks_off()
            ax.set_xlabel("sequence length T")
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
        axes[0][0].set_ylabel(ylabel, fontsize=8)
        if key == paired:
            for ax in axes[0]:
                ax.axhline(1.0, color="0.35", linewidth=1.0, zorder=1)
                ax.text(0.01, 1.0, " = SDPA", transform=ax.get_yaxis_transform(), fontsize=7, va="bottom")
        fig.suptitle(f"effattn compare: {ylabel.split(',')[0]} vs length\n{label}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        files.append(fname)
    return files


def _draw_panel(
    ax, speed: Sequence[dict], names: Sequence[str], key: str, bars: bool, rings: bool, sdpa_label: str
) -> None:
    """One panel: SDPA causal as a wide grey band, ``auto`` (often SDPA itself on a CPU) as a thin black
    dashed line over it, every other mechanism in its own colour, marker and line style; with ``bars``
    min-max error bars, with ``rings`` the points of flagged timings ringed in red."""
    sdpa = _points(speed, SDPA, key)
    if sdpa:
        ax.plot(
            [r["T"] for r in sdpa],
            [max(r[key], 1e-3) for r in sdpa],
            color="0.6",
            linewidth=7,
            alpha=0.45,
            solid_capstyle="round",
            zorder=1,
            label=sdpa_label,
        )
    i = 0
    ringed = False
    for name in names:
        pts = _points(speed, name, key)
        if not pts or name == SDPA:
            continue
        if name.startswith("auto"):
            style = {"color": "black", "marker": "x", "linestyle": (0, (4, 2)), "linewidth": 1.0}
        else:
            style = {**series_style(i), "linewidth": 1.3}
            i += 1
        xs, ys = [r["T"] for r in pts], [max(r[key], 1e-3) for r in pts]
        if bars and all(r.get(f"{key}_min") is not None for r in pts):
            err = [[y - r[f"{key}_min"] for r, y in zip(pts, ys)], [r[f"{key}_max"] - y for r, y in zip(pts, ys)]]
            ax.errorbar(xs, ys, yerr=err, capsize=2, markersize=4, label=name, zorder=3, **style)
        else:
            ax.plot(xs, ys, markersize=4, label=name, zorder=3, **style)
        bad = [(r["T"], y) for r, y in zip(pts, ys) if rings and _row_flags(r)]
        if bad:
            ax.scatter(
                [b[0] for b in bad],
                [b[1] for b in bad],
                s=110,
                facecolors="none",
                edgecolors="red",
                linewidths=1.0,
                zorder=4,
                label=None if ringed else f"flagged timing (spread > {harness.SPREAD_LIMIT}x or fwd > f+b)",
            )
            ringed = True
