"""Every ```python block in README.md and docs/*.md runs (examples are part of the API)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks():
    for path in DOCS:
        for i, m in enumerate(re.finditer(r"```python\n(.*?)```", path.read_text(), re.S)):
            yield pytest.param(m.group(1), id=f"{path.name}-{i}")


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_example_runs(code):
    exec(compile(code, "<doc example>", "exec"), {"__name__": "__doc_example__"})


def test_there_are_examples():
    assert len(list(_blocks())) >= 5
