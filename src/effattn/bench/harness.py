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
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


SPREAD_LIMIT = 1.5  # a timing whose max / min over its repeats exceeds this is flagged (see timing_flags)


@dataclass(frozen=True)
class TimeStats:
    """The timings of repeated calls of one function, in seconds, in the order they ran.

    Example::

        >>> s = TimeStats((0.012, 0.010, 0.015))
        >>> s.n, s.median, s.min, s.max, round(s.spread, 2)
        (3, 0.012, 0.01, 0.015, 1.5)
    """

    times: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    @property
    def spread(self) -> float:
        """``max / min`` over the repeats (1 = every repeat took the same time)."""
        return self.max / self.min if self.min > 0 else float("inf")


def time_stats(
    fn: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device="cpu",
    clock: Callable[[], float] | None = None,
) -> TimeStats:
    """Wall time of each of ``repeats`` calls of ``fn()`` after ``warmup`` untimed calls.

    ``clock``: a function returning seconds (default ``time.perf_counter``, looked up at each call).

    Example::

        >>> ticks = iter([0.0, 0.5, 1.0, 3.0])  # a fake clock: the calls take 0.5 s and 2 s
        >>> time_stats(lambda: None, repeats=2, warmup=0, clock=lambda: next(ticks)).times
        (0.5, 2.0)
    """
    clock = clock or time.perf_counter  # looked up per call, so a patched time.perf_counter is honoured
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        sync(device)
        times.append(clock() - t0)
    return TimeStats(tuple(times))


def measure_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, device="cpu") -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    return time_stats(fn, repeats=repeats, warmup=warmup, device=device).median


@dataclass(frozen=True)
class PairedTimes:
    """Timings of two functions called back to back ``n`` times: pair ``i`` is ``(a.times[i], b.times[i])``.

    ``ratio`` is the median over pairs of ``a_i / b_i``. On a machine whose speed drifts over minutes (a
    shared VM, another job starting), each ratio compares two calls made under the same load, so the
    drift cancels within a pair, where a ratio of two medians taken minutes apart carries it.
    """

    a: TimeStats
    b: TimeStats

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(x / y for x, y in zip(self.a.times, self.b.times))

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


def paired_times(
    fn_a: Callable[[], object],
    fn_b: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device="cpu",
    clock: Callable[[], float] | None = None,
) -> PairedTimes:
    """``repeats`` back-to-back pairs ``fn_a(); fn_b()`` after ``warmup`` untimed calls of each.

    Example (a fake clock: ``a`` takes twice as long as ``b``; the machine is 10x slower from t = 4 s on)::

        >>> now, cost = [0.0], {"a": 2.0, "b": 1.0}
        >>> def call(name):
        ...     now[0] += cost[name] * (10 if now[0] >= 4 else 1)
        >>> a = time_stats(lambda: call("a"), repeats=2, warmup=0, clock=lambda: now[0])
        >>> b = time_stats(lambda: call("b"), repeats=2, warmup=0, clock=lambda: now[0])
        >>> a.median / b.median  # one after the other: the slow-down falls on b alone
        0.2
        >>> paired_times(lambda: call("a"), lambda: call("b"), repeats=2, warmup=0, clock=lambda: now[0]).ratio
        2.0
    """
    clock = clock or time.perf_counter
    for fn in (fn_a, fn_b):
        for _ in range(warmup):
            fn()
    sync(device)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in zip((fn_a, fn_b), times):
            t0 = clock()
            fn()
            sync(device)
            out.append(clock() - t0)
    return PairedTimes(TimeStats(tuple(times[0])), TimeStats(tuple(times[1])))


def paired_ratio(fn_a: Callable[[], object], fn_b: Callable[[], object], *, repeats: int = 5, device="cpu") -> float:
    """Median over ``repeats`` back-to-back pairs of ``time(fn_a) / time(fn_b)`` (after one warm-up of each):
    :attr:`PairedTimes.ratio` of :func:`paired_times`."""
    return paired_times(fn_a, fn_b, repeats=repeats, device=device).ratio


SLOW_CALL_S = 5.0  # a first call slower than this is the only timing of time_and_memory (n = 0)


def time_and_memory(fn: Callable[[], object], repeats: int, device="cpu") -> tuple[float, int | None, int]:
    """``(seconds, peak bytes, n)``: peak memory of a first call, then the median time of ``repeats`` further calls.

    A first call slower than :data:`SLOW_CALL_S` is the one timing (``n = 0`` further calls): one-time
    initialisation belongs in a warm-up at a small size, and at such lengths one call's noise is small.
    """
    stats, mem, n = timings_and_memory(fn, repeats, device)
    return stats.median, mem, n


