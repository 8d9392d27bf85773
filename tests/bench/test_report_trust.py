"""How much to trust the demo's speed figures (issue 21, items 2 and 3): spreads and flags computed from
stored rows, the paired-ratio machinery on a fake clock, the load average recorded with a warning, one
stated wall time for ``make demo``, and plots with distinct styles per panel."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from effattn.bench import harness
from effattn.bench.compare import SpeedMechanism, make_config, plot_style
from effattn.bench.compare import speed as speed_module
from effattn.bench.compare import speed_report as sr

ROOT = Path(__file__).resolve().parents[2]


def _row(name: str, T: int = 512, **kw) -> dict:
    return {"family": "exact", "mechanism": name, "T": T, **kw}


# ------------------------------------------------------------------------------------------------ flags


def test_flags_from_stored_rows(tmp_path):
    """Flags come from the stored timings alone (a report rebuilt from results.json says the same): a
    spread max/min above 1.5 (the limit itself is not flagged) and a forward median above the
    forward+backward median."""
    rows = [
        _row(
            "steady", fwd_ms=2.0, fwd_ms_min=1.9, fwd_ms_max=2.1, fwd_bwd_ms=6.0, fwd_bwd_ms_min=5.9, fwd_bwd_ms_max=6.2
        ),
        _row("at limit", fwd_ms=2.0, fwd_ms_min=2.0, fwd_ms_max=3.0, fwd_bwd_ms=6.0),
        _row("noisy f+b", fwd_ms=2.0, fwd_bwd_ms=6.0, fwd_bwd_ms_min=5.0, fwd_bwd_ms_max=8.0),
        _row("fwd slower", fwd_ms=9.0, fwd_ms_min=8.8, fwd_ms_max=9.1, fwd_bwd_ms=7.0),
        _row("failed", error="RuntimeError: x"),
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"speed": rows}))
    stored = json.loads(path.read_text())["speed"]
    assert [harness.timing_flags(r) for r in stored] == [[], [], ["f+b spread 1.6x"], ["fwd > f+b"], []]
    assert [r["mechanism"] for r in sr.flagged_rows(stored)] == ["noisy f+b", "fwd slower"]
    table = {r["mechanism"]: r for r in sr.speed_table_rows(stored)}
    assert table["noisy f+b"]["flags"] == "f+b spread 1.6x" and table["steady"]["flags"] is None
    assert table["steady"]["fwd ms"] == "2 (1.9-2.1)" and table["fwd slower"]["f+b ms"] == "7"
    md = "\n".join(sr.speed_section(stored, {}))
    assert "**2 of 4 timed rows flagged**: fwd slower, noisy f+b." in md
    remarks = {r["mechanism"]: r["remark"] for r in sr.speed_terminal_rows(stored)}
    assert (
        remarks["fwd slower"] == "f>fb" and remarks["noisy f+b"] == "±1.6x" and remarks["failed"] == "RuntimeError: x"
    )


def test_spread_limit_is_one_and_a_half():
    assert harness.SPREAD_LIMIT == 1.5
    assert harness.timing_flags({"fwd_ms": 1.0, "fwd_ms_min": 1.0, "fwd_ms_max": 1.51}) == ["fwd spread 1.5x"]
    assert harness.timing_flags({"fwd_ms": 1.0, "fwd_ms_min": 1.0, "fwd_ms_max": 1.5}) == []


# ------------------------------------------------------------------------------------------------ pairing


class FakeMachine:
    """A clock and two workloads: ``a`` costs ``cost_a`` s, ``b`` 1 s, times a slow-down factor that
    changes with the number of calls made so far (another job starting and stopping)."""

    def __init__(self, cost_a: float, slowdown):
        self.now, self.calls, self.cost_a, self.slowdown = 0.0, 0, cost_a, slowdown

    def clock(self) -> float:
        return self.now

    def call(self, cost: float) -> None:
        self.now += cost * self.slowdown(self.calls)
        self.calls += 1


@pytest.mark.parametrize("cost_a", [0.25, 2.0, 3.0])
def test_paired_ratio_cancels_drift_on_a_fake_clock(cost_a):
    # the machine is 1x, then 8x slower, then 3x: unpaired medians taken one after the other carry it
    m = FakeMachine(cost_a, lambda i: 1.0 if i < 10 else 8.0 if i < 24 else 3.0)
    a, b = (lambda: m.call(m.cost_a)), (lambda: m.call(1.0))
    pairs = harness.paired_times(a, b, repeats=7, warmup=1, clock=m.clock)
    assert pairs.a.n == pairs.b.n == 7 and m.calls == 2 + 14
    assert pairs.ratio == pytest.approx(cost_a) and all(r == pytest.approx(cost_a) for r in pairs.ratios)
    assert pairs.a.spread == pytest.approx(8.0)  # the drift shows in each side's spread, not in the ratio

    m2 = FakeMachine(cost_a, lambda i: 1.0 if i < 10 else 8.0 if i < 24 else 3.0)
    sa = harness.time_stats(lambda: m2.call(m2.cost_a), repeats=7, warmup=1, clock=m2.clock)
    sb = harness.time_stats(lambda: m2.call(1.0), repeats=7, warmup=1, clock=m2.clock)
    assert sa.median / sb.median != pytest.approx(cost_a)  # what pairing fixes


def test_measure_forward_backward_pairs_each_call_with_the_baseline(monkeypatch):
    """Every timed call of the row is followed by one of the baseline, fwd and fwd+bwd alike; the row keeps
    its own median/min/max and the median per-pair speed-up; the baseline's inputs get no gradient left."""
    order = []
    x = torch.randn(8, 8, requires_grad=True)
    y = torch.randn(8, 8, requires_grad=True)

    def fwd():
        order.append("row")
        return x * 2

    def base():
        order.append("base")
        return y * 3

    monkeypatch.setattr(harness, "SLOW_CALL_S", float("inf"))  # a loaded machine can make any first call slow
    row = harness.measure_forward_backward(fwd, [x], repeats=3, baseline=(base, [y]))
    # per timing: memory call of the row, warm-up of the baseline, then 3 pairs
    assert order == (["row", "base"] + ["row", "base"] * 3) * 2
    for key in ("fwd", "fwd_bwd"):
        assert row[f"{key}_ms_min"] <= row[f"{key}_ms"] <= row[f"{key}_ms_max"]
        assert row[f"{key}_speedup_paired"] > 0 and row[f"baseline_{key}_ms"] > 0
    assert row["repeats"] == "3/3" and x.grad is None and y.grad is None


