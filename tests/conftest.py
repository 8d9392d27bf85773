"""Suite-wide fixtures: every test starts from the same seeds, so its data never depend on test order."""

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    """Seed torch, Python's ``random`` and numpy (when present) to 0 before each test."""
    torch.manual_seed(0)
    random.seed(0)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(0)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: runs on CUDA tensors when a GPU is present (else on the CPU, e.g. in Triton's interpreter)"
    )


# The external cross-checks that must visibly run in CI: fla's reference forms (tests/linear/test_consistency.py)
# and Triton's interpreter (the Triton kernels' tests). One line in the terminal summary says how many ran.
def _external_check(nodeid: str) -> str | None:
    if "test_consistency.py" in nodeid and "fla" in nodeid:
        return "fla"
    return "triton" if "triton" in nodeid else None


def pytest_terminal_summary(terminalreporter):
    counts: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            name = _external_check(getattr(report, "nodeid", ""))
            # a pass is reported once per phase: count the call; a skip or failure in any phase counts
            if name is None or (outcome == "passed" and report.when != "call"):
                continue
            counts.setdefault(name, {}).setdefault(outcome, 0)
            counts[name][outcome] += 1
    if counts:
        parts = [f"{n}: " + ", ".join(f"{k} {o}" for o, k in sorted(c.items())) for n, c in sorted(counts.items())]
        terminalreporter.write_line("external cross-checks run: " + "; ".join(parts))
