"""The ``speed`` part of ``python -m effattn bench memory``: each memory mixer alone (width 64, 2 heads,
batch 1) at ``--lengths``.

- One row per mixer and form: forward and forward+backward time (median, min, max of ``--repeats`` after
  a warm-up), forward+backward peak memory, one decode step after a prefill, state bytes. The neural
  memories run their default, the chunked form (chunk ``--chunk-size``; the fast factored form where the
  rule is linear in the gradients: Titans, Yaad, ATLAS without Muon; materialized for Moneta, Memora);
  the token-by-token rule (chunk 1, the default before the fast form) is timed once for Titans
  MAL/MAG/MAC up to ``--token-max-len``.
- Before/after pairs for Titans MAL/MAG/MAC: the fast form against the materialized chunked form (the
  chunked form before it; the same chunk grid, so the same numbers: the row records their largest
  difference), each forward+backward timed back to back with the other (``harness.paired_times``).
- An external, labelled row: ``titans-pytorch``'s ``NeuralMemory`` (lucidrains, PyPI; not a dependency
  of effattn) beside effattn's ``NeuralMemory`` layer alone at the same width, heads, depth and chunk;
  skipped with a note when the package is not installed.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

from effattn.bench import harness

__all__ = [
    "DIM",
    "HEADS",
    "PAIRED_MIXERS",
    "SPEED_MIXERS",
    "build_layer",
    "decode_step_stats",
    "external_rows",
    "load_note",
    "paired_row",
    "run_speed",
    "speed_row",
    "write_speed_report",
]

DIM, HEADS = 64, 2
SPEED_MIXERS = (
    ("titans_mal", dict(window=64)),
    ("titans_mag", dict(window=64)),
    ("titans_mac", dict(segment=64)),
    ("moneta", {}),
    ("yaad", {}),
    ("memora", {}),
    ("atlas", {}),
    ("infini_attention", dict(segment=64)),
    ("rmt", dict(segment=64)),
    ("sliding_window", dict(window=64)),
    ("gated_deltanet", {}),
)
NEURAL = {"titans_mal", "titans_mag", "titans_mac", "moneta", "yaad", "memora", "atlas"}
PAIRED_MIXERS = ("titans_mal", "titans_mag", "titans_mac")  # before/after rows, and the token rule


def load_note(before: dict, after: dict) -> str:
    """The load average before and after a part, marked busy above the core count.

    Example::

        >>> load_note({"load_1m": 1.0, "cpu_count": 2}, {"load_1m": 1.5, "cpu_count": 2})
        'load average (1 min) 1.0 before, 1.5 after, 2 cores'
    """
    busy = (
        " (busy: above the core count; times inflated)"
        if harness.busy_warning(before) or harness.busy_warning(after)
        else ""
    )
    cores = before["cpu_count"]
    return f"load average (1 min) {before['load_1m']:.1f} before, {after['load_1m']:.1f} after, {cores} cores{busy}"


def _ms(stats) -> dict:
    return {"ms": round(1e3 * stats.median, 2), "min": round(1e3 * stats.min, 2), "max": round(1e3 * stats.max, 2)}


def build_layer(mixer: str, kw: dict, device: str = "cpu") -> torch.nn.Module:
    """The registered mixer ``mixer`` alone at this part's size (width :data:`DIM`, :data:`HEADS` heads) with
    the keyword arguments ``kw``, weights from seed 0 (the same layer on every call), on ``device``.

    Example::

        >>> build_layer("gated_deltanet", {}).state_size(1, 8)
        10496
    """
    from effattn.nn import build_mixer

    torch.manual_seed(0)
    return build_mixer(mixer, dim=DIM, heads=HEADS, **kw).to(device)


def decode_step_stats(
    layer: torch.nn.Module, x: torch.Tensor, repeats: int, device: str = "cpu", warmup: int = 1
) -> harness.TimeStats | None:
    """Times of one decode step of a mixer ``layer``: the state of a prefill of ``x`` ``[B, T, dim]``, then
    ``layer(x1, state)`` for one new token ``x1``, ``repeats`` times after ``warmup`` (under ``no_grad``).
    None where the layer returns no state (it has no step form to time).

    Example::

        >>> layer = build_layer("gated_deltanet", {})
        >>> decode_step_stats(layer, torch.randn(1, 8, DIM), repeats=2).n
        2
    """
    with torch.no_grad():
        _, state = layer(x)
        if state is None:
            return None
        x1 = torch.randn(x.shape[0], 1, x.shape[-1]).to(x.device)
        return harness.time_stats(lambda: layer(x1, state), repeats=repeats, warmup=warmup, device=device)


def speed_row(
    mixer: str, kw: dict, T: int, chunk_size: int | None, repeats: int, device: str = "cpu", fast: bool | None = None
) -> dict:
    """One mixer layer (width 64, 2 heads, batch 1) at length ``T``: forward and forward+backward time,
    forward+backward peak memory, one decode step after a prefill of ``T`` tokens, state bytes at ``T``.
    ``chunk_size``: the neural memory's chunk (None: a mixer without one); chunk 1 (the token-by-token
    rule) is timed once, without a warm-up. ``fast=False``: the materialized chunk form.

    Example::

        >>> speed_row("titans_mag", dict(window=4), 8, 4, repeats=1)["form"]
        'chunk 4'
    """
    kw = dict(kw, **({} if chunk_size is None else {"chunk_size": chunk_size}))
    if fast is not None:
        kw["fast"] = fast
    layer = build_layer(mixer, kw, device)
    x = torch.randn(1, T, DIM, generator=torch.Generator().manual_seed(1)).to(device)
    xg = x.clone().requires_grad_(True)
    slow = chunk_size == 1
    reps, warm = (1, 0) if slow else (repeats, 1)

    def fwd():
        with torch.no_grad():
            return layer(x)

    def fwd_bwd():
        y, _ = layer(xg)
        y.float().sum().backward()

    form = "-" if chunk_size is None else ("token" if slow else f"chunk {chunk_size}")
    row = {"mixer": mixer, "T": T, "form": form + (" materialized" if fast is False else "")}
    row["fwd"] = _ms(harness.time_stats(fwd, repeats=reps, warmup=warm, device=device))
    row["peak_mib"] = round((harness.measure_peak_memory(fwd_bwd, device=device) or 0) / 2**20, 1)
    row["fwd_bwd"] = _ms(harness.time_stats(fwd_bwd, repeats=reps, warmup=0, device=device))
    step = decode_step_stats(layer, x, repeats=max(reps, 5), device=device)
    if step is not None:
        row["decode"] = _ms(step)
    row["state_bytes"] = layer.state_size(1, T)
    return row


def paired_row(mixer: str, kw: dict, T: int, chunk_size: int, repeats: int, device: str = "cpu") -> dict:
    """Before/after: the materialized chunked form against the fast one (same weights, same chunk grid),
    ``repeats`` back-to-back forward+backward pairs after a warm-up of each; ``speedup`` is the median
    over pairs of materialized time / fast time, ``max_abs_diff`` the largest output difference.

    Example::

        >>> r = paired_row("titans_mal", dict(window=4), 9, 4, repeats=1)
        >>> r["form"], r["max_abs_diff"] < 1e-4
        ('chunk 4: materialized vs fast (paired)', True)
    """
    kw = dict(kw, chunk_size=chunk_size)
    fast, slow = build_layer(mixer, kw, device), build_layer(mixer, dict(kw, fast=False), device)
    x = torch.randn(1, T, DIM, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        diff = (fast(x)[0] - slow(x)[0]).abs().max().item()
    xg = x.clone().requires_grad_(True)

    def fwd_bwd(layer):
        y, _ = layer(xg)
        y.float().sum().backward()

    pt = harness.paired_times(partial(fwd_bwd, slow), partial(fwd_bwd, fast), repeats=repeats, warmup=1, device=device)
    return {
        "mixer": mixer,
        "T": T,
        "form": f"chunk {chunk_size}: materialized vs fast (paired)",
        "fwd_bwd_materialized": _ms(pt.a),
        "fwd_bwd": _ms(pt.b),
        "speedup": round(pt.ratio, 2),
        "speedup_range": [round(min(pt.ratios), 2), round(max(pt.ratios), 2)],
        "max_abs_diff": diff,
    }


def external_rows(T: int, chunk_size: int, repeats: int, device: str = "cpu") -> list[dict]:
    """``titans-pytorch``'s ``NeuralMemory`` (external, labelled) and effattn's ``NeuralMemory`` layer at the
    same width 64, 2 heads of 32, MLP depth 2 and chunk: forward and forward+backward time. Without the
    package the external row carries a note instead of times.

    Example::

        >>> rows = external_rows(8, 4, repeats=1)
        >>> rows[0]["mixer"], rows[1]["mixer"]
        ('effattn NeuralMemory (depth 2)', 'titans-pytorch NeuralMemory (external)')
    """
    from effattn.memory import NeuralMemory

    x = torch.randn(1, T, DIM, generator=torch.Generator().manual_seed(1)).to(device)
    torch.manual_seed(0)
    ours = NeuralMemory(DIM, HEADS, depth=2, chunk_size=chunk_size).to(device)
    rows = [_time_layer("effattn NeuralMemory (depth 2)", ours, x, T, chunk_size, repeats, device)]
    try:
        from titans_pytorch import NeuralMemory as ExternalMemory
    except ImportError as e:  # optional: not a dependency of effattn
        note = f"titans-pytorch not installed ({e.__class__.__name__}: {e}); pip install titans-pytorch to add it"
        return rows + [{"mixer": "titans-pytorch NeuralMemory (external)", "T": T, "error": note}]
    torch.manual_seed(0)
    theirs = ExternalMemory(
        dim=DIM,
        chunk_size=chunk_size,
        heads=HEADS,
        dim_head=DIM // HEADS,
        default_model_kwargs=dict(depth=2, expansion_factor=2.0),  # ours: depth 2, expansion 2
        max_grad_norm=ours.opts["max_grad_norm"],  # ours clips each token's gradient by default; theirs the same
    ).to(device)
    rows.append(
        harness.run_guarded(
            partial(_time_layer, "titans-pytorch NeuralMemory (external)", theirs, x, T, chunk_size, repeats, device)
        )
    )
    rows[-1].setdefault("mixer", "titans-pytorch NeuralMemory (external)")
    rows[-1].setdefault("T", T)
    return rows


def _time_layer(name, layer, x, T, chunk_size, repeats, device) -> dict:
    xg = x.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return layer(x)

    def fwd_bwd():
        y = layer(xg)[0]
        y.float().sum().backward()

    row = {"mixer": name, "T": T, "form": f"chunk {chunk_size}"}
    row["fwd"] = _ms(harness.time_stats(fwd, repeats=repeats, warmup=1, device=device))
    row["peak_mib"] = round((harness.measure_peak_memory(fwd_bwd, device=device) or 0) / 2**20, 1)
    row["fwd_bwd"] = _ms(harness.time_stats(fwd_bwd, repeats=repeats, warmup=0, device=device))
    return row


def _measure(rows_file: Path, fn, **label) -> dict:
    t0 = time.perf_counter()
    row = harness.run_guarded(fn)
    for k, v in label.items():
        row.setdefault(k, v)
    row["load_1m"] = harness.load_snapshot()["load_1m"]
    print(f"{row} ({time.perf_counter() - t0:.0f} s)", flush=True)
    with rows_file.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def run_speed(args: argparse.Namespace, out: Path, meta: dict) -> None:
    """The speed part (module docstring): each row appended to ``speed_rows.jsonl`` as it is measured, then
    ``speed.md``/``speed.json``; with ``--report-only`` the report is rebuilt from ``speed_rows.jsonl``.
    ``--speed-mixers`` (comma list, default all) limits the mixers; ``external`` there adds the
    titans-pytorch row (on by default)."""
    rows_file = out / "speed_rows.jsonl"
    if args.report_only:
        rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
        write_speed_report(rows, args, out, meta, f"load while they ran: {args.report_only}")
        return
    chosen = getattr(args, "speed_mixers", "all")
    names = None if chosen == "all" else {n.strip() for n in chosen.split(",") if n.strip()}
    rows_file.write_text("")
    before = harness.load_snapshot()
    for T in [int(t) for t in str(args.lengths).split(",") if t.strip()]:
        for mixer, kw in SPEED_MIXERS:
            if names is not None and mixer not in names:
                continue
            if args.quick:
                kw = {k: min(v, 16) for k, v in kw.items()}
            cs = args.chunk_size if mixer in NEURAL else None
            _measure(rows_file, partial(speed_row, mixer, kw, T, cs, args.repeats, args.device), mixer=mixer, T=T)
            if mixer in PAIRED_MIXERS:
                fn = partial(paired_row, mixer, kw, T, args.chunk_size, args.repeats, args.device)
                _measure(rows_file, fn, mixer=mixer, T=T)
                if T <= args.token_max_len:
                    fn = partial(speed_row, mixer, kw, T, 1, args.repeats, args.device)
                    _measure(rows_file, fn, mixer=mixer, T=T)
        if names is None or "external" in names:
            t0 = time.perf_counter()
            for row in external_rows(T, args.chunk_size, args.repeats, args.device):
                row["load_1m"] = harness.load_snapshot()["load_1m"]
                with rows_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            print(f"external rows T={T} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    write_speed_report(rows, args, out, meta, load_note(before, harness.load_snapshot()))


def write_speed_report(rows: list[dict], args: argparse.Namespace, out: Path, meta: dict, load: str) -> None:
    """``speed.md``/``speed.json`` from the measured rows."""
    table = []
    for r in rows:
        t = {k: r.get(k) for k in ("mixer", "T", "form", "peak_mib", "state_bytes", "load_1m")}
        t["load_1m"] = None if t["load_1m"] is None else round(t["load_1m"], 1)
        for key in ("fwd", "fwd_bwd", "decode", "fwd_bwd_materialized"):
            if key in r:
                t[f"{key} ms (min-max)"] = f"{r[key]['ms']} ({r[key]['min']}-{r[key]['max']})"
        if "speedup" in r:
            lo, hi = r["speedup_range"]
            t["speedup (min-max)"] = f"{r['speedup']}x ({lo}-{hi}); max diff {r['max_abs_diff']:.1e}"
        if "error" in r:
            t["error"] = r["error"]
        table.append(t)
    cols = ["mixer", "T", "form", "fwd ms (min-max)", "fwd_bwd ms (min-max)", "fwd_bwd_materialized ms (min-max)"]
    cols += ["speedup (min-max)", "decode ms (min-max)", "peak_mib", "state_bytes", "load_1m", "error"]
    notes = [
        f"one mixer layer, width {DIM}, {HEADS} heads, batch 1, float32, {args.threads} thread; median (min-max) of "
        f"{args.repeats} runs after a warm-up; neural memories at the mixers' defaults (MLP depth 2, the chunked form, "
        f"chunk {args.chunk_size}: fast factored form for Titans/Yaad/ATLAS, materialized for Moneta/Memora); "
        f"'token': the token-by-token rule (the default before the fast form), one run, no warm-up, up to "
        f"T={args.token_max_len}; decode: one token after a prefill of T tokens, 5+ runs; peak_mib: RSS rise of one "
        "forward+backward",
        "paired rows: the materialized chunked form (the chunked form before the fast one) and the fast form, "
        f"{args.repeats} back-to-back forward+backward pairs; speedup = median over pairs of materialized/fast",
        "external rows: titans-pytorch's NeuralMemory (PyPI, optional, labelled; its own defaults otherwise) beside "
        "effattn's NeuralMemory layer, both width 64, 2 heads, MLP depth 2, the same chunk",
        load,
    ]
    harness.write_report(out, "speed", table, cols, meta=meta, notes=notes)
    print(harness.format_markdown_table(table, cols))