# ------------------------------------------------------------------------------------------------ load


def test_load_recorded_and_busy_warning_printed(monkeypatch, capsys):
    """run_speed records the load average (with CPU count and threads) before and after, warns on the
    terminal when it exceeds the CPU count, and flags rows from their stored timings."""
    snaps = iter(
        [
            {"load_1m": 9.0, "load_5m": 5.0, "load_15m": 3.0, "cpu_count": 2, "torch_threads": 1},
            {"load_1m": 1.0, "load_5m": 2.0, "load_15m": 3.0, "cpu_count": 2, "torch_threads": 1},
        ]
    )
    monkeypatch.setattr(harness, "load_snapshot", lambda: next(snaps))
    monkeypatch.setattr(harness, "matmul_flops_per_second", lambda *a, **k: 1e9)

    def odd(T: int) -> dict:  # a forward slower than its forward+backward: flagged
        return {"fwd_ms": 5.0, "fwd_ms_min": 4.0, "fwd_ms_max": 9.0, "fwd_bwd_ms": 3.0}

    fake = [SpeedMechanism("test", "odd", odd)]
    monkeypatch.setattr(speed_module, "speed_mechanisms", lambda cfg, gemm: (fake, []))
    rows, meta, notes = speed_module.run_speed(make_config("tiny", lengths=(32,)))
    out = capsys.readouterr().out
    assert "warning (before the speed section): load average 9.0 above the 2 CPU cores" in out
    assert "after the speed section" not in out
    assert meta["load_before"]["load_1m"] == 9.0 and meta["load_after"]["cpu_count"] == 2
    assert rows[0]["flags"] == "fwd spread 2.2x; fwd > f+b"
    lines = sr.load_lines(meta)
    assert "before the speed section 9.00 / 5.00 / 3.00, after 1.00 / 2.00 / 3.00; 2 CPU cores, 1 torch" in lines[0]
    assert lines[1].startswith("**Busy machine**")
    assert any("paired" in n and "1.5" in n for n in notes)


def test_real_load_snapshot_has_the_cores():
    snap = harness.load_snapshot()
    assert snap["cpu_count"] >= 1 and snap["torch_threads"] == torch.get_num_threads()


# ------------------------------------------------------------------------------------------------ advice


def test_advice_ranks_by_the_paired_ratio_not_the_raw_time():
    """A row timed while the machine was slow has a larger median but its paired ratio is unaffected:
    the short answer follows the ratio and says when the winner is flagged."""
    rows = [
        _row("sdpa causal", fwd_bwd_ms=2.0, fwd_bwd_speedup_paired=1.0, fwd_bwd_MiB=1.0),
        _row(
            "fast but timed when busy",
            fwd_bwd_ms=4.0,
            fwd_bwd_ms_min=1.0,
            fwd_bwd_ms_max=9.0,
            fwd_bwd_speedup_paired=1.6,
        ),
        _row("slow, timed when quiet", fwd_bwd_ms=1.5, fwd_bwd_speedup_paired=0.8, fwd_bwd_MiB=0.5),
    ]
    line = sr.speed_advice(rows)[0]
    # SDPA's own row ranks at 1 whatever its pairing with another SDPA call measured (the noise, said beside)
    noisy_sdpa = [{**rows[0], "fwd_bwd_speedup_paired": 1.9}] + rows[1:]
    assert "fastest fwd+bwd is fast but timed when busy" in sr.speed_advice(noisy_sdpa)[0]
    assert "SDPA vs SDPA 1.90" in sr.speed_advice(noisy_sdpa)[0]
    assert "fastest fwd+bwd is fast but timed when busy" in line and "1.6x SDPA" in line
    assert "flagged: f+b spread 9.0x" in line
    assert "least peak memory (f+b): slow, timed when quiet" in line


