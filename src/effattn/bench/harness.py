"""Shared measurement machinery for every benchmark suite (DESIGN.md, 'Benchmarks').

- time: median of repeats after warm-up;
- peak memory: CUDA ``max_memory_allocated``; on the CPU the rise of the process's peak resident
  set (``VmHWM``, reset through ``/proc/self/clear_refs``) over the resident set before the call,
  with glibc told, during that one call only, to serve every allocation >= 64 KiB by ``mmap`` so
  freed tensors leave the RSS (timed runs use a fixed 32 MiB threshold instead: forcing ``mmap``
  there would add a page fault to every fresh buffer and slow allocation-heavy code unfairly);
- efficiency: useful FLOP/s over the machine's own matmul FLOP/s measured in the same run.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TIMING_MMAP_THRESHOLD = 32 * 2**20  # glibc's own dynamic threshold settles at most here


def _mallopt(param: int, value: int) -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt(param, value)
    except OSError:  # not glibc: RSS figures are then upper bounds of the truth
        pass


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_mallopt(_M_MMAP_THRESHOLD, _TIMING_MMAP_THRESHOLD)
_mallopt(_M_TRIM_THRESHOLD, 2 * _TIMING_MMAP_THRESHOLD)


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, device="cpu") -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_ratio(fn_a: Callable[[], object], fn_b: Callable[[], object], *, repeats: int = 5, device="cpu") -> float:
    """Median over ``repeats`` back-to-back pairs of ``time(fn_a) / time(fn_b)`` (after one warm-up of each).

    On a machine whose speed drifts over minutes (a shared VM), a ratio of two medians taken minutes apart
    carries the drift; alternating the two calls pairs each timing with one taken under the same load.
    """
    for fn in (fn_a, fn_b):
        fn()
    sync(device)
    ratios = []
    for _ in range(repeats):
        t = []
        for fn in (fn_a, fn_b):
            t0 = time.perf_counter()
            fn()
            sync(device)
            t.append(time.perf_counter() - t0)
        ratios.append(t[0] / t[1])
    return statistics.median(ratios)


SLOW_CALL_S = 5.0  # a first call slower than this is the only timing of time_and_memory (n = 0)


def time_and_memory(fn: Callable[[], object], repeats: int, device="cpu") -> tuple[float, int | None, int]:
    """``(seconds, peak bytes, n)``: peak memory of a first call, then the median time of ``repeats`` further calls.

    A first call slower than :data:`SLOW_CALL_S` is the one timing (``n = 0`` further calls): one-time
    initialisation belongs in a warm-up at a small size, and at such lengths one call's noise is small.
    """
    t0 = time.perf_counter()
    mem = measure_peak_memory(fn, device=device)
    sync(device)
    first = time.perf_counter() - t0
    if first > SLOW_CALL_S:
        return first, mem, 0
    return measure_time(fn, repeats=repeats, warmup=0, device=device), mem, repeats


_UPSTREAM: dict[tuple, torch.Tensor] = {}


def upstream_gradient(o: torch.Tensor) -> torch.Tensor:
    """A fixed random output gradient per (shape, dtype, device): every timed backward gets the same one."""
    key = (tuple(o.shape), o.dtype, o.device)
    if key not in _UPSTREAM:
        _UPSTREAM.clear()
        _UPSTREAM[key] = torch.randn(o.shape, dtype=o.dtype, device=o.device)
    return _UPSTREAM[key]


def measure_forward_backward(
    forward: Callable[[], torch.Tensor],
    leaves: Sequence[torch.Tensor],
    *,
    repeats: int,
    device="cpu",
    flops: float | None = None,
    bwd_factor: float = 2.0,
    gemm: float = 1.0,
    backward: bool = True,
) -> dict:
    """Forward (under ``no_grad``) and forward+backward (gradients of ``leaves``) of ``forward()``.

    Row keys: ``fwd_ms``, ``fwd_peak_MiB``, ``repeats`` (``"n_fwd/n_fwd_bwd"``, see :func:`time_and_memory`)
    and with ``backward`` ``fwd_bwd_ms``, ``fwd_bwd_peak_MiB``; with ``flops`` (forward FLOPs)
    ``fwd_GFLOP``, ``fwd_eff_%`` = 100 flops / time / ``gemm`` and ``fwd_bwd_eff_%`` with the backward
    counted ``bwd_factor`` times the forward (FlashAttention's benchmark convention is 2.5).

    Example::

        >>> x = torch.randn(64, 64, requires_grad=True)
        >>> row = measure_forward_backward(lambda: x @ x, [x], repeats=1, flops=2 * 64**3, gemm=1e9)
        >>> sorted(row)[:4], row["repeats"]
        (['fwd_GFLOP', 'fwd_bwd_eff_%', 'fwd_bwd_ms', 'fwd_bwd_peak_MiB'], '1/1')
    """

    def fwd():
        with torch.no_grad():
            forward()

    def fwd_bwd():
        o = forward()
        o.backward(upstream_gradient(o))
        for x in leaves:
            x.grad = None

    def mib(x: int | None) -> float | None:
        return None if x is None else x / 2**20

    t_f, m_f, n_f = time_and_memory(fwd, repeats, device)
    row = {"fwd_ms": 1e3 * t_f, "fwd_peak_MiB": mib(m_f), "repeats": f"{n_f}/-"}
    if flops is not None:
        row["fwd_GFLOP"] = flops / 1e9
        row["fwd_eff_%"] = 100 * flops / t_f / gemm
    if backward:
        t_fb, m_fb, n_fb = time_and_memory(fwd_bwd, repeats, device)
        row.update({"fwd_bwd_ms": 1e3 * t_fb, "fwd_bwd_peak_MiB": mib(m_fb), "repeats": f"{n_f}/{n_fb}"})
        if flops is not None:
            row["fwd_bwd_eff_%"] = 100 * flops * (1 + bwd_factor) / t_fb / gemm
    return row


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure_peak_memory(fn: Callable[[], object], device="cpu") -> int | None:
    """Bytes by which one call of ``fn()`` raises peak memory above what was in use before it."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    _mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    _mallopt(_M_TRIM_THRESHOLD, 0)
    _malloc_trim()  # hand free heap pages back, so reusing them counts as new resident memory
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        fn()
        return max(0, _status_kib("VmHWM") - base) * 1024
    except OSError:
        return None
    finally:
        _mallopt(_M_MMAP_THRESHOLD, _TIMING_MMAP_THRESHOLD)
        _mallopt(_M_TRIM_THRESHOLD, 2 * _TIMING_MMAP_THRESHOLD)


def matmul_flops_per_second(device="cpu", dtype=torch.float32, sizes=(2048, 4096)) -> float:
    """The machine's own GEMM rate (FLOP/s): the best of several square matmuls into a preallocated
    output, over a few sizes. A ceiling, so the best run counts (a median would let a brief
    disturbance lower the ceiling and inflate every efficiency measured against it)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        for _ in range(2):
            torch.mm(a, b, out=out)
        sync(device)
        for _ in range(5):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def attention_flops(batch: int, heads: int, head_dim: int, head_dim_v: int, allowed_pairs: float) -> float:
    """Useful forward FLOPs of softmax attention: 2*D (QK^T) + 2*Dv (PV) per unmasked (q, k) pair."""
    return batch * heads * allowed_pairs * 2 * (head_dim + head_dim_v)


def machine_info(device="cpu") -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(x):
        if x is None:
            return "—"
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    name: str,
    rows: Sequence[dict],
    columns: Sequence[str],
    *,
    meta: dict,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` (machine, versions, command, table, notes)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": list(rows), "notes": list(notes)}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    md = [f"# effattn benchmark: {name}", "", f"Command: `{meta.get('command', '')}`", ""]
    md += ["Machine: " + ", ".join(f"{k}={v}" for k, v in meta.get("machine", {}).items()), ""]
    md += [format_markdown_table(rows, columns), ""]
    md += [f"- {n}" for n in notes]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    return out / f"{name}.md"


def command_line() -> str:
    return "python -m effattn " + " ".join(sys.argv[1:])


def run_guarded(fn: Callable[[], dict]) -> dict:
    """Run one measurement; an exception (out of memory, unsupported) becomes a row note, not a crash."""
    try:
        return fn()
    except (RuntimeError, ValueError, MemoryError) as e:  # report, go on
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
