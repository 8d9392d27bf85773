"""Every ```python block in README.md and docs/*.md runs (examples are part of the API)."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks():
    for path in DOCS:
        for i, m in enumerate(re.finditer(r"```python\n(.*?)```", path.read_text(), re.S)):
            yield pytest.param(m.group(1), id=f"{path.name}-{i}")


# optional extras: a block importing one of these is skipped when its package is missing
OPTIONAL = {"transformers": "transformers", "effattn.hf": "transformers"}


def _missing_optional(code: str) -> str | None:
    for module, package in OPTIONAL.items():
        if re.search(rf"^\s*(import|from)\s+{re.escape(module)}\b", code, re.M):
            if importlib.util.find_spec(package) is None:
                return package
    return None


@pytest.fixture
def restore_registries():
    """An example may register a mixer or a KV policy (docs/nn.md, docs/architecture.md); it must not stay
    registered for the tests that run after it in the same process (they iterate over every mixer)."""
    from effattn.kv import POLICIES
    from effattn.nn import MIXERS

    before = {reg: set(reg.keys()) for reg in (MIXERS, POLICIES)}
    yield
    for reg, names in before.items():
        for name in set(reg.keys()) - names:
            reg.unregister(name)


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_example_runs(code, restore_registries):
    if missing := _missing_optional(code):
        pytest.skip(f"needs the optional package {missing}")
    exec(compile(code, "<doc example>", "exec"), {"__name__": "__doc_example__"})


def test_there_are_examples():
    assert len(list(_blocks())) >= 5
