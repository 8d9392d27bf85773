"""Re-measure the tiled engine's speed at T=16384 after the non-finite fix (issue 21, item 1), paired.

The committed ``bench attention`` and ``bench sparse`` figures (docs/results/attention, docs/results/sparse)
were taken before the fix on a quiet machine. The full suites do not fit a busy shared machine's time
budget, so this script times the rows that run on the tiled engine back to back with SDPA causal, the
same way ``bench sparse --paired`` does (``effattn.bench.harness.paired_times``: a warm-up of each, then
``--repeats`` pairs of forward+backward calls; ratio = median over pairs of time(SDPA) / time(row)), at
the suites' sizes (B=1, H=4, D=64, float32, inputs as ``bench sparse``'s random ones):

- ``tiled causal``, ``tiled window=256`` (``effattn.exact.attention(..., backend="tiled")``);
- the sparse methods named by ``--methods`` (default: every registered one), causal where they have a
  causal mode, with their ``make_params(T)``.

Usage: ``python docs/results/sparse/remeasure_16k.py [--length 16384] [--repeats 3] [--methods a,b]``;
writes ``remeasure_16k.json`` and ``remeasure_16k.md`` next to itself, with the load average before and
after each row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from effattn.bench import harness
from effattn.exact import attention
from effattn.sparse import REGISTRY

B, H, D = 1, 4, 64


def fwd_bwd(forward, leaves):
    """One forward+backward call (a fixed upstream gradient; the leaves' gradients cleared)."""

    def run():
        o = forward()
        o.backward(harness.upstream_gradient(o))
        for x in leaves:
            x.grad = None

    return run


def rows_to_measure(T: int, methods: list[str]):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g).requires_grad_(True) for _ in range(3))
    yield "exact", "tiled causal", (lambda: attention(q, k, v, causal=True, backend="tiled")), [q, k, v]
    yield "exact", "tiled window=256", (lambda: attention(q, k, v, causal=True, window=256, backend="tiled")), [q, k, v]
    for name in methods:
        m = REGISTRY[name]
        causal = True in m.causal_modes
        params = m.make_params(T)
        yield "sparse", name, (lambda m=m, c=causal, p=params: m.attend(q, k, v, causal=c, **p)), [q, k, v]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=16384, help="sequence length (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="back-to-back pairs per row (default: %(default)s)")
    p.add_argument("--methods", type=str, default=None, help="comma-separated sparse methods (default: all)")
    args = p.parse_args()
    T = args.length
    methods = args.methods.split(",") if args.methods else sorted(REGISTRY)
    sq, sk, sv = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    sdpa = fwd_bwd(lambda: F.scaled_dot_product_attention(sq, sk, sv, is_causal=True), [sq, sk, sv])
    out = Path(__file__).parent
    rows, start = [], harness.load_snapshot()
    print(f"T={T}; load before: {start}", flush=True)
    for family, name, forward, leaves in rows_to_measure(T, methods):
        before = harness.load_snapshot()
        pair = harness.paired_times(sdpa, fwd_bwd(forward, leaves), repeats=args.repeats)
        row = {"family": family, "row": name, "T": T, "speedup_vs_sdpa_causal_paired": pair.ratio}
        row |= {"row_s": pair.b.median, "row_s_min": pair.b.min, "row_s_max": pair.b.max}
        row |= {"sdpa_s": pair.a.median, "sdpa_s_min": pair.a.min, "sdpa_s_max": pair.a.max, "pairs": pair.a.n}
        row |= {"load_before": before["load_1m"], "load_after": harness.load_snapshot()["load_1m"]}
        row["flags"] = "; ".join(
            harness.timing_flags(
                {"fwd_bwd_ms": row["row_s"], "fwd_bwd_ms_min": row["row_s_min"], "fwd_bwd_ms_max": row["row_s_max"]}
            )
        )
        rows.append(row)
        print(row, flush=True)
        meta = {
            "command": "python docs/results/sparse/remeasure_16k.py "
            + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
            "machine": harness.machine_info(),
            "load_start": start,
            "load_end": harness.load_snapshot(),
        }
        (out / "remeasure_16k.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        cols = ["family", "row", "T", "speedup_vs_sdpa_causal_paired", "row_s", "row_s_min", "row_s_max"]
        cols += ["sdpa_s", "sdpa_s_min", "sdpa_s_max", "pairs", "load_before", "load_after", "flags"]
        harness.write_report(
            out,
            "remeasure_16k",
            rows,
            cols,
            meta=meta,
            notes=[
                "speedup_vs_sdpa_causal_paired = median over back-to-back pairs of time(SDPA causal fwd+bwd) / "
                "time(row fwd+bwd); row_s / sdpa_s: medians (min, max) of the same calls",
                "load_before / load_after: 1-minute load average around each row (2 CPU cores)",
            ],
        )


if __name__ == "__main__":
    main()
