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
