"""``python -m effattn bench decode``: one decoding step over a long KV cache, Lean Attention vs SDPA.

One new query per sequence (``B = 1``, ``H_q = 4`` query heads sharing ``H_kv = 1`` kv head, head dim
32: small heads so that a 1M-token cache, 128 MiB per tensor, fits next to everything else on a
shared machine) attends to a cache of ``T`` tokens (default 8k, 32k, 128k, 1M; ``--quick``: 1k, 4k).
Each method reads the *same* cache tensors:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` over the cache (``enable_gqa``), the
  baseline every row is paired with;
- ``flash_decoding``: :func:`effattn.decode_attention`'s PyTorch form (one einsum over every split: the
  scores and a float32 copy of the whole cache at once);
- ``lean``: :func:`effattn.exact.lean_decode_attention` (stream-K over ``--workers`` workers of
  ``--tile`` keys; memory ``O(workers x tile)`` beyond the cache);
- paged (a :class:`effattn.kv.PagedKVCache` of ``--block-size`` tokens a block holding a copy of the cache):
  ``paged_sdpa`` gathers the blocks into one contiguous tensor then runs SDPA (what a kernel without a
  block table must do), ``paged_partitions`` is :func:`effattn.kv.paged_decode_attention` (a loop over
  partitions of blocks) and ``paged_lean`` is Lean Attention reading through the block table.

Per row: ``ms`` (median of ``--repeats`` after the first, measuring call) with ``ms_min``/``ms_max``,
``x_sdpa`` (median over back-to-back pairs of ``time(sdpa) / time(method)``; > 1: faster than SDPA; where
one call takes over 5 s there are no pairs and it is the ratio of the medians, ``paired`` False),
``peak_MiB`` (the rise of the process's peak resident memory during one call: memory beyond the cache)
and ``max_err`` against SDPA. Load averages before and after are recorded in the report: on a shared
machine the times are inflated and noisy, the paired ratios less so. ``decode.png`` plots time and
memory against the context length.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from effattn.bench import suite
from effattn.bench.cli import add_common_arguments
from effattn.bench.harness import (
    PairedTimes,
    busy_warning,
    command_line,
    load_snapshot,
    machine_info,
    timings_and_memory,
    write_report,
)
from effattn.bench.table import Column, print_table

__all__ = ["add_arguments", "decode_methods", "run", "write_plot"]

LENGTHS = [8192, 32768, 131072, 1048576]
QUICK_LENGTHS = [1024, 4096]
HEADS, KV_HEADS, HEAD_DIM = 4, 1, 32
METHODS = ["sdpa", "flash_decoding", "lean", "paged_sdpa", "paged_partitions", "paged_lean"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, "decode", lengths=LENGTHS, quick_lengths=QUICK_LENGTHS, quick="small caches: seconds")
    p.add_argument("--workers", type=int, default=64, help="Lean Attention's worker count (default: %(default)s)")
    p.add_argument("--tile", type=int, default=256, help="keys per Lean Attention unit (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=256, help="paged cache block size (default: %(default)s)")
    p.add_argument(
        "--methods", type=str, default=",".join(METHODS), help="comma-separated methods (default: %(default)s)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch threads (default: %(default)s: on a shared, loaded CPU one thread is steadier than two)",
    )


def decode_methods(T: int, *, workers: int, tile: int, block_size: int, device="cpu", seed: int = 0) -> dict:
    """``{name: fn}`` over one shared random cache of ``T`` tokens (contiguous and paged copies of it)."""
    from effattn.exact import decode_attention, lean_decode_attention
    from effattn.kv import PagedKVCache, paged_decode_attention

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, HEADS, HEAD_DIM, generator=g).to(device)
    k = torch.randn(1, T, KV_HEADS, HEAD_DIM, generator=g).to(device)
    v = torch.randn(1, T, KV_HEADS, HEAD_DIM, generator=g).to(device)
    lens = torch.tensor([T], device=device)
    n_blocks = -(-T // block_size)
    pool = PagedKVCache(n_blocks, block_size, KV_HEADS, HEAD_DIM, device=device)
    sid = pool.allocate()
    pool.append(sid, k[0], v[0])
    table, _ = pool.block_tables([sid])

    def sdpa():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)

    def paged_sdpa():
        kc = pool.key_blocks[table[0]].flatten(0, 1)[:T][None]
        vc = pool.value_blocks[table[0]].flatten(0, 1)[:T][None]
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), enable_gqa=True
        )

    lean = functools.partial(lean_decode_attention, num_workers=workers, tile_size=tile)
    return {
        "sdpa": lambda: sdpa().transpose(1, 2),
        "flash_decoding": lambda: decode_attention(q, k, v, lens),
        "lean": lambda: lean(q, k, v, lens),
        "paged_sdpa": lambda: paged_sdpa().transpose(1, 2),
        "paged_partitions": lambda: paged_decode_attention(q, pool, [sid], partition_blocks=1)[:, None],
        "paged_lean": lambda: lean(q, pool.key_blocks, pool.value_blocks, lens, block_table=table),
    }


def _row(name: str, T: int, fn, base, ref: torch.Tensor, repeats: int, device: str) -> dict:
    with torch.no_grad():
        err = (fn().float().reshape(ref.shape) - ref).abs().max().item()
        t, mem, n = timings_and_memory(fn, repeats, device, baseline=None if name == "sdpa" else base)
    own = t.a if isinstance(t, PairedTimes) else t
    row = {"method": name, "T": T, "ms": 1e3 * own.median, "ms_min": 1e3 * own.min, "ms_max": 1e3 * own.max}
    row["repeats"] = n
    if isinstance(t, PairedTimes):
        row["x_sdpa"] = statistics.median(b / a for a, b in zip(t.a.times, t.b.times))
        row["paired"] = True
    elif name == "sdpa":
        row["x_sdpa"], row["paired"] = 1.0, True
    else:  # one call slower than the harness's limit: no pairs, the ratio of medians (marked unpaired)
        row["x_sdpa"], row["paired"] = None, False
    row["peak_MiB"] = None if mem is None else mem / 2**20
    row["max_err"] = err
    return row


@suite(
    "decode",
    add_arguments=add_arguments,
    summary="one decoding step over 8k-1M caches: Lean Attention vs SDPA vs Flash-Decoding, contiguous and paged",
    description=__doc__,
)
def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, args.threads))
    lengths = [int(t) for t in args.lengths.split(",")] if args.lengths else (QUICK_LENGTHS if args.quick else LENGTHS)
    names = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
    load_before = load_snapshot()
    rows = []
    for T in lengths:
        fns = decode_methods(T, workers=args.workers, tile=args.tile, block_size=args.block_size, device=args.device)
        with torch.no_grad():
            ref = fns["sdpa"]().float()
        for name in names:
            rows.append(_row(name, T, fns[name], fns["sdpa"], ref, args.repeats, args.device))
            r = rows[-1]
            sdpa_ms = next((x["ms"] for x in rows if x["T"] == T and x["method"] == "sdpa"), None)
            if r["x_sdpa"] is None and sdpa_ms is not None:
                r["x_sdpa"] = sdpa_ms / r["ms"]
            print(f"T={T} {name}: {r['ms']:.2f} ms, x_sdpa {r.get('x_sdpa', float('nan')):.2f}, {r['peak_MiB']} MiB")
        del fns, ref
    load_after = load_snapshot()
    cols = ["method", "T", "ms", "ms_min", "ms_max", "repeats", "x_sdpa", "paired", "peak_MiB", "max_err"]
    print_table(
        "decode step (B=1, H_q=4, H_kv=1, D=32)", rows, [Column(c, key_column=c in ("method", "T")) for c in cols]
    )
    notes = [
        f"load average before {load_before}, after {load_after}",
        f"Lean Attention: {args.workers} workers, tile {args.tile}; paged block size {args.block_size}",
        f"shapes: B=1, H_q={HEADS}, H_kv={KV_HEADS}, head_dim={HEAD_DIM}, float32; {args.threads} torch thread(s)",
    ]
    for snap in (load_before, load_after):
        warn = busy_warning(snap)
        if warn:
            notes.append(warn)
            break
    out = Path(args.out)
    meta = {"command": command_line(), "machine": machine_info(args.device), "load": [load_before, load_after]}
    write_report(out, "decode", rows, cols, meta=meta, notes=notes)
    png = write_plot(out, rows)
    print(f"report: {out / 'decode.md'}" + (f", plot: {out / png}" if png else ""))


def write_plot(out: Path, rows: list[dict]) -> str | None:
    """``decode.png``: time (ms) and peak memory beyond the cache (MiB) against the context, log-log."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {"sdpa": "C0", "flash_decoding": "C1", "lean": "C2"}
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == name), key=lambda r: r["T"])
        base = name.removeprefix("paged_")
        style = dict(
            color=colors.get(base, "C3"),
            linestyle="--" if name.startswith("paged") else "-",
            marker="o" if not name.startswith("paged") else "s",
            label=name,
        )
        axes[0].plot([r["T"] for r in rs], [r["ms"] for r in rs], **style)
        mem = [(r["T"], max(r["peak_MiB"] or 0.0, 0.05)) for r in rs if r["peak_MiB"] is not None]
        axes[1].plot([m[0] for m in mem], [m[1] for m in mem], **style)
    for ax, label in zip(
        axes, ("time per decode step (ms, median)", "peak memory beyond the cache (MiB; 0 drawn at 0.05)")
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached tokens")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("one decode step, B=1, H_q=4, H_kv=1, D=32, float32 CPU (busy shared machine: see the report)")
    fig.tight_layout()
    fig.savefig(out / "decode.png", dpi=110)
    plt.close(fig)
    return "decode.png"
