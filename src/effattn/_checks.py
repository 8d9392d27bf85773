"""Input validation shared by every family.

Errors are part of the API: each check raises ``ValueError``/``TypeError`` naming the argument,
the shape seen and the shape expected. Nothing here silently fixes input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, ndim: int, layout: str) -> torch.Tensor:
    """``x`` is a floating tensor of rank ``ndim`` (``layout`` names the dims in messages)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have rank {ndim} {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    return x


def check_same_dtype(**tensors: torch.Tensor | None) -> torch.dtype:
    """All given (non-None) tensors share one dtype and one device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    name0, t0 = items[0]
    for n, t in items[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {name0} has {t0.dtype}; cast them to one dtype")
        if t.device != t0.device:
            raise ValueError(f"{n} is on {t.device} but {name0} is on {t0.device}")
    return t0.dtype


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int, int]:
    """Validate the ``[B, T, H, D]`` layout with GQA; returns ``(B, Tq, Tk, Hq, Hkv, Dqk, Dv)``."""
    check_tensor("q", q, 4, "[batch, seq_q, heads_q, head_dim]")
    check_tensor("k", k, 4, "[batch, seq_k, heads_kv, head_dim]")
    check_tensor("v", v, 4, "[batch, seq_k, heads_kv, head_dim_v]")
    check_same_dtype(q=q, k=k, v=v)
    B, Tq, Hq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same seq_k: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same heads_kv: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"q and k head_dim differ: q {tuple(q.shape)} has {D}, k {tuple(k.shape)} has {k.shape[3]}")
    Hkv = k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"heads_q ({Hq}) must be a multiple of heads_kv ({Hkv}) for GQA/MQA: q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    return B, Tq, k.shape[1], Hq, Hkv, D, v.shape[3]


def check_scale(scale: float | None, head_dim: int) -> float:
    """Softmax scale: ``1/sqrt(head_dim)`` by default, else a finite positive number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, torch.Tensor):
        scale = float(scale)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def check_log_gate(name: str, g: torch.Tensor, shape: Sequence[int], layout: str) -> torch.Tensor:
    """A log-space gate (decay): the given shape and every entry <= 0 (finite or -inf)."""
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(g).__name__}")
    if tuple(g.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(g.shape)}")
    if g.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {g.dtype}")
    if torch.isnan(g).any() or (g > 0).any():
        raise ValueError(f"{name} is a log-space gate and must be <= 0 everywhere (got max {g.max().item():.4g})")
    return g


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, batch: int, total: int, name: str = "cu_seqlens"):
    """Packed varlen offsets ``[N + 1]`` (int, starts at 0, non-decreasing, ends at ``total``); batch must be 1."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
        raise TypeError(f"{name} must be a 1-D integer tensor [num_seqs + 1], got {cu_seqlens!r:.80}")
    if batch != 1:
        raise ValueError(f"with {name}, sequences are packed along seq and batch must be 1, got batch {batch}")
    c = cu_seqlens.tolist()
    if len(c) < 2 or c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"{name} must start at 0, be non-decreasing and end at seq length {total}, got {c}")
    return cu_seqlens


def check_int(name: str, value, minimum: int = 0, maximum: int | None = None, allow_none: bool = False) -> int | None:
    """``value`` is an ``int`` (not a ``bool``) in ``[minimum, maximum]``; ``None`` passes when ``allow_none``.

    >>> check_int("heads", 4, minimum=1)
    4
    >>> check_int("heads", 0, minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: heads must be an int >= 1, got 0
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an int {bound}{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_positive_int(name: str, value, allow_none: bool = False) -> int | None:
    """``value`` is an ``int >= 1`` (``None`` passes when ``allow_none``)."""
    return check_int(name, value, minimum=1, allow_none=allow_none)


def check_float(name: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` is a finite real number in the interval ``[lo, hi]`` (ends open where asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be a number in {lb}{lo}, {hi}{rb}, got {value!r}")
    return float(value)


def check_cache_seqlens(
    cache_seqlens: torch.Tensor | None, batch: int, new_tokens: int, max_len: int, device: torch.device
) -> torch.Tensor:
    """Validate a decode call's per-row cache lengths ``[batch]`` (int, in ``[new_tokens, max_len]``);
    ``None`` means every row holds ``max_len`` tokens."""
    if cache_seqlens is None:
        return torch.full((batch,), max_len, dtype=torch.long, device=device)
    if (
        not isinstance(cache_seqlens, torch.Tensor)
        or tuple(cache_seqlens.shape) != (batch,)
        or cache_seqlens.dtype.is_floating_point
    ):
        raise ValueError(f"cache_seqlens must be an int tensor [batch] = [{batch}], got {cache_seqlens!r:.60}")
    if bool((cache_seqlens < new_tokens).any()) or bool((cache_seqlens > max_len).any()):
        raise ValueError(
            f"cache_seqlens must lie in [T_new={new_tokens}, T_max={max_len}], got {cache_seqlens.tolist()}"
        )
    return cache_seqlens