def timings_and_memory(
    fn: Callable[[], object], repeats: int, device="cpu", baseline: Callable[[], object] | None = None
) -> tuple[TimeStats | PairedTimes, int | None, int]:
    """:func:`time_and_memory` with every timing kept: ``(TimeStats, peak bytes, n)``; with ``baseline``,
    the ``repeats`` timings are pairs ``fn(); baseline()`` (:func:`paired_times`, the baseline warmed up
    once first) and the first element is the :class:`PairedTimes` (``.a`` = ``fn``'s timings).

    A first call slower than :data:`SLOW_CALL_S` is the one timing (``TimeStats`` of that call alone,
    no pairs, ``n = 0``)."""
    t0 = time.perf_counter()
    mem = measure_peak_memory(fn, device=device)
    sync(device)
    first = time.perf_counter() - t0
    if first > SLOW_CALL_S:
        return TimeStats((first,)), mem, 0
    if baseline is None:
        return time_stats(fn, repeats=repeats, warmup=0, device=device), mem, repeats
    baseline()
    return paired_times(fn, baseline, repeats=repeats, warmup=0, device=device), mem, repeats


_UPSTREAM: dict[tuple, torch.Tensor] = {}


def upstream_gradient(o: torch.Tensor) -> torch.Tensor:
    """A fixed random output gradient per (shape, dtype, device): every timed backward gets the same one."""
    key = (tuple(o.shape), o.dtype, o.device)
    if key not in _UPSTREAM:
        if len(_UPSTREAM) >= 4:  # a few shapes at a time: a method and the baseline it is paired with
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
    baseline: tuple[Callable[[], torch.Tensor], Sequence[torch.Tensor]] | None = None,
) -> dict:
    """Forward (under ``no_grad``) and forward+backward (gradients of ``leaves``) of ``forward()``.

    Row keys: ``fwd_ms`` (median) with ``fwd_ms_min``, ``fwd_ms_max`` over the repeats, ``fwd_peak_MiB``,
    ``repeats`` (``"n_fwd/n_fwd_bwd"``, see :func:`time_and_memory`) and with ``backward`` ``fwd_bwd_ms``,
    ``fwd_bwd_ms_min``, ``fwd_bwd_ms_max``, ``fwd_bwd_peak_MiB``; with ``flops`` (forward FLOPs)
    ``fwd_GFLOP``, ``fwd_eff_%`` = 100 flops / time / ``gemm`` and ``fwd_bwd_eff_%`` with the backward
    counted ``bwd_factor`` times the forward (FlashAttention's benchmark convention is 2.5).

    With ``baseline = (forward, leaves)`` of another computation, every timed call is followed by the same
    call of the baseline (:func:`paired_times`): ``fwd_speedup_paired`` (and ``fwd_bwd_speedup_paired``) is
    the median over pairs of ``time(baseline) / time(this)`` (> 1: faster than the baseline), and
    ``baseline_fwd_ms`` (``baseline_fwd_bwd_ms``) the baseline's median within the pairs.

    Example::

        >>> x = torch.randn(64, 64, requires_grad=True)
        >>> row = measure_forward_backward(lambda: x @ x, [x], repeats=1, flops=2 * 64**3, gemm=1e9)
        >>> row["fwd_bwd_ms_min"] <= row["fwd_bwd_ms"] <= row["fwd_bwd_ms_max"], row["repeats"] in ("1/1", "0/0")
        (True, True)
        >>> y = torch.randn(64, 64, requires_grad=True)
        >>> row = measure_forward_backward(lambda: x @ x, [x], repeats=3, baseline=(lambda: y @ y @ y, [y]))
        >>> row["fwd_bwd_speedup_paired"] > 0, "baseline_fwd_bwd_ms" in row
        (True, True)
    """

    def no_grad(f):
        def run():
            with torch.no_grad():
                f()

        return run

    def with_grad(f, xs):
        def run():
            o = f()
            o.backward(upstream_gradient(o))
            for x in xs:
                x.grad = None

        return run

    def mib(x: int | None) -> float | None:
        return None if x is None else x / 2**20

    def timed(key: str, fn, base) -> tuple[float, int | None, int]:
        t, mem, n = timings_and_memory(fn, repeats, device, base)
        own = t.a if isinstance(t, PairedTimes) else t
        row.update({f"{key}_ms": 1e3 * own.median, f"{key}_ms_min": 1e3 * own.min, f"{key}_ms_max": 1e3 * own.max})
        if isinstance(t, PairedTimes):
            row[f"{key}_speedup_paired"] = statistics.median(b / a for a, b in zip(t.a.times, t.b.times))
            row[f"baseline_{key}_ms"] = 1e3 * t.b.median
        return own.median, mem, n

    row: dict = {}
    base_f = base_fb = None
    if baseline is not None:
        base_f, base_fb = no_grad(baseline[0]), with_grad(baseline[0], baseline[1])
    t_f, m_f, n_f = timed("fwd", no_grad(forward), base_f)
    row.update({"fwd_peak_MiB": mib(m_f), "repeats": f"{n_f}/-"})
    if flops is not None:
        row["fwd_GFLOP"] = flops / 1e9
        row["fwd_eff_%"] = 100 * flops / t_f / gemm
    if backward:
        t_fb, m_fb, n_fb = timed("fwd_bwd", with_grad(forward, leaves), base_fb)
        row.update({"fwd_bwd_peak_MiB": mib(m_fb), "repeats": f"{n_f}/{n_fb}"})
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


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages (``os.getloadavg``): processes running or waiting for a core."""
    try:
        return os.getloadavg()
    except (OSError, AttributeError):  # not available on this system
        return None


def load_snapshot() -> dict:
    """What else the machine was doing: ``load_1m``, ``load_5m``, ``load_15m`` (None where unknown),
    ``cpu_count`` and ``torch_threads``. Taken before and after a measurement, it tells whether other
    processes competed for the cores while it ran.

    Example::

        >>> snap = load_snapshot()
        >>> sorted(snap), snap["cpu_count"] >= 1
        (['cpu_count', 'load_15m', 'load_1m', 'load_5m', 'torch_threads'], True)
    """
    load = load_average()
    snap = dict(zip(("load_1m", "load_5m", "load_15m"), load or (None, None, None)))
    return {**snap, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def busy_warning(snapshot: dict) -> str | None:
    """A warning when the 1-minute load average exceeds the CPU count (more runnable processes than
    cores: timings then include waits for a core), else None.

    Example::

        >>> print(busy_warning({"load_1m": 9.5, "cpu_count": 2, "torch_threads": 2}))
        load average 9.5 above the 2 CPU cores: other processes compete for them, timings are inflated and noisy...
        >>> busy_warning({"load_1m": 0.4, "cpu_count": 2, "torch_threads": 2}) is None
        True
    """
    load, cores = snapshot.get("load_1m"), snapshot.get("cpu_count")
    if load is None or not cores or load <= cores:
        return None
    return (
        f"load average {load:.1f} above the {cores} CPU cores: other processes compete for them, "
        "timings are inflated and noisy; read the paired ratios"
    )


TIMING_LABELS = {"fwd_ms": "fwd", "fwd_bwd_ms": "f+b", "step_us": "step"}


def timing_flags(row: dict, keys: Sequence[str] = ("fwd_ms", "fwd_bwd_ms"), limit: float = SPREAD_LIMIT) -> list[str]:
    """Why a stored timing row should be read with care: a timing whose spread over its repeats,
    ``key_max / key_min``, exceeds ``limit`` (``"f+b spread 2.1x"``), and a forward median above the
    forward+backward median (``"fwd > f+b"``: impossible for one call, so the machine changed speed
    between the two timings).

    Example::

        >>> timing_flags({"fwd_ms": 9.0, "fwd_ms_min": 5.0, "fwd_ms_max": 12.0, "fwd_bwd_ms": 8.0})
        ['fwd spread 2.4x', 'fwd > f+b']
        >>> timing_flags({"fwd_ms": 2.0, "fwd_ms_min": 1.9, "fwd_ms_max": 2.1, "fwd_bwd_ms": 6.0})
        []
    """
    flags = []
    for key in keys:
        lo, hi = row.get(f"{key}_min"), row.get(f"{key}_max")
        if lo is not None and hi is not None and lo > 0 and hi / lo > limit:
            flags.append(f"{TIMING_LABELS.get(key, key)} spread {hi / lo:.1f}x")
    f, fb = row.get("fwd_ms"), row.get("fwd_bwd_ms")
    if f is not None and fb is not None and f > fb:
        flags.append("fwd > f+b")
    return flags


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


def run_guarded_gpu(fn: Callable[[], dict]) -> dict:
    """:func:`run_guarded` for the GPU comparisons: ``fn()``, or ``{"error": ...}`` for any exception (on a GPU a
    kernel can fail to compile: Triton's ``CompilationError`` and ``OutOfResources`` are no ``RuntimeError``s, and
    the run must go on to the next row). The traceback is printed (it lands in the run's log); the row keeps the
    exception's type and first line.

    Example::

        >>> run_guarded_gpu(lambda: 1 / 0)["error"]  # doctest: +ELLIPSIS
        Traceback ...
        'ZeroDivisionError: division by zero'
    """
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a failed row is reported, the run goes on
        traceback.print_exc(file=sys.stdout)
        first = (str(e).strip().splitlines() or [""])[0]
        return {"error": f"{type(e).__name__}: {first[:200]}"}
