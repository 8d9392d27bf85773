"""Start a local process group and run a function on every rank (tests, examples, benchmarks).

:func:`spawn` starts ``world_size`` processes with ``torch.multiprocessing``, joins them into one
``torch.distributed`` default process group over the loopback interface (``127.0.0.1``, a free
port chosen by binding port 0; no other address is ever used), runs ``fn(rank, world_size, *args)``
on each, destroys the group and hands the per-rank return values back to the caller in rank order.

A rank that raises must not leave the others hanging: the group is created with ``timeout`` (every
collective and receive gives up after it), the failure is reported to the parent at once, and the
parent stops the remaining ranks after a short grace period and raises :class:`RankError` with the
failing rank's traceback text. Under ``torchrun`` none of this is needed: call the collective ops
directly after ``torch.distributed.init_process_group``.
"""

from __future__ import annotations

import datetime
import math
import os
import pickle
import queue as queue_module
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from effattn._checks import check_float, check_positive_int

__all__ = ["RankError", "free_port", "spawn"]

LOOPBACK = "127.0.0.1"


class RankError(RuntimeError):
    """A rank of :func:`spawn` raised (or died); the message holds its traceback.

    Attributes: ``rank`` (the first rank that failed), ``exc_type`` (the exception's class name),
    ``remote_traceback`` (its traceback text), ``errors`` (``{rank: traceback text}`` for every rank
    that failed before the others were stopped) and ``original`` (the exception object itself when it
    could be pickled back, else ``None``; also set as ``__cause__``).
    """

    def __init__(self, rank: int, world_size: int, exc_type: str, remote_traceback: str, errors: dict[int, str]):
        self.rank, self.world_size, self.exc_type = rank, world_size, exc_type
        self.remote_traceback, self.errors = remote_traceback, errors
        self.original: BaseException | None = None
        others = sorted(set(errors) - {rank})
        also = f" (ranks {others} failed too)" if others else ""
        super().__init__(
            f"rank {rank} of {world_size} raised {exc_type}{also}; its traceback:\n"
            f"--- rank {rank} ---\n{remote_traceback.rstrip()}"
        )

    def __reduce__(self):
        return (RankError, (self.rank, self.world_size, self.exc_type, self.remote_traceback, self.errors))


_CONSEQUENCES = ("closed by peer", "connection reset", "timed out", "timeout", "broken pipe")


def _is_consequence(exc_type: str, tb: str) -> bool:
    """A rank's error that another rank's failure explains (gloo: peer closed, timed out)."""
    last = tb.strip().splitlines()[-1].lower() if tb.strip() else ""
    return exc_type in ("RuntimeError", "DistBackendError", "DistNetworkError") and any(
        c in last for c in _CONSEQUENCES
    )