# ------------------------------------------------------------------------------------------------ wall time


def test_demo_wall_time_is_stated_the_same_in_readme_and_help():
    from effattn.__main__ import build_parser
    from effattn.bench.compare.config import DEMO_WALL_TIME

    parser = build_parser()
    sub = next(a for a in parser._actions if getattr(a, "choices", None) and "compare" in a.choices)
    help_text = re.sub(r"\s+", " ", sub.choices["compare"].format_help())
    readme = re.sub(r"\s+", " ", (ROOT / "README.md").read_text())
    assert DEMO_WALL_TIME in help_text, help_text
    assert DEMO_WALL_TIME in readme
    # no other duration for the quick preset / make demo in either
    assert not re.search(r"about 5 minutes", help_text + readme)


# ------------------------------------------------------------------------------------------------ plots


def test_series_styles_never_repeat_a_colour_within_a_panel():
    styles = [plot_style.series_style(i) for i in range(len(plot_style.PALETTE))]
    assert len({s["color"] for s in styles}) == len(styles)
    assert all(s["color"] not in ("0.6", "#7f7f7f", "gray", "grey") for s in styles)  # grey is SDPA's
    # the marker and line-style cycles have other periods: no two of 16 series share all three
    assert len({tuple(s.values()) for s in styles}) == len(styles)


def _legend_lines(ax) -> dict[str, str]:
    """Legend label -> colour of each series of a panel (error-bar series through their data line)."""
    from matplotlib.container import ErrorbarContainer

    out = {}
    for h, label in zip(*ax.get_legend_handles_labels()):
        line = h.lines[0] if isinstance(h, ErrorbarContainer) else h
        out[label] = str(line.get_color() if hasattr(line, "get_color") else line.get_edgecolor())
    return out


def test_speed_plots_one_panel_per_family(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    rows = []
    for T in (256, 512, 1024, 2048):
        for fam, name in [("exact", "sdpa causal"), ("exact", "auto causal"), ("linear", "gla"), ("sparse", "lsh")]:
            t = T / 100
            rows.append(
                {"family": fam, "mechanism": name, "T": T, "fwd_ms": t / 3, "fwd_bwd_ms": t, "fwd_bwd_ms_min": t * 0.9}
                | {"fwd_bwd_ms_max": t * (2 if name == "lsh" else 1.1), "fwd_bwd_speedup_paired": 1.2, "fwd_bwd_MiB": T}
            )
    seen = []
    real_savefig = plt.Figure.savefig

    def spy(fig, path, *a, **k):
        seen.append((Path(path).name, [ax.get_title() for ax in fig.axes], fig))
        return real_savefig(fig, path, *a, **k)

    import unittest.mock

    with unittest.mock.patch.object(plt.Figure, "savefig", spy):
        files = sr.speed_plots(tmp_path, rows, "label")
    assert files == ["speedup_vs_length.png", "time_vs_length.png", "memory_vs_length.png"]
    for _name, titles, fig in seen:
        assert titles == [
            "exact attention (and baselines)",
            "sparse and content-routed",
            "linear attention, SSM and recurrent",
        ]
        for ax in fig.axes:
            entries = _legend_lines(ax)
            # SDPA is drawn in every panel (on the speed-up plot: its pairing with a second SDPA call)
            assert next(iter(entries)) in ("sdpa causal (reference)", "SDPA vs a 2nd SDPA (pairing noise)")
            colours = [c for label, c in entries.items() if not label.startswith("flagged")]
            assert len(colours) == len(set(colours))
        assert "auto causal" in _legend_lines(fig.axes[0])
    # the lsh rows' spread (2x) is flagged: ringed on the time plots, not on the memory plot
    rings = {
        name: sum(
            len(c.get_offsets()) for ax in fig.axes for c in ax.collections if c.get_label().startswith("flagged")
        )
        for name, _, fig in seen
    }
    assert rings["time_vs_length.png"] == 4 and rings["memory_vs_length.png"] == rings["speedup_vs_length.png"] == 0
    assert all((tmp_path / f).stat().st_size > 0 for f in files)


def test_dodge_spreads_only_overlapping_markers():
    """Markers closer than the radius (pixels) end up at least the radius apart; isolated markers stay put."""
    pts = [(100.0, 50.0), (103.0, 51.0), (101.0, 49.0), (300.0, 50.0), (100.0, 200.0)]
    offsets, groups = plot_style.dodge_offsets(pts, radius=10.0)
    assert groups[0] == groups[1] == groups[2] and len({groups[0], groups[3], groups[4]}) == 3
    assert offsets[3] == offsets[4] == 0.0
    xs = sorted(p[0] + o for p, o in zip(pts[:3], offsets[:3]))
    assert all(b - a >= 10.0 - 1e-9 for a, b in zip(xs, xs[1:]))
    assert sum(xs) / 3 == pytest.approx(sum(p[0] for p in pts[:3]) / 3)  # the group stays centred
