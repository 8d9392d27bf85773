"""Benchmark suite ``dist``: sequence-parallel methods on local gloo groups, and the cluster model.

``python -m effattn bench dist [--quick] [--lengths 2048] [--world-sizes 1,2,4] [--methods ...] [--repeats 3]``

For each world size P (default 1, 2, 4) the suite starts P processes (``effattn.dist.spawn``: gloo
over 127.0.0.1, one thread per rank), or, under ``torchrun``, uses the running group as one world
size. At a fixed total length T (default 2048; ``B=1``, 8 heads of 64, float32, causal) every rank
holds a T/P shard and runs forward + backward of:

- ``ring`` (:func:`effattn.dist.ring_attention`, zigzag layout), ``token_ring`` (zigzag),
  ``ulysses`` (contiguous), softmax attention;
- ``halo``: causal sliding-window attention (window 512) by the halo exchange;
- ``lasp2``: simple GLA (Mamba-2 SSD) by LASP-2's one all-gather of states;
- ``lasp1``: DeltaNet by the sequential state pass (P steps).

Per rank and method: peak memory of one forward+backward (the rise of the process's peak RSS,
``harness.measure_peak_memory``), time (median over ``--repeats`` of the slowest rank's time), and the
bytes each rank sends, counted by wrapping the ``torch.distributed`` calls in the benchmark's own
processes: point-to-point messages at their size; collectives at the bytes a rank sends in the usual
ring algorithms (all-gather ``(P-1) n``, all-reduce ``2 (P-1)/P n``, all-to-all ``(P-1)/P n``,
broadcast ``n`` from the source).

What the figures mean here: gloo over loopback on a 2-core CPU moves bytes through the kernel's
socket buffers at a few GB/s and the P processes share 2 cores, so times at P > 1 measure this
machine's contention, not scaling; the memory per rank and the bytes per rank are the
machine-independent results (memory should fall as about 1/P for the methods that shard everything;
bytes per rank follow each method's formula). Speed on a GPU cluster is the analytic model
(:mod:`effattn.dist.model`), written by the same run as report ``dist_model`` (table and plot, at
T = 1M tokens on H100s with NVLink and InfiniBand, 8 to 1,024 devices).

Reports ``dist`` and ``dist_model`` (JSON + markdown + PNG) land in ``--out``. The default run takes
about 2-3 minutes on 2 idle CPU cores (``--lengths 4096``: 8 minutes on a shared, loaded machine);
``--quick`` (T = 512) under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from effattn.bench import suite
from effattn.bench.cli import add_common_arguments
from effattn.bench.harness import command_line, machine_info, measure_peak_memory, write_report
from effattn.exact import attention

METHODS = ("ring", "token_ring", "ulysses", "halo", "lasp2", "lasp1")
LENGTHS = (2048,)
QUICK_LENGTHS = (512,)
WORLD_SIZES = (1, 2, 4)
HEADS, HEAD_DIM, WINDOW = 8, 64, 512
MODEL_SEQ_LEN = 2**20

COLUMNS = [
    "method",
    "world",
    "seq_len",
    "local_len",
    "time_ms",
    "time_min_ms",
    "time_max_ms",
    "peak_mb_max_rank",
    "peak_mb_rank0",
    "mem_vs_p1",
    "ideal_1_over_p",
    "mb_sent_per_rank",
    "bytes_per_local_token",
]


# ----------------------------------------------------------------------------------------------
# counting the bytes a rank sends
# ----------------------------------------------------------------------------------------------


class _Bytes:
    def __init__(self):
        self.sent = 0


@contextlib.contextmanager
def counting_bytes(world: int):
    """Wrap ``torch.distributed``'s send-side calls (this process only) and count bytes sent."""
    counter = _Bytes()
    names = [
        "send",
        "batch_isend_irecv",
        "all_gather",
        "all_gather_into_tensor",
        "all_reduce",
        "all_to_all_single",
        "all_to_all",
        "broadcast",
    ]
    originals = {n: getattr(dist, n) for n in names}

    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    def wrap(name, fn):
        def wrapped(*args, **kw):
            if name == "send":
                counter.sent += nbytes(args[0])
            elif name == "batch_isend_irecv":
                counter.sent += sum(nbytes(op.tensor) for op in args[0] if op.op.__name__ == "isend")
            elif name in ("all_gather", "all_gather_into_tensor"):
                counter.sent += (world - 1) * nbytes(args[1])
            elif name == "all_reduce":
                counter.sent += 2 * (world - 1) * nbytes(args[0]) // world
            elif name == "all_to_all_single":
                counter.sent += (world - 1) * nbytes(args[1]) // world
            elif name == "all_to_all":
                counter.sent += (world - 1) * sum(nbytes(t) for t in args[1]) // world
            elif name == "broadcast":
                src = args[1] if len(args) > 1 else kw.get("src")
                group = kw.get("group", args[2] if len(args) > 2 else None)
                if dist.get_rank() == src or (group is not None and dist.get_rank(group) == src):
                    counter.sent += nbytes(args[0])
            return fn(*args, **kw)

        return wrapped

    for n, fn in originals.items():
        setattr(dist, n, wrap(n, fn))
    try:
        yield counter
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)