def free_port() -> int:
    """A TCP port on ``127.0.0.1`` that was free a moment ago (the OS picks it when binding port 0).

    >>> 0 < free_port() < 65536
    True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, args, port, timeout, backend, threads, results) -> None:
    """One rank: join the group, run ``fn``, report ``(rank, ok, payload, traceback)`` (pickled bytes)."""
    if sys.platform.startswith("linux"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections stay on loopback too
    if threads is not None:
        torch.set_num_threads(threads)
    initialized = False
    try:
        dist.init_process_group(
            backend, init_method=f"tcp://{LOOPBACK}:{port}", rank=rank, world_size=world_size, timeout=timeout
        )
        initialized = True
        out = fn(rank, world_size, *args)
        results.put((rank, True, pickle.dumps(out), ""))
    except BaseException as e:  # noqa: BLE001 - every failure, KeyboardInterrupt included, goes to the parent
        tb = traceback.format_exc()
        try:
            payload = pickle.dumps(e)
            pickle.loads(payload)
        except Exception:  # noqa: BLE001 - an exception that cannot travel is described by its traceback
            payload = None
        results.put((rank, False, (type(e).__name__, payload), tb))
    finally:
        if initialized:
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the result (or error) is already reported
                pass


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: datetime.timedelta | float = datetime.timedelta(seconds=60),
    backend: str = "gloo",
    start_method: str | None = None,
    threads_per_rank: int | None = 1,
    grace: float = 2.0,
    deadline: float | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes in one process group.

    Args:
        fn: the function each rank runs (module-level, so picklable, unless ``start_method="fork"``); its
            return value is pickled back to the caller.
        world_size: number of ranks (processes).
        *args: extra arguments passed to every rank (pickled).
        timeout: the process group's timeout (``datetime.timedelta`` or seconds): a collective or a
            receive that waits longer raises on that rank, so a failing rank never hangs the others.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per rank, chosen by ``fn``).
        start_method: ``"fork"`` (the default on Linux while neither CUDA nor a default process group is
            initialized here: a rank starts in a fraction of a second and ``fn`` may be a closure) or
            ``"spawn"`` (the default otherwise: portable, but each rank imports torch afresh, seconds per
            rank on a small machine).
        threads_per_rank: ``torch.set_num_threads`` in each rank (``None`` keeps torch's default), so
            ranks do not oversubscribe the CPU cores.
        grace: seconds the other ranks get to finish (or report their own errors) after one failed,
            before they are terminated.
        deadline: seconds after which ranks still running are terminated and reported as failed (a
            last guard for a rank stuck outside any collective; ``None``: no limit).

    Returns the list of per-rank results, in rank order. Raises :class:`RankError` naming the first
    rank that failed, with its traceback text (and the exception itself as ``__cause__`` when it could
    be pickled); a rank that dies without reporting (a crash) raises with its exit code.

    Example (with ``"fork"``, the Linux default, ``fn`` may be defined anywhere)::

        >>> def all_reduce_rank(rank, world_size):
        ...     t = torch.tensor([float(rank)])
        ...     torch.distributed.all_reduce(t)
        ...     return rank, t.item()
        >>> spawn(all_reduce_rank, 3)
        [(0, 3.0), (1, 3.0), (2, 3.0)]
    """
    world_size = check_positive_int("world_size", world_size)
    grace = check_float("grace", grace, 0.0, math.inf)
    if deadline is not None:
        deadline = check_float("deadline", deadline, 0.0, math.inf, lo_open=True)
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=check_float("timeout", timeout, 0.0, math.inf, lo_open=True))
    # a forked rank would inherit this process's default group (its sockets included) and CUDA state
    inherited = dist.is_available() and dist.is_initialized()
    if start_method is None:
        linux = sys.platform.startswith("linux")
        start_method = "fork" if linux and not torch.cuda.is_initialized() and not inherited else "spawn"
    if start_method == "fork" and inherited:
        raise ValueError(
            "start_method='fork' cannot be used while this process has a torch.distributed default group "
            "(the ranks would inherit it); use start_method='spawn'"
        )
    if start_method not in ("spawn", "fork", "forkserver"):
        raise ValueError(f"start_method must be 'spawn', 'fork' or 'forkserver', got {start_method!r}")
    for attempt in range(3):
        try:
            return _run(fn, world_size, args, timeout, backend, start_method, threads_per_rank, grace, deadline)
        except RankError as e:
            # the free port was taken between free_port() and rank 0's store binding it: a new port
            tb = e.remote_traceback
            taken = "init_process_group" in tb and "address already in use" in tb.lower()
            if not taken or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _run(fn, world_size, args, timeout, backend, start_method, threads_per_rank, grace, deadline) -> list[Any]:
    """One attempt of :func:`spawn` (arguments already validated)."""
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, args, port, timeout, backend, threads_per_rank, results),
            daemon=False,  # a rank may start its own workers (a DataLoader); the finally below stops every rank
            name=f"effattn-rank{rank}",
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    errors: dict[int, tuple[str, bytes | None, str]] = {}
    first_error_at: float | None = None
    started = time.monotonic()
    try:
        while len(outputs) + len(errors) < world_size:
            try:
                rank, ok, payload, tb = results.get(timeout=0.05)
            except queue_module.Empty:
                for rank, p in enumerate(procs):  # a rank that died without a word (segfault, os._exit, killed)
                    if rank not in outputs and rank not in errors and not p.is_alive():
                        time.sleep(0.2)  # its report may still be in the pipe
                        if results.empty() and rank not in errors:
                            errors[rank] = ("ProcessExit", None, f"process exited with code {p.exitcode} and no result")
                            first_error_at = first_error_at or time.monotonic()
                if first_error_at is not None and time.monotonic() - first_error_at > grace:
                    break
                if deadline is not None and time.monotonic() - started > deadline:
                    for rank in range(world_size):
                        if rank not in outputs and rank not in errors:
                            errors[rank] = ("Timeout", None, f"still running after spawn's deadline of {deadline} s")
                    first_error_at = first_error_at or time.monotonic()
                    break
                continue
            if ok:
                outputs[rank] = pickle.loads(payload)
            else:
                errors[rank] = (payload[0], payload[1], tb)
                first_error_at = first_error_at or time.monotonic()
    finally:  # also reached on KeyboardInterrupt: no rank outlives the call
        unfinished = bool(errors) or len(outputs) < world_size
        for p in procs:
            if p.is_alive() and unfinished:
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    if errors:
        # report the first failure that is not a consequence of another (a peer that closed its
        # connection or a collective that timed out while waiting for the failed rank)
        first = min(errors, key=lambda r: (_is_consequence(*errors[r][::2]), list(errors).index(r)))
        name, payload, tb = errors[first]
        err = RankError(first, world_size, name, tb, {r: e[2] for r, e in errors.items()})
        if payload is not None:
            err.original = pickle.loads(payload)
            raise err from err.original
        raise err
    return [outputs[r] for r in range(world_size)]
