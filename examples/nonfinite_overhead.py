"""What the non-finite rule costs a call with finite inputs: its check against the attention it guards.

Runs, back to back and repeated, a tiled sliding-window (w=256) and a causal forward at T=16k (B=1, H=4,
D=64, float32) and ``effattn.exact.nonfinite_keys`` on the same k and v; prints the medians, the spread and
the per-pair ratio. Usage: ``python examples/nonfinite_overhead.py [--length 16384] [--repeats 5]``.
"""

import argparse
import os
import statistics
import time

import torch

from effattn import attention
from effattn.exact import nonfinite_keys


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=16384, help="sequence length T")
    ap.add_argument("--repeats", type=int, default=5, help="back-to-back pairs per pattern")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.length, 4, 64, generator=g) for _ in range(3))
    print(f"load average before: {os.getloadavg()}")
    for name, kw in (("window=256", {"causal": True, "window": 256}), ("causal", {"causal": True})):
        pairs = []
        for _ in range(args.repeats):
            a = _time(lambda kw=kw: attention(q, k, v, backend="tiled", **kw))
            c = _time(lambda: nonfinite_keys(k, v))
            pairs.append((a, c))
        att, chk = [p[0] for p in pairs], [p[1] for p in pairs]
        ratio = statistics.median(c / a for a, c in pairs)
        print(
            f"T={args.length} {name}: attention median {statistics.median(att) * 1e3:.1f} ms "
            f"[{min(att) * 1e3:.1f}, {max(att) * 1e3:.1f}], check median {statistics.median(chk) * 1e3:.2f} ms "
            f"[{min(chk) * 1e3:.2f}, {max(chk) * 1e3:.2f}], check/attention per pair: median {ratio:.4f} "
            f"({args.repeats} pairs)"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
