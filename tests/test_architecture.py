"""The house rules that import-linter cannot state (its floors run in ``make lint``).

- no module imports an underscore-prefixed name from another module (a shared helper gets a public
  name in a private module, or in its family's ``__init__``);
- a family imports another family only through that family's ``__init__`` (``from effattn.exact import
  attention``, never ``from effattn.exact.tiled import ...``);
- no source file over 600 lines except the tiled engine (one method or mixer per file);
- every registry is the one generic :class:`effattn._registry.Registry`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "effattn"
FILES = sorted(SRC.rglob("*.py"))
MAX_LINES = 600
LONG_ALLOWED = {SRC / "exact" / "tiled.py"}


def _private_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("effattn"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno} imports {alias.name} from {node.module}")
    return found


def _cross_family_submodule_imports(path: Path) -> list[str]:
    rel = path.relative_to(SRC)
    if len(rel.parts) < 2:  # effattn/__init__.py, __main__.py, _checks.py, _registry.py: not a family
        return []
    family = rel.parts[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for mod in names:
            parts = mod.split(".")
            if parts[0] == "effattn" and len(parts) > 2 and parts[1] != family and not parts[1].startswith("_"):
                found.append(f"{rel}:{node.lineno} imports {mod}")
    return found


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_families_meet_through_init(path):
    assert _cross_family_submodule_imports(path) == []


def test_sources_exist():
    assert len(FILES) > 50


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_name_imported_across_modules(path):
    assert _private_imports(path) == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_file_length(path):
    if path in LONG_ALLOWED:
        return
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)} has {n} lines (> {MAX_LINES}): split it by responsibility"


def test_registries_are_one_mechanism():
    from effattn._registry import Registry
    from effattn.bench import SUITES
    from effattn.kv import POLICIES
    from effattn.linear import REGISTRY as LINEAR
    from effattn.nn import MIXERS
    from effattn.sparse import REGISTRY as SPARSE

    registries = {"linear": LINEAR, "sparse": SPARSE, "mixers": MIXERS, "policies": POLICIES, "suites": SUITES}
    for name, reg in registries.items():
        assert isinstance(reg, Registry), f"{name} is a {type(reg).__name__}, not a Registry"
        assert len(reg) > 0, f"{name} registry is empty"


def test_private_import_check_can_fail(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("from effattn.exact.tiled import _Plan\n")
    global SRC
    old, SRC = SRC, tmp_path
    try:
        assert _private_imports(bad) == ["m.py:1 imports _Plan from effattn.exact.tiled"]
    finally:
        SRC = old
