"""Profile decode steps of ``bench hf``'s Llama config after an 8k prompt (issue 23): full cache, the
StreamingLLM ring, and the general policy path (``ring=False``), with cProfile.

    python docs/results/hf/decode_ring/profile_step.py [--context 8192] [--steps 20] [--out DIR]

Writes ``profile_step.md`` (per-step wall time under the profiler, the functions of the cache and the
attention path with their cumulative time per step, and the top functions by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from pathlib import Path

import torch

import effattn.hf as ehf
from effattn.bench import hf as bench_hf
from effattn.kv import make_policy

WATCH = (
    "_update_ring",
    "_step",
    "_resolve",
    "_reindex_keys",
    "update",
    "_compress",
    "rotate_rope",
    "one_query_attention",
    "attend_compressed",
    "scaled_dot_product_attention",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--out", type=str, default=str(Path(__file__).parent))
    args = p.parse_args()
    torch.set_num_threads(1)
    model = bench_hf.build("llama", ("effattn",))["effattn"]
    ids = torch.randint(1, bench_hf.WIDTH["vocab_size"], (1, args.context), generator=torch.Generator().manual_seed(1))
    cases = {
        "dynamic (full cache)": None,
        f"ring StreamingLLM {args.budget}": True,
        f"general StreamingLLM {args.budget} (ring=False)": False,
    }
    lines = [
        "# One decode step profiled (cProfile)",
        "",
        f"Command: `python docs/results/hf/decode_ring/profile_step.py --context {args.context} --steps {args.steps}`",
        f"(bench hf's Llama config, 1 thread; load average before {os.getloadavg()[0]:.1f}).",
        "Times are under the profiler (inflated by its per-call cost); read them against each other.",
        "",
    ]
    for name, ring in cases.items():
        cache = None
        if ring is not None:
            cache = ehf.CompressedCache(
                make_policy("streaming_llm", budget=args.budget, sinks=4), model=model, ring=ring
            )
        with torch.no_grad():
            kw = {"use_cache": True} if cache is None else {"use_cache": True, "cache": cache}
            out = model(ids, **kw)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                tok = model(tok, cache=past, use_cache=True).logits[:, -1:].argmax(-1)
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            for _ in range(args.steps):
                tok = model(tok, cache=past, use_cache=True).logits[:, -1:].argmax(-1)
            prof.disable()
            wall = (time.perf_counter() - t0) / args.steps
        stats = pstats.Stats(prof)
        lines += [f"## {name}", "", f"{1e3 * wall:.2f} ms per step under the profiler", ""]
        lines += ["| function | calls per step | cumulative ms per step | own ms per step |", "|---|---|---|---|"]
        for (file, line, fn), (_, nc, tt, ct, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][3]):
            if (fn in WATCH and "effattn" in file) or (file == "~" and "scaled_dot_product_attention" in fn):
                where = f"{Path(file).name}:{line}" if line else "builtin"
                lines.append(
                    f"| `{fn}` ({where}) | {nc / args.steps:.0f} | {1e3 * ct / args.steps:.3f} | "
                    f"{1e3 * tt / args.steps:.3f} |"
                )
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(8)
        top = [ln for ln in buf.getvalue().splitlines() if ln.strip()][-9:]
        lines += ["", "Top 8 by own time (all steps):", "", "```", *top, "```", ""]
    lines.append(f"load average after: {os.getloadavg()[0]:.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
