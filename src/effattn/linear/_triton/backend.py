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

__all__ = [
    "AUTO_MAX_DIM",
    "BACKENDS",
    "choose_backend",
    "interpret_mode",
    "jit",
    "pow2",
    "resolve_backend",
    "triton_linear_status",
]

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


#: ``auto`` runs the Triton kernels only where every head's ``[K, V]`` state fits this bound in both dims
#: (the kernels keep a head's whole state and its ``C x K`` / ``C x V`` tiles on chip; the issue's settings,
#: head dims 64 and 128, are inside it). ``backend="triton"`` runs larger dims when asked for.
AUTO_MAX_DIM = 128
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def choose_backend(
    backend: str,
    device_type: str,
    dtype: torch.dtype,
    key_dim: int,
    value_dim: int,
    *,
    triton: tuple[bool, str] | None = None,
) -> tuple[str, str]:
    """``(choice, reason)``: which kernels (``"torch"`` or ``"triton"``) a chunk-form call with tensors on
    ``device_type`` of ``dtype`` and a ``[key_dim, value_dim]`` state per head runs, and why.

    Rule: ``"torch"`` is the PyTorch chunk form; ``"triton"`` the Triton kernels, raising where they cannot
    run (Triton missing, CPU tensors without ``TRITON_INTERPRET=1``, float64); ``"auto"`` is Triton on CUDA
    tensors when the kernels cover the call (Triton importable, dtype float16/bfloat16/float32, ``key_dim``
    and ``value_dim`` at most :data:`AUTO_MAX_DIM`) and PyTorch otherwise, never Triton on the CPU (the
    interpreter is for tests). ``triton`` overrides :func:`triton_linear_status` (``(can_run, why)``) so the
    decision can be shown without the device.

    Example::

        >>> choose_backend("auto", "cuda", torch.bfloat16, 64, 64, triton=(True, ""))[0]
        'triton'
        >>> choose_backend("auto", "cpu", torch.float32, 64, 64)[0]
        'torch'
        >>> choose_backend("auto", "cuda", torch.float32, 273, 64, triton=(True, ""))[1]  # Based's Taylor features
        'auto: state [273, 64] per head exceeds 128 in a dim (the kernels keep it on chip); PyTorch chunk form'
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch", "asked for"
    ok, why = triton if triton is not None else triton_linear_status(torch.device(device_type))
    if backend == "triton":
        if not ok:
            raise RuntimeError(f"backend='triton' cannot run on {device_type} tensors: {why}")
        if dtype == torch.float64:
            raise ValueError("backend='triton' computes in float32: got float64 inputs (use backend='torch')")
        return "triton", "asked for"
    if device_type != "cuda":
        return "torch", (
            f"auto: {device_type} tensors run the PyTorch chunk form (the Triton kernels run by auto on CUDA only; "
            "on the CPU with backend='triton' under TRITON_INTERPRET=1, for tests)"
        )
    if not ok:
        return "torch", f"auto: {why}; PyTorch chunk form"
    if dtype not in _TRITON_DTYPES:
        return "torch", f"auto: dtype {dtype} (the kernels take float16/bfloat16/float32); PyTorch chunk form"
    if max(key_dim, value_dim) > AUTO_MAX_DIM:
        return "torch", (
            f"auto: state [{key_dim}, {value_dim}] per head exceeds {AUTO_MAX_DIM} in a dim "
            "(the kernels keep it on chip); PyTorch chunk form"
        )
    return "triton", "auto: CUDA tensors and the Triton kernels cover the call"


def resolve_backend(backend: str, x: torch.Tensor, value_dim: int | None = None) -> str:
    """``"torch"`` or ``"triton"`` for a chunk-form call whose q (or k) is ``x`` (``[..., K]``) and whose
    values have ``value_dim`` channels (default K): :func:`choose_backend` on ``x``'s device and dtype.

    Example::

        >>> resolve_backend("auto", torch.zeros(1))
        'torch'
    """
    K = int(x.shape[-1]) if x.dim() else 1
    return choose_backend(backend, x.device.type, x.dtype, K, K if value_dim is None else int(value_dim))[0]


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
