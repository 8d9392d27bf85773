"""The ``effattn`` command line: benchmark suites and the side-by-side comparison of every mechanism.

python -m effattn bench <suite> [options]    one benchmark suite (effattn bench <suite> --help)
python -m effattn compare [options]          which attention for my length and memory budget
python -m effattn train [options]            train an LM (effattn train --help)
python -m effattn --version
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The ``effattn`` parser: ``bench <suite>`` (one sub-command per registered suite, each with its own
    options) and ``compare``.

    Example::

        >>> args = build_parser().parse_args(["bench", "linear", "--quick", "--repeats", "1"])
        >>> args.suite, args.quick, args.repeats, args.out
        ('linear', True, 1, 'bench_out/linear')
    """
    from effattn import __version__
    from effattn.bench import SUITES
    from effattn.bench import compare as compare_module
    from effattn.bench.cli import HelpFormatter, plain_text

    parser = argparse.ArgumentParser(prog="effattn", description=plain_text(__doc__), formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"effattn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = commands.add_parser(
        "bench",
        help="run one benchmark suite (effattn bench --help lists them)",
        description="Run one benchmark suite; effattn bench <suite> --help shows that suite's options. "
        "Reports (JSON, markdown, plots) land in --out, default bench_out/<suite>.",
        formatter_class=HelpFormatter,
    )
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, entry in SUITES.items():
        p = suites.add_parser(name, help=entry.summary, description=entry.description, formatter_class=HelpFormatter)
        entry.add_arguments(p)
    compare = commands.add_parser(
        "compare",
        help="which attention for my length and memory budget: speed, recall (MQAR), reasoning (ListOps)",
        description=plain_text(compare_module.__doc__),
        formatter_class=HelpFormatter,
    )
    compare_module.add_arguments(compare)
    from effattn.train import cli as train_cli

    train = commands.add_parser(
        "train",
        help="train an LM of any mixer pattern (memory options, checkpoints, DDP/FSDP2 under torchrun)",
        description=plain_text(train_cli.__doc__),
        formatter_class=HelpFormatter,
    )
    train_cli.add_arguments(train)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the process's arguments) and run the command."""
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        from effattn.bench.compare import main as compare_main

        compare_main(args)
    elif args.command == "train":
        from effattn.train.cli import main as train_main

        train_main(args)
    elif args.command == "bench":
        from effattn.bench import run_suite

        run_suite(args.suite, args)


if __name__ == "__main__":
    main(sys.argv[1:])
