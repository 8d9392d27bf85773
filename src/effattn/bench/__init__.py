"""Benchmark suites: ``python -m effattn bench <suite>`` (see each suite's module docstring).

A suite is one module that registers a :class:`Suite` with :func:`suite`: its name, its command-line
options (``add_arguments(parser)``) and its ``run(args)``. :data:`SUITES` is an
:class:`effattn._registry.Registry` that imports every module of this package on first lookup, so a
new suite is one module and nothing else to edit; the command line lists what is registered.

Example::

    >>> from effattn.bench import SUITES
    >>> {"attention", "kv", "linear", "models", "sparse"} <= set(SUITES.names())
    True
    >>> SUITES["linear"].summary
    'every linear op against SDPA causal: time, memory, efficiency, crossover, decode'
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from effattn._registry import Registry
from effattn.bench.cli import plain_text

__all__ = ["SUITES", "Suite", "run_suite", "suite"]


@dataclass(frozen=True)
class Suite:
    """One benchmark suite: ``run(args)`` with the options ``add_arguments(parser)`` declares;
    ``summary`` (one line, for ``effattn bench --help``) and ``description`` (plain text, for
    ``effattn bench <name> --help``)."""

    name: str
    run: Callable[[argparse.Namespace], None]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    summary: str
    description: str = ""

    def __call__(self, args: argparse.Namespace) -> None:
        """Run the suite (``SUITES[name](args)``, as when the registry held the run functions)."""
        self.run(args)


SUITES: Registry[Suite] = Registry("benchmark suite", package="effattn.bench")


def suite(
    name: str,
    *,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    summary: str,
    description: str | None = None,
) -> Callable[[Callable[[argparse.Namespace], None]], Callable[[argparse.Namespace], None]]:
    """Decorator registering ``run(args)`` as suite ``name`` in :data:`SUITES`; ``description`` (a
    docstring, usually the suite module's) is shown as plain text by ``--help``."""

    def register(run: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
        SUITES.register(name, Suite(name, run, add_arguments, summary, plain_text(description)))
        return run

    return register


def run_suite(name: str, args: argparse.Namespace) -> None:
    """Run suite ``name`` with parsed options ``args`` (an unknown name exits with the registered names)."""
    if name not in SUITES:
        raise SystemExit(f"unknown benchmark suite {name!r}; choose from {', '.join(SUITES.names())}")
    if not getattr(args, "out", None):
        args.out = f"bench_out/{name}"
    SUITES[name].run(args)
