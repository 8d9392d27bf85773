"""Before/after the fast chunked form for Titans MAL/MAG/MAC: forward+backward of one mixer layer (width 64,
2 heads, batch 1, chunk 16, MLP depth 2) with whatever ``effattn`` is importable, so the same script times
the tree before the change (``PYTHONPATH=<old tree>/src``) and after it, back to back in one lane job:

    git archive c9f9ee7 src | tar -x -C /tmp/h18a_old         # the tree before the fast form
    PYTHONPATH=/tmp/h18a_old/src python docs/results/memory/before_after.py --label before --out before.json
    python docs/results/memory/before_after.py --label after --out after.json
    python docs/results/memory/before_after.py --table before.json after.json   # markdown table

Median (min-max) of ``--repeats`` runs after one warm-up, 1 thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

MIXERS = (("titans_mal", dict(window=64)), ("titans_mag", dict(window=64)), ("titans_mac", dict(segment=64)))


def measure(lengths: list[int], repeats: int) -> list[dict]:
    import effattn
    from effattn.nn import build_mixer

    rows = []
    for T in lengths:
        for name, kw in MIXERS:
            torch.manual_seed(0)
            layer = build_mixer(name, dim=64, heads=2, chunk_size=16, **kw)
            x = torch.randn(1, T, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
            times = []
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                layer(x)[0].sum().backward()
                if i:
                    times.append(time.perf_counter() - t0)
            ms = [round(1e3 * t, 1) for t in times]
            rows.append({"mixer": name, "T": T, "fwd_bwd_ms": statistics.median(ms), "min": min(ms), "max": max(ms)})
            print(rows[-1], effattn.__file__, flush=True)
    return rows


def table(before: list[dict], after: list[dict]) -> str:
    out = ["| mixer | T | before ms (min-max) | after ms (min-max) | before / after |", "|---|---|---|---|---|"]
    for b, a in zip(before, after):
        ratio = b["fwd_bwd_ms"] / a["fwd_bwd_ms"]
        out.append(
            f"| {b['mixer']} | {b['T']} | {b['fwd_bwd_ms']:.1f} ({b['min']}-{b['max']}) | "
            f"{a['fwd_bwd_ms']:.1f} ({a['min']}-{a['max']}) | {ratio:.2f}x |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="after")
    p.add_argument("--lengths", default="512,2048")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--table", nargs=2, default=None, metavar=("BEFORE", "AFTER"))
    args = p.parse_args()
    if args.table:
        before, after = (json.load(open(f))["rows"] for f in args.table)
        print(table(before, after))
    else:
        torch.set_num_threads(1)
        rows = measure([int(t) for t in args.lengths.split(",")], args.repeats)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"label": args.label, "torch_threads": 1, "rows": rows}, f, indent=1)
