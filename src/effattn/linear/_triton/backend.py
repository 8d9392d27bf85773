"""Lazy triton, the interpreter checks and the ``backend=`` selection of the linear Triton kernels.

Triton fixes its mode (GPU compiler or CPU interpreter) when first imported, so nothing here imports
it before a kernel is launched: :func:`jit` decorates the plain kernel functions on first use.

Example::

    >>> pow2(20)
    32
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

__all__ = ["BACKENDS", "interpret_mode", "jit", "pow2", "resolve_backend", "triton_linear_status"]

#: The values of the ``backend`` keyword of the chunk forms.
BACKENDS = ("auto", "torch", "triton")

_JITTED: dict = {}


def interpret_mode() -> bool:
    """Whether ``TRITON_INTERPRET`` is set to a true value (kernels then run in Triton's CPU interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_linear_status(device: torch.device) -> tuple[bool, str]:
    """``(can_run, reason)`` for tensors on ``device``; the reason is empty when the kernels can run
    (CUDA, or CPU under ``TRITON_INTERPRET=1`` set before triton was imported).

    Example::

        >>> triton_linear_status(torch.device("meta"))[0]
        False
    """
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu":
        if not interpret_mode():
            return False, "CPU tensors run only in Triton's interpreter: set TRITON_INTERPRET=1 (slow; for tests)"
        lang = sys.modules.get("triton.language")
        if lang is not None and type(lang.zeros).__name__ != "InterpretedFunction":
            return False, (
                "triton was imported before TRITON_INTERPRET=1 was set (its mode is fixed at import): "
                "set it before the process imports triton"
            )
        return True, ""
    return False, f"device {device.type!r} not supported (cuda, or cpu with TRITON_INTERPRET=1)"


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """``"torch"`` or ``"triton"`` for a call on ``x``: ``"auto"`` is the PyTorch chunk form for now (these
    kernels are checked in Triton's interpreter only; no GPU has compiled or timed them yet, so a user opts in
    with ``backend="triton"``); ``"triton"`` raises where it cannot run.

    Example::

        >>> resolve_backend("auto", torch.zeros(1))
        'torch'
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("torch", "auto"):
        return "torch"
    ok, why = triton_linear_status(x.device)
    if not ok:
        raise RuntimeError(f"backend='triton' cannot run on {x.device.type} tensors: {why}")
    if x.dtype == torch.float64:
        raise ValueError("backend='triton' computes in float32: got float64 inputs (use backend='torch')")
    return "triton"


def jit(fn):
    """``triton.jit(fn)`` for the current mode (GPU or interpreter), decorated once per mode and cached;
    binds the module global ``tl`` of ``fn`` to ``triton.language``."""
    import triton
    import triton.language

    if fn.__globals__.get("tl") is None:
        fn.__globals__["tl"] = triton.language
    key = (fn.__qualname__, interpret_mode())
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


def pow2(n: int, least: int = 16) -> int:
    """The next power of two ``>= n`` and ``>= least`` (tile sizes)."""
    return max(least, 1 << (max(int(n), 1) - 1).bit_length())
