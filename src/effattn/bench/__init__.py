"""Benchmark suites: ``python -m effattn bench <suite>`` (see each suite's module docstring).

A suite registers itself with :func:`suite`; the CLI lists what is registered.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

SUITES: dict[str, Callable[[argparse.Namespace], None]] = {}
# suite name -> module that registers it (imported lazily so one broken suite cannot break the CLI)
SUITE_MODULES = {
    "attention": "effattn.bench.attention",
    "kv": "effattn.bench.kv",
    "linear": "effattn.bench.linear",
    "models": "effattn.bench.models",
    "sparse": "effattn.bench.sparse",
}


def suite(name: str):
    def register(fn):
        SUITES[name] = fn
        return fn

    return register


def run_suite(name: str, args: argparse.Namespace) -> None:
    if name not in SUITE_MODULES:
        raise SystemExit(f"unknown benchmark suite {name!r}; choose from {sorted(SUITE_MODULES)}")
    importlib.import_module(SUITE_MODULES[name])
    SUITES[name](args)
