"""Command line: ``python -m effattn bench <suite> [--quick] [--out DIR] [--device cpu]`` and
``python -m effattn compare [--full] [--only speed,recall,listops] [--lengths ...] [--mixers ...]``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    from effattn.bench import SUITE_MODULES, run_suite

    parser = argparse.ArgumentParser(prog="effattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run one benchmark suite")
    b.add_argument("suite", choices=sorted(SUITE_MODULES))
    b.add_argument("--quick", action="store_true", help="small sizes, a minute or two on 2 CPU cores")
    b.add_argument("--lengths", type=str, default=None, help="comma-separated sequence lengths")
    b.add_argument("--out", type=str, default=None, help="report folder (default bench_out/<suite>)")
    b.add_argument("--device", type=str, default="cpu")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--flex", action="store_true", help="also time compiled FlexAttention (slow to compile)")
    b.add_argument("--forward-only", action="store_true", help="skip forward+backward measurements")
    b.add_argument(
        "--paired", action="store_true",
        help="sparse suite: also time SDPA causal back to back with each method (speedup_vs_causal_paired)",
    )
    b.add_argument("--impls", type=str, default=None, help="attention suite: comma-separated implementations")
    b.add_argument("--patterns", type=str, default=None, help="attention suite: comma-separated mask patterns")
    from effattn.bench.kv import add_arguments as add_kv_arguments

    add_kv_arguments(b)
    b.add_argument("--decode-only", action="store_true", help="linear suite: only the decode-step report")
    b.add_argument("--mixers", type=str, default=None, help="models suite: comma-separated mixers (default all)")
    from effattn.bench.compare import add_arguments as add_compare_arguments

    c = sub.add_parser("compare", help="which attention for my length and memory budget: speed, recall, reasoning")
    add_compare_arguments(c)
    args = parser.parse_args(argv)
    if args.command == "compare":
        from effattn.bench.compare import main as compare_main

        compare_main(args)
    if args.command == "bench":
        args.out = args.out or f"bench_out/{args.suite}"
        run_suite(args.suite, args)


if __name__ == "__main__":
    main(sys.argv[1:])
