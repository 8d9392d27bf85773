"""Triton kernels of the exact family: FlashAttention-2 forward/backward over a BlockMask, split-KV decoding.

Triton is optional: importing this package (and ``effattn``) works without it; :func:`triton_status`
says why the kernels cannot run (Triton missing; CPU tensors without ``TRITON_INTERPRET=1``).

Triton fixes its mode (GPU compiler or CPU interpreter, ``TRITON_INTERPRET=1``) when it is first
imported: its own library functions are decorated then. So nothing here imports triton before a
kernel is launched; the kernel bodies are plain functions that :func:`jit` decorates on first use.
To run the kernels on CPU tensors, set ``TRITON_INTERPRET=1`` before the process imports triton
(the test modules set it at their top); :func:`triton_status` reports a process where triton was
imported in GPU mode first.

Modules: :mod:`.flash_fwd` (forward kernel), :mod:`.flash_bwd` (dK/dV and dQ kernels),
:mod:`.flash` (tile plan from a BlockMask, autograd function), :mod:`.decode` (split-KV decoding over
contiguous and paged caches).

Example::

    >>> ok, why = triton_status(torch.device("cpu"))
    >>> ok or "TRITON_INTERPRET" in why or "not installed" in why
    True
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

__all__ = ["dot_flags", "interpret_mode", "jit", "out_dtype", "triton_status"]

_JITTED: dict = {}


def interpret_mode() -> bool:
    """Whether ``TRITON_INTERPRET`` is set to a true value (kernels then run in Triton's CPU interpreter).

    Example::

        >>> interpret_mode() == (os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"))
        True
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_status(device: torch.device) -> tuple[bool, str]:
    """``(can_run, reason)`` for tensors on ``device``; the reason is empty when the kernels can run.

    Example::

        >>> triton_status(torch.device("meta"))[0]
        False
    """
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu":
        if interpret_mode():
            lang = sys.modules.get("triton.language")
            if lang is not None and type(lang.zeros).__name__ != "InterpretedFunction":
                return False, (
                    "triton was imported before TRITON_INTERPRET=1 was set (its mode is fixed at import): "
                    "set it before the process imports triton"
                )
            return True, ""
        return False, "CPU tensors run only in Triton's interpreter: set TRITON_INTERPRET=1 (slow; for tests)"
    return False, f"device {device.type!r} not supported (cuda, or cpu with TRITON_INTERPRET=1)"


def jit(fn):
    """``triton.jit(fn)`` for the current mode (GPU or interpreter), decorated once per mode and cached."""
    import triton
    import triton.language

    if fn.__globals__.get("tl") is None:
        fn.__globals__["tl"] = triton.language
    key = (fn.__module__, fn.__qualname__, interpret_mode())
    if key not in _JITTED:  # triton reads TRITON_INTERPRET when it decorates
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


def dot_flags(dtype: torch.dtype) -> dict:
    """The kernels' matmul constants for inputs of ``dtype``: ``IO_DT`` (P and dS are rounded to it
    before their matmuls, as FlashAttention does), ``PREC`` (``"ieee"`` for float32: no TF32) and
    ``UPCAST``. Triton's interpreter computes ``tl.dot`` of bfloat16 operands wrongly (numpy has no
    bfloat16) and rounds float32 to bfloat16 toward zero, so under it bf16 operands, exact bf16 values,
    are widened to float32 before every dot, P and dS stay float32, and the host rounds the float32
    outputs to bf16 with PyTorch (:func:`out_dtype`): the interpreter checks the kernels' logic in
    bf16, not the GPU's bf16 rounding of P and dS.
    """
    import triton.language as tl

    upcast = interpret_mode() and dtype == torch.bfloat16
    io = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
    return {
        "IO_DT": tl.float32 if upcast else io,
        "UPCAST": upcast,
        "PREC": "ieee" if dtype == torch.float32 or upcast else "tf32",
    }


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels write for inputs of ``dtype`` (float32 for bf16 under the interpreter: see
    :func:`dot_flags`); the host casts to ``dtype``.

    Example::

        >>> out_dtype(torch.float16)
        torch.float16
    """
    return torch.float32 if interpret_mode() and dtype == torch.bfloat16 else dtype
