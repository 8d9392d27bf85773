"""HiP's selection time vs brute-force block top-k at 16k-64k (:func:`effattn.bench.sparse.hip_selection_cost`).

Run: ``nice -n 5 .venv/bin/python docs/results/hip/hip_selection_cost.py`` (writes hip_selection_cost.json,
.md and .png beside this file; one thread; the machine's load average is recorded before and after).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from effattn.bench.harness import machine_info
from effattn.bench.sparse import hip_selection_cost

HERE = Path(__file__).resolve().parent


def main() -> None:
    torch.set_num_threads(1)
    before = os.getloadavg()
    rows = []
    for kind in ("runs", "clustered"):
        rows += hip_selection_cost((16384, 32768, 65536), block=64, top_k=16, heads=2, repeats=5, kind=kind)
    after = os.getloadavg()
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "load_average_before": before,
        "load_average_after": after,
        "machine": machine_info(),
        "note": "busy shared 2-core CPU (load average above 2 = other jobs running); one thread",
    }
    (HERE / "hip_selection_cost.json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=1))
    lines = [
        f"Command: `{meta['command']}`; B=1, H=2, D=64, block 64, top_k 16, float32, 1 thread; "
        f"load average {before[0]:.1f} before, {after[0]:.1f} after (busy machine).",
        "",
        "| inputs | T | levels | HiP selection s (median [min, max]) | brute force s (median [min, max]) | "
        "brute / HiP (paired) | recall of brute-force blocks |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['T']} | {r['levels']} | "
            f"{r['hip_s']:.4f} [{r['hip_min_s']:.4f}, {r['hip_max_s']:.4f}] | "
            f"{r['brute_s']:.3f} [{r['brute_min_s']:.3f}, {r['brute_max_s']:.3f}] | {r['brute_over_hip']:.1f}x | "
            f"{r['recall']:.2f} |"
        )
    (HERE / "hip_selection_cost.md").write_text("\n".join(lines) + f"\n\n{rows[0]['repeats']} pairs per length.\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for kind, style in (("runs", "-"), ("clustered", ":")):
        rk = [r for r in rows if r["kind"] == kind]
        T = [r["T"] for r in rk]
        for key, label, color in (("hip", "HiP pruning (first key)", "C0"), ("brute", "brute force", "C1")):
            med = [r[f"{key}_s"] for r in rk]
            err = [[m - r[f"{key}_min_s"] for m, r in zip(med, rk)], [r[f"{key}_max_s"] - m for m, r in zip(med, rk)]]
            ax.errorbar(T, med, yerr=err, marker="o", capsize=3, ls=style, color=color, label=f"{label}, {kind} inputs")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("selection time, s (median, min-max)")
    ax.set_title(
        f"Block selection cost, top-16 of T/64 blocks, 2 heads\nbusy 2-core CPU, load {before[0]:.0f}-{after[0]:.0f}"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "hip_selection_cost.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
