"""Command-line pieces the benchmark suites share: the help formatter, plain-text help, the common options.

Each suite declares its own options (``add_arguments(parser)``, usually :func:`add_common_arguments`
plus its own flags), so ``python -m effattn bench <suite> --help`` lists that suite's options only.
Every option's help says what it does and its default.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

__all__ = ["HelpFormatter", "add_common_arguments", "plain_text"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter that keeps the description's line breaks (a docstring's paragraphs and lists)."""


_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")


def plain_text(doc: str | None) -> str:
    """A docstring as terminal text: ````code```` -> ``code``, ``:func:`~a.b``` -> ``b``, ``**bold**`` -> ``bold``;
    the common indentation removed.

    Example::

        >>> plain_text("Run ``effattn bench`` on :data:`effattn.linear.REGISTRY` and :func:`~a.b.measure`; **bold**.")
        'Run effattn bench on effattn.linear.REGISTRY and measure; bold.'
    """
    import inspect

    text = inspect.cleandoc(doc or "")

    # a role with "~" shows the last component of the name, as Sphinx does
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    text = text.replace("``", "")
    return re.sub(r"\*\*(.+?)\*\*", r"\1", text)


def _csv(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


def add_common_arguments(
    p: argparse.ArgumentParser,
    suite: str,
    *,
    lengths: Sequence[int],
    quick_lengths: Sequence[int],
    quick: str = "small sizes: a minute or two on 2 CPU cores",
    repeats: int | None = 3,
    lengths_help: str = "comma-separated sequence lengths",
) -> None:
    """``--quick``, ``--lengths``, ``--repeats`` (left out with ``repeats=None``), ``--device`` and ``--out``
    with their defaults in the help text (``--out`` defaults to ``bench_out/<suite>``)."""
    p.add_argument("--quick", action="store_true", help=f"{quick} (lengths {_csv(quick_lengths)})")
    p.add_argument(
        "--lengths",
        type=str,
        default=None,
        metavar="T1,T2,...",
        help=f"{lengths_help} (default: {_csv(lengths)}; with --quick: {_csv(quick_lengths)})",
    )
    if repeats is not None:
        p.add_argument(
            "--repeats",
            type=int,
            default=repeats,
            metavar="N",
            help="timed runs per measurement after a warm-up; the median is reported (default: %(default)s)",
        )
    p.add_argument(
        "--device",
        type=str,
        default="cpu",
        help="torch device to run on, e.g. cpu, cuda, cuda:1 (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        type=str,
        default=f"bench_out/{suite}",
        metavar="DIR",
        help="report folder: JSON, markdown tables and plots are written there (default: %(default)s)",
    )
