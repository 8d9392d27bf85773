"""Every docstring example of the package runs, and the runner proves it ran them.

Walks every module of ``effattn`` (sub-packages included), runs its doctests, and asserts no failure;
a module whose source holds an example (``>>>``) must report at least one attempted example, and the
package as a whole a floor of examples, so a collection that silently finds nothing fails.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import pkgutil

import pytest
import torch

import effattn

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(effattn.__path__, prefix="effattn.") if info.name != "effattn.__main__"
)
# modules that need an optional package to import
OPTIONAL = {"effattn.hf": "transformers"}


def _import(name: str):
    for prefix, package in OPTIONAL.items():
        if name.startswith(prefix):
            pytest.importorskip(package)
    return importlib.import_module(name)


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name):
    module = _import(name)
    res = doctest.testmod(
        module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert res.failed == 0, f"{name}: {res.failed} of {res.attempted} examples failed"
    if ">>>" in inspect.getsource(module):
        assert res.attempted > 0, f"{name} holds examples but none was attempted"


def test_the_collection_finds_examples():
    """Counted without running them (each module's test above runs its own)."""
    finder = doctest.DocTestFinder()
    found = 0
    for name in MODULES:
        if any(name.startswith(p) and importlib.util.find_spec(pkg) is None for p, pkg in OPTIONAL.items()):
            continue
        found += sum(len(t.examples) for t in finder.find(importlib.import_module(name)))
    assert found >= 100, f"only {found} docstring examples found: the collection is broken"