# ----------------------------------------------------------------------------------------------
# one rank
# ----------------------------------------------------------------------------------------------


def _inputs(method: str, rank: int, local: int, device: str):
    g = torch.Generator().manual_seed(1000 + rank)
    shape = (1, local, HEADS, HEAD_DIM)
    q, k, v = (torch.randn(*shape, generator=g).to(device).requires_grad_(True) for _ in range(3))
    if method == "lasp2":
        gate = (-0.05 * torch.rand(1, local, HEADS, generator=g)).to(device).requires_grad_(True)
        k = torch.nn.functional.normalize(k.detach(), dim=-1).requires_grad_(True)
        return (q, k, v, gate)
    if method == "lasp1":
        beta = torch.rand(1, local, HEADS, generator=g).to(device).requires_grad_(True)
        k = torch.nn.functional.normalize(k.detach(), dim=-1).requires_grad_(True)
        return (q, k, v, beta)
    return (q, k, v)


def _call(method: str, inputs):
    from effattn.dist import halo_attention, lasp2, ring_attention, token_ring_attention, ulysses_attention

    if method == "ring":
        return ring_attention(*inputs, causal=True, layout="zigzag")
    if method == "token_ring":
        return token_ring_attention(*inputs, causal=True, layout="zigzag")
    if method == "ulysses":
        return ulysses_attention(*inputs, causal=True, layout="contiguous")
    if method == "halo":
        return halo_attention(*inputs, window=WINDOW)
    if method == "lasp2":
        return lasp2("simple_gla", *inputs)[0]
    if method == "lasp1":
        return lasp2("delta_rule", *inputs)[0]
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _step(method: str, inputs, w: torch.Tensor, world: int) -> None:
    for x in inputs:
        x.grad = None
    if world == 1 and method in ("ring", "token_ring", "ulysses"):
        o = attention(*inputs, causal=True)  # the single-process op these methods equal
    else:
        o = _call(method, inputs)
    (o * w).sum().backward()


def run_rank(rank: int, world: int, methods: list[str], seq_len: int, repeats: int, device: str = "cpu") -> list[dict]:
    """One rank's measurements of every method (called on every rank of a group of ``world``)."""
    local = seq_len // world
    rows = []
    for method in methods:
        inputs = _inputs(method, rank, local, device)
        w = torch.randn(1, local, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(rank))

        step = functools.partial(_step, method, inputs, w, world)
        try:
            step()  # warm-up
            dist.barrier()
            peak = measure_peak_memory(step, device)
            dist.barrier()
            with counting_bytes(world) as counter:
                step()
            sent = counter.sent
            times = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                step()
                elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
                times.append(elapsed.item())
            rows.append({"method": method, "rank": rank, "peak": peak, "sent": sent, "times": times})
        except (RuntimeError, ValueError) as e:
            err = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append({"method": method, "rank": rank, "error": err})
            dist.barrier()
    return rows


def _spawned_rank(rank: int, world: int, methods, seq_len, repeats) -> list[dict]:
    return run_rank(rank, world, methods, seq_len, repeats)


# ----------------------------------------------------------------------------------------------
# aggregation, reports, plots
# ----------------------------------------------------------------------------------------------


def summarize(per_rank: list[list[dict]], world: int, seq_len: int) -> list[dict]:
    """One row per method from every rank's measurements."""
    out = []
    for i, r0 in enumerate(per_rank[0]):
        ranks = [rows[i] for rows in per_rank]
        if any("error" in r for r in ranks):
            err = next(r["error"] for r in ranks if "error" in r)
            out.append({"method": r0["method"], "world": world, "seq_len": seq_len, "error": err})
            continue
        times = r0["times"]
        peaks = [r["peak"] for r in ranks if r["peak"] is not None]
        out.append(
            {
                "method": r0["method"],
                "world": world,
                "seq_len": seq_len,
                "local_len": seq_len // world,
                "time_ms": statistics.median(times) * 1e3,
                "time_min_ms": min(times) * 1e3,
                "time_max_ms": max(times) * 1e3,
                "repeats": len(times),
                "peak_mb_max_rank": max(peaks) / 2**20 if peaks else None,
                "peak_mb_rank0": ranks[0]["peak"] / 2**20 if ranks[0]["peak"] is not None else None,
                "mb_sent_per_rank": max(r["sent"] for r in ranks) / 2**20,
                "bytes_per_local_token": max(r["sent"] for r in ranks) / (seq_len // world),
                "ideal_1_over_p": 1 / world,
            }
        )
    return out


def add_memory_ratios(rows: list[dict]) -> None:
    base = {(r["method"], r["seq_len"]): r.get("peak_mb_max_rank") for r in rows if r["world"] == 1}
    for r in rows:
        b = base.get((r["method"], r["seq_len"]))
        if b and r.get("peak_mb_max_rank") is not None:
            r["mem_vs_p1"] = r["peak_mb_max_rank"] / b


def plot(rows: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(dict.fromkeys(r["method"] for r in ok)):
        color = colors[i % len(colors)]
        rs = sorted((r for r in ok if r["method"] == method), key=lambda r: r["world"])
        P = [r["world"] for r in rs]
        axes[0].plot(P, [r["peak_mb_max_rank"] for r in rs], "o-", color=color, label=method)
        if rs and rs[0]["world"] == 1:  # the ideal: the single-process peak divided by P
            axes[0].plot(P, [rs[0]["peak_mb_max_rank"] / p for p in P], ":", color=color, lw=1)
        sent = [(r["world"], r["mb_sent_per_rank"]) for r in rs if r["mb_sent_per_rank"] > 0]
        if sent:
            axes[1].plot(*zip(*sent, strict=True), "o-", color=color, label=method)
        axes[2].plot(P, [r["time_ms"] for r in rs], "o-", color=color, label=method)
    Ps = sorted({r["world"] for r in ok})
    T = ok[0]["seq_len"] if ok else 0
    titles = [
        f"peak memory per rank (fwd+bwd), T={T}; dotted: P=1 value / P",
        "bytes sent per rank (fwd+bwd; none at P=1)",
        "time fwd+bwd (slowest rank; gloo on 2 shared cores)",
    ]
    ylabels = ["MiB (peak RSS rise)", "MiB", "ms"]
    for ax, title, yl in zip(axes, titles, ylabels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(Ps, [str(p) for p in Ps])
        ax.set_xlabel("world size P")
        ax.set_ylabel(yl)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def model_report(out: Path, meta: dict) -> None:
    """The analytic model's table and plot (:mod:`effattn.dist.model`) at T = 1M tokens."""
    from effattn.dist import H100_CLUSTER, MODEL_METHODS, Workload, markdown_table, ring_min_block, sweep

    notes = []
    sections = []
    payload = {"meta": {**meta, "hardware": H100_CLUSTER.__dict__}, "workloads": []}
    workloads = (
        Workload(seq_len=MODEL_SEQ_LEN),
        Workload(seq_len=MODEL_SEQ_LEN, kv_heads=8),
        Workload(seq_len=MODEL_SEQ_LEN // 8),
    )
    for w in workloads:
        rows = sweep(w)
        payload["workloads"].append({"workload": w.__dict__, "rows": [e.as_dict() for e in rows]})
        sections.append(
            f"## T = {w.seq_len:,}, {w.heads} heads ({w.kv_heads} KV heads) of {w.head_dim}, causal, bf16\n"
        )
        sections.append(markdown_table(rows, w) + "\n")
    (out / "dist_model.json").write_text(json.dumps(payload, indent=2, default=str))
    w0 = Workload(seq_len=MODEL_SEQ_LEN)
    notes.append(
        f"ring overlap block c_min: {ring_min_block(H100_CLUSTER, w0, 8):,.0f} tokens over NVLink, "
        f"{ring_min_block(H100_CLUSTER, w0, 16):,.0f} over InfiniBand (causal, MHA)"
    )
    md = [
        "# effattn analytic model: one attention layer's forward pass",
        "",
        f"Command: `{meta.get('command', '')}`; formulas and sources: `effattn.dist.model` and docs/dist.md.",
        f"Hardware: {H100_CLUSTER.name}; {H100_CLUSTER.flops / 1e12:.0f} TFLOP/s bf16 dense at "
        f"{H100_CLUSTER.efficiency:.0%} efficiency. Methods: {', '.join(MODEL_METHODS)} (lasp rows are a "
        "linear-attention layer: compare communication, not totals, with the softmax rows).",
        "",
        *sections,
        *[f"- {n}" for n in notes],
    ]
    (out / "dist_model.md").write_text("\n".join(md) + "\n")
    _plot_model(out / "dist_model.png")


def _plot_model(path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from effattn.dist import H100_CLUSTER, Workload, estimate, ring_min_block

    devices = [8, 16, 32, 64, 128, 256, 512, 1024]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    w = Workload(seq_len=MODEL_SEQ_LEN)
    styles = {"ring": "o-", "token_ring": "s-", "ulysses": "^-", "lasp2": "d-", "lasp1": "x:"}
    for m, st in styles.items():
        es = [estimate(m, P, w) for P in devices]
        axes[0].plot(devices, [e.total_s * 1e3 for e in es], st, label=m)
        axes[1].plot(devices, [max(e.comm_s * 1e3, 1e-6) for e in es], st, label=m)
    axes[0].plot(
        devices, [estimate("ring", P, w).compute_s * 1e3 for P in devices], "k--", lw=1, label="softmax compute only"
    )
    c = [w.seq_len / P for P in devices]
    cmin = [ring_min_block(H100_CLUSTER, w, P) for P in devices]
    axes[2].plot(devices, c, "o-", label="block c = T/P")
    axes[2].plot(devices, cmin, "k--", label="ring c_min (causal, MHA)")
    w_gqa = Workload(seq_len=MODEL_SEQ_LEN, kv_heads=8)
    cmin_gqa = [ring_min_block(H100_CLUSTER, w_gqa, P) for P in devices]
    axes[2].plot(devices, cmin_gqa, "k:", label="ring c_min (8 KV heads)")
    titles = [
        "time per layer fwd (model), T=1M, H100",
        "communication per layer (before overlap)",
        "ring overlap: block vs needed block",
    ]
    for ax, title, yl in zip(axes, titles, ["ms", "ms", "tokens"], strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("devices (8 per node; >8 crosses InfiniBand)")
        ax.set_ylabel(yl)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# the suite
# ----------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The dist suite's options."""
    add_common_arguments(
        p,
        "dist",
        lengths=LENGTHS,
        quick_lengths=QUICK_LENGTHS,
        quick="total length 512: well under a minute",
        repeats=3,
        lengths_help="comma-separated total sequence lengths (each divisible by 2 x every world size)",
    )
    p.add_argument(
        "--world-sizes",
        type=str,
        default=None,
        metavar="P1,P2,...",
        help="comma-separated world sizes to spawn (default: 1,2,4; ignored under torchrun)",
    )
    p.add_argument(
        "--methods",
        type=str,
        default=None,
        metavar="A,B,...",
        help=f"comma-separated methods (default: {','.join(METHODS)})",
    )
    p.add_argument(
        "--timeout", type=float, default=300.0, help="process-group timeout in seconds (default: %(default)s)"
    )


def _csv(value: str | None, cast, default):
    return [cast(x) for x in value.split(",") if x.strip()] if value else list(default)


@suite(
    "dist",
    add_arguments=add_arguments,
    summary="sequence parallelism on local gloo groups (memory and bytes per rank) and the cluster model",
    description=__doc__,
)
def run(args: argparse.Namespace) -> None:
    from effattn.dist import spawn

    quick = bool(getattr(args, "quick", False))
    lengths = _csv(getattr(args, "lengths", None), int, QUICK_LENGTHS if quick else LENGTHS)
    methods = _csv(getattr(args, "methods", None), str, METHODS)
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    repeats = int(getattr(args, "repeats", 3) or 3)
    out = Path(args.out)
    under_torchrun = dist.is_available() and "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rows: list[dict] = []
    if under_torchrun:
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
        for T in lengths:
            mine = run_rank(rank, world, methods, T, repeats, args.device)
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
            rows += summarize(gathered, world, T)
        if rank != 0:
            return
    else:
        for T in lengths:
            for world in _csv(getattr(args, "world_sizes", None), int, WORLD_SIZES):
                print(f"dist: T={T} world={world} ...", flush=True)
                per_rank = spawn(_spawned_rank, world, methods, T, repeats, timeout=float(args.timeout))
                rows += summarize(per_rank, world, T)
    add_memory_ratios(rows)
    meta = {
        "command": command_line(),
        "machine": machine_info(args.device),
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "window": WINDOW,
        "dtype": "float32",
        "batch": 1,
        "causal": True,
    }
    notes = [
        "gloo over loopback, the ranks sharing this machine's cores: times at P > 1 show contention "
        "and socket copies, not cluster scaling (see dist_model for that); memory and bytes per rank are "
        "the machine-independent figures.",
        "peak_mb: the rise of one rank's peak RSS during one forward+backward (inputs excluded); "
        "mem_vs_p1: that over the same method at P=1 (ideal 1/P for methods that shard everything).",
        "mb_sent_per_rank: the largest rank's bytes sent in one forward+backward (P2P at message size; "
        "collectives at ring-algorithm bytes).",
        f"lasp2: simple GLA (LASP-2 all-gather); lasp1: DeltaNet (sequential state pass); halo: window {WINDOW}.",
        "P=1 rows are the single-process op each method equals (effattn.attention causal for ring, token_ring "
        "and ulysses; the halo and LASP calls reduce to it on one rank).",
    ]
    out.mkdir(parents=True, exist_ok=True)
    md = write_report(out, "dist", rows, COLUMNS + ["error"], meta=meta, notes=notes)
    png = plot(rows, out / "dist.png")
    model_report(out, meta)
    for r in rows:
        print(
            f"{r['method']:>10} P={r['world']} "
            + (
                r["error"]
                if "error" in r
                else f"time {r['time_ms']:.1f} ms, peak/rank {r['peak_mb_max_rank']:.1f} MiB, "
                f"sent/rank {r['mb_sent_per_rank']:.2f} MiB"
            ),
            flush=True,
        )
    print(f"wrote {md}" + (f", {out / png}" if png else "") + f", {out / 'dist_model.md'}", flush=True)
