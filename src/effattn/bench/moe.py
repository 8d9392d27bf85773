"""``python -m effattn bench moe``: mixture-of-experts dispatch, expert parallelism and a small training run.

Three parts (``--parts``, default all three):

- ``dispatch``: forward+backward tokens/s and peak memory of one :class:`effattn.moe.MoE` layer
  (``dim`` 128, expert hidden 256, top-2) at 1k/4k/16k tokens and 8/32/64 experts, for dropless dispatch
  with ``torch._grouped_mm`` (``dropless``), dropless with one matmul per expert slice
  (``dropless_loop``), GShard capacity 1.25 (``capacity``), the per-token reference loop
  (``reference``, only up to ``--reference-max`` tokens and ``--reference-experts`` experts: it makes
  ``2 N`` tiny matmuls and an autograd graph of that size; one run, no warm-up, timed together with its
  memory measurement) and a dense SwiGLU of equal active parameters (hidden ``top_k * 256``, ``dense``).
  Every row: median, min and max of ``--repeats`` timed runs after a warm-up, and the time relative to
  dense timed back to back (``vs_dense_paired``, the median of per-pair ratios).
- ``ep``: expert parallelism on 1/2/4 gloo ranks (``spawn`` over 127.0.0.1): time per forward+backward
  step (the slowest rank of each repeat), bytes each rank sends per step (forward and backward
  all-to-alls) and peak memory per rank, plain and overlapped (``ep_chunks=4``). Ranks share this
  machine's cores, so the times show the overhead of the exchange on one host, not cluster scaling.
- ``train``: the same tiny byte-level LM (``effattn.nn.LM``) trained on ``effattn.data.byte_corpus``:
  dense SwiGLU vs MoE at equal active parameters (8 experts, top-2, expert hidden = dense hidden / 2),
  MoE with micro-batch vs global-batch load balancing (gradient accumulation over 4 micro-batches:
  ``global`` counts expert frequencies over all 4). Reports validation loss (bits per byte) and
  max/mean expert load on the validation set.

The machine's load average is recorded before and after each part; a part taken while the load exceeded
the core count is marked ``busy`` (other jobs shared the CPU: its times are pessimistic and noisier).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch

from effattn.bench import harness, suite

DEFAULT_TOKENS = (1024, 4096, 16384)
DEFAULT_EXPERTS = (8, 32, 64)
QUICK_TOKENS = (128,)
QUICK_EXPERTS = (4,)
DIM, HIDDEN, TOP_K = 128, 256, 2
PARTS = ("dispatch", "ep", "train")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The moe suite's options."""
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few training steps: about a minute")
    p.add_argument(
        "--tokens",
        type=str,
        default=None,
        metavar="N1,N2,...",
        help="tokens per call (default: 1024,4096,16384; with --quick: 128)",
    )
    p.add_argument(
        "--experts",
        type=str,
        default=None,
        metavar="E1,E2,...",
        help="expert counts (default: 8,32,64; with --quick: 4)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        metavar="N",
        help="timed runs per measurement after a warm-up (default: %(default)s)",
    )
    p.add_argument(
        "--reference-max",
        type=int,
        default=1024,
        metavar="N",
        help="largest token count the per-token reference loop is timed at (default: %(default)s)",
    )
    p.add_argument(
        "--reference-experts",
        type=int,
        default=8,
        metavar="E",
        help="largest expert count the reference loop is timed at (default: %(default)s; its per-token "
        "autograd graph grows with E: 2 min per call at 64 experts on a busy 2-core machine)",
    )
    p.add_argument("--parts", type=str, default=",".join(PARTS), help="comma-separated parts (default: %(default)s)")
    p.add_argument("--ep-ranks", type=str, default="1,2,4", help="expert-parallel world sizes (default: %(default)s)")
    p.add_argument(
        "--train-steps",
        type=int,
        default=None,
        metavar="S",
        help="optimizer steps per training run (default: 60; with --quick: 4)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch threads in this process (default: %(default)s: on a shared, loaded CPU two OpenMP "
        "threads spin against other jobs and run 10x slower than one)",
    )
    p.add_argument("--device", type=str, default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--out", type=str, default=None, help="report folder (default: bench_out/moe)")


def _ints(text: str | None, default) -> list[int]:
    return list(default) if text is None else [int(t) for t in text.split(",") if t.strip()]


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _busy(before: float, after: float) -> bool:
    return max(before, after) > (os.cpu_count() or 1)


def _times(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# -- part 1: dispatch ----------------------------------------------------------------------------------------
def _dispatch_case(method: str, N: int, E: int, device: str):
    from effattn.moe import MoE, SwiGLU, reference_moe

    torch.manual_seed(0)
    x = torch.randn(1, N, DIM, device=device, requires_grad=True)
    if method == "dense":
        layer = SwiGLU(DIM, TOP_K * HIDDEN).to(device)
        return (lambda: layer(x)), x
    kw = {
        "dropless": {},
        "dropless_loop": {"gemm": "loop"},
        "capacity": {"capacity_factor": 1.25},
        "reference": {"gemm": "loop"},
    }[method]
    moe = MoE(DIM, HIDDEN, E, TOP_K, **kw).to(device)
    if method == "reference":
        return (lambda: reference_moe(x[0], moe.router.weight, moe.experts, TOP_K)[0]), x
    return (lambda: moe(x)), x


def _step(method: str, N: int, E: int, device: str):
    fwd, x = _dispatch_case(method, N, E, device)
    g = torch.randn(N, DIM) if method == "reference" else torch.randn(1, N, DIM)

    def step():
        fwd().backward(g)
        x.grad = None

    return step


def dispatch_rows(args) -> list[dict]:
    tokens = _ints(args.tokens, QUICK_TOKENS if args.quick else DEFAULT_TOKENS)
    experts = _ints(args.experts, QUICK_EXPERTS if args.quick else DEFAULT_EXPERTS)
    rows = []
    for N in tokens:
        dense_step = _step("dense", N, 0, args.device)
        dense_ms = None
        for E in experts:
            for method in ("dense", "dropless", "dropless_loop", "capacity", "reference"):
                if method == "dense" and dense_ms is not None:
                    continue  # the dense layer does not depend on E
                row = {"tokens": N, "experts": "-" if method == "dense" else E, "method": method}
                if method == "reference" and (N > args.reference_max or E > args.reference_experts):
                    row["note"] = (
                        f"skipped: the reference loop above {args.reference_max} tokens or "
                        f"{args.reference_experts} experts takes too long"
                    )
                    rows.append(row)
                    continue

                def one(method=method, E=E, N=N, dense_step=dense_step):
                    step = dense_step if method == "dense" else _step(method, N, E, args.device)
                    if method == "reference":  # seconds per call: one run, timed and measured at once
                        t0 = time.perf_counter()
                        mem = harness.measure_peak_memory(step, device=args.device)
                        ts = [time.perf_counter() - t0]
                    else:
                        ts = _times(step, args.repeats)
                        mem = harness.measure_peak_memory(step, device=args.device)
                    med = statistics.median(ts)
                    r = {
                        "fwd_bwd_ms": 1e3 * med,
                        "min_ms": 1e3 * min(ts),
                        "max_ms": 1e3 * max(ts),
                        "tokens_per_s": N / med,
                        "peak_MiB": None if mem is None else mem / 2**20,
                        "repeats": len(ts),
                    }
                    if method not in ("dense", "reference"):  # headline: timed back to back with dense
                        r["vs_dense_paired"] = harness.paired_ratio(step, dense_step, repeats=args.repeats)
                    return r

                row.update(harness.run_guarded(one))
                if method == "dense":
                    dense_ms = row.get("fwd_bwd_ms")
                rows.append(row)
        for r in rows:
            if r["tokens"] == N and dense_ms and r.get("fwd_bwd_ms"):
                r["time_vs_dense"] = r["fwd_bwd_ms"] / dense_ms
    return rows


# -- part 2: expert parallelism ------------------------------------------------------------------------------
def _ep_rank(rank: int, world: int, N: int, E: int, chunks: int, repeats: int) -> dict:
    import torch.distributed as dist

    from effattn.moe import MoE

    torch.manual_seed(0)
    moe = MoE(DIM, HIDDEN, E, TOP_K, ep_group=dist.group.WORLD, ep_chunks=chunks)
    x = torch.randn(1, N, DIM, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    g = torch.randn(1, N, DIM)

    def step():
        moe(x).backward(g)
        x.grad = None

    ts = []
    step()
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    mem = harness.measure_peak_memory(step)
    return {"times": ts, "bytes": 2 * moe.last_aux.bytes_sent, "mem": mem}


def ep_rows(args) -> list[dict]:
    from effattn.dist import spawn

    N, E = (128, 4) if args.quick else (2048, 8)
    rows = []
    for world in _ints(args.ep_ranks, (1, 2, 4)):
        for chunks in (1, 4):

            def one(world=world, chunks=chunks):
                res = spawn(_ep_rank, world, N, E, chunks, args.repeats, timeout=300)
                steps = [max(r["times"][i] for r in res) for i in range(args.repeats)]
                mems = [r["mem"] for r in res if r["mem"] is not None]
                sent = statistics.mean(r["bytes"] for r in res) / 2**20
                return {
                    "step_ms": 1e3 * statistics.median(steps),
                    "min_ms": 1e3 * min(steps),
                    "max_ms": 1e3 * max(steps),
                    "MiB_sent_per_rank": sent,
                    "peak_MiB_per_rank": max(mems) / 2**20 if mems else None,
                    "repeats": args.repeats,
                }

            row = {"ranks": world, "tokens_per_rank": N, "experts": E, "ep_chunks": chunks}
            row.update(harness.run_guarded(one))
            rows.append(row)
    return rows


# -- part 3: a small training run ----------------------------------------------------------------------------
TRAIN = {
    "dim": 128,
    "n_layers": 4,
    "heads": 4,
    "seq": 128,
    "micro_batch": 8,
    "accumulation": 4,
    "lr": 3e-3,
    "experts": 8,
    "top_k": 2,
    "val_windows": 64,
}


def _train_one(name: str, ffn: str, lbl_scope: str, steps: int, quick: bool) -> dict:
    from effattn.data import byte_corpus, sample_windows
    from effattn.moe import MoE
    from effattn.nn import LM, LMConfig

    c = dict(TRAIN)
    if quick:
        c.update(dim=32, n_layers=2, heads=2, seq=32, micro_batch=2, accumulation=2, val_windows=4)
    dense_hidden = 8 * math.ceil(2 * 4.0 * c["dim"] / 3 / 8)
    moe_kw = {
        "num_experts": c["experts"],
        "top_k": c["top_k"],
        "hidden": dense_hidden // c["top_k"],
        "lbl_scope": lbl_scope,
    }
    torch.manual_seed(0)
    cfg = LMConfig(
        vocab_size=256,
        dim=c["dim"],
        n_layers=c["n_layers"],
        heads=c["heads"],
        mixers="attention",
        ffn=ffn,
        moe=moe_kw if ffn != "dense" else None,
        max_seq_len=c["seq"],
    )
    model = LM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=0.0)
    train = byte_corpus("train", max_bytes=4_000_000)
    val = byte_corpus("validation", max_bytes=1_000_000)
    gen = torch.Generator().manual_seed(1)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    t0 = time.perf_counter()
    for step in range(steps):
        lr = c["lr"] * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        for m in moes:
            m.reset_lbl_stats()
        for _ in range(c["accumulation"]):
            x, y = sample_windows(train, c["micro_batch"], c["seq"], gen)
            logits, _ = model(x)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)) + model.aux_loss()
            (loss / c["accumulation"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    model.eval()
    vgen = torch.Generator().manual_seed(123)
    losses, loads = [], []
    with torch.no_grad():
        for _ in range(c["val_windows"] // 8 or 1):
            x, y = sample_windows(val, 8, c["seq"], vgen)
            logits, _ = model(x)
            losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)).item())
            loads += [m.last_aux.max_over_mean_load() for m in moes]
    active = sum(p.numel() for n, p in model.named_parameters() if "experts" not in n)
    if moes:
        active += sum(m.experts.w_in[0].numel() + m.experts.w_out[0].numel() for m in moes) * c["top_k"]
    return {
        "run": name,
        "ffn": ffn,
        "lbl_scope": lbl_scope if ffn != "dense" else "-",
        "steps": steps,
        "tokens": steps * c["accumulation"] * c["micro_batch"] * c["seq"],
        "params": model.num_parameters(),
        "active_params": active,
        "val_bits_per_byte": statistics.mean(losses) / math.log(2),
        "max_over_mean_load": max(loads) if loads else None,
        "mean_max_over_mean_load": statistics.mean(loads) if loads else None,
        "train_s": train_s,
    }


def train_rows(args) -> list[dict]:
    steps = args.train_steps or (4 if args.quick else 60)
    runs = (("dense", "dense", "micro"), ("moe_micro_lbl", "moe", "micro"), ("moe_global_lbl", "moe", "global"))
    return [
        {"run": n, **harness.run_guarded(lambda n=n, f=f, s=s: _train_one(n, f, s, steps, args.quick))}
        for n, f, s in runs
    ]


# -- report --------------------------------------------------------------------------------------------------
def _plot(out: Path, dispatch: list[dict], machine: dict) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    experts = sorted({r["experts"] for r in dispatch if r["experts"] != "-"})
    if not experts:
        return None
    fig, axes = plt.subplots(2, len(experts), figsize=(4.2 * len(experts), 6.6), squeeze=False)
    for col, E in enumerate(experts):
        ax, ax2 = axes[0][col], axes[1][col]
        for i, method in enumerate(("dense", "dropless", "dropless_loop", "capacity", "reference")):
            pts = [r for r in dispatch if r["method"] == method and r["experts"] in (E, "-") and r.get("tokens_per_s")]
            if not pts:
                continue
            xs = [r["tokens"] for r in pts]
            ys = [r["tokens_per_s"] for r in pts]
            lo = [max(0.0, y - r["tokens"] / (r["max_ms"] / 1e3)) for y, r in zip(ys, pts)]
            hi = [max(0.0, r["tokens"] / (r["min_ms"] / 1e3) - y) for y, r in zip(ys, pts)]
            style = {"marker": "os^Dv"[i], "linestyle": ("-", "--", ":", "-.", "-")[i], "label": method}
            ax.errorbar(xs, ys, yerr=[lo, hi], capsize=3, **style)
            paired = [(r["tokens"], r["vs_dense_paired"]) for r in pts if r.get("vs_dense_paired")]
            if paired:
                ax2.plot([p[0] for p in paired], [p[1] for p in paired], color=f"C{i}", **style)
        ax2.axhline(1.0, color="C0", linewidth=1)
        for a in (ax, ax2):
            a.set_xscale("log", base=2)
            a.set_xlabel("tokens per call")
            a.grid(True, alpha=0.3)
        ax.set_yscale("log")
        ax.set_title(f"{E} experts (top-{TOP_K}, dim {DIM}, hidden {HIDDEN})", fontsize=9)
    axes[0][0].set_ylabel("fwd+bwd tokens/s (median; bars min/max)")
    axes[1][0].set_ylabel("time / dense time (back to back)")
    axes[0][0].legend(fontsize=8)  # the first panel has every method (the reference runs at few experts)
    fig.savefig(out / "moe_dispatch.png", dpi=110)
    plt.close(fig)
    return "moe_dispatch.png"


@suite(
    "moe",
    add_arguments=add_arguments,
    summary="MoE dispatch speed and memory, expert parallelism, "
    "dense vs MoE and micro vs global load balancing in a small training run",
    description=__doc__,
)
def run(args: argparse.Namespace) -> None:
    out = Path(args.out or "bench_out/moe")
    out.mkdir(parents=True, exist_ok=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown --parts {unknown}; choose from {PARTS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = harness.machine_info(args.device)
    meta = {"command": harness.command_line(), "machine": machine, "grouped_mm": hasattr(torch, "_grouped_mm")}
    for part, fn, columns, notes in (
        (
            "dispatch",
            dispatch_rows,
            [
                "tokens",
                "experts",
                "method",
                "tokens_per_s",
                "fwd_bwd_ms",
                "min_ms",
                "max_ms",
                "repeats",
                "vs_dense_paired",
                "time_vs_dense",
                "peak_MiB",
                "note",
                "error",
            ],
            [
                f"one MoE layer, dim {DIM}, expert hidden {HIDDEN}, top-{TOP_K}, float32; dense = SwiGLU hidden "
                f"{TOP_K * HIDDEN} (equal active parameters, router excluded)",
                "dropless uses torch._grouped_mm (present on this CPU build for float32 with rows of 16-byte "
                "multiples); dropless_loop one matmul per expert slice; capacity: factor 1.25, drops reported by "
                "the layer",
                "vs_dense_paired: median over repeats of (time of this layer / time of dense) timed back to back "
                "(the headline: machine drift cancels within a pair); time_vs_dense: ratio of medians taken minutes "
                "apart",
                "peak_MiB: rise of the process's peak RSS during one forward+backward",
            ],
        ),
        (
            "ep",
            ep_rows,
            [
                "ranks",
                "tokens_per_rank",
                "experts",
                "ep_chunks",
                "step_ms",
                "min_ms",
                "max_ms",
                "repeats",
                "MiB_sent_per_rank",
                "peak_MiB_per_rank",
                "error",
            ],
            [
                "gloo over 127.0.0.1, one thread per rank, all ranks on this machine's cores: the step time "
                "shows the exchange overhead on one host (4 ranks oversubscribe a 2-core machine), not cluster "
                "scaling",
                "MiB_sent_per_rank: bytes a rank sends to the other ranks per step (dispatch + combine, forward and "
                "backward)",
            ],
        ),
        (
            "train",
            train_rows,
            [
                "run",
                "ffn",
                "lbl_scope",
                "steps",
                "tokens",
                "params",
                "active_params",
                "val_bits_per_byte",
                "max_over_mean_load",
                "mean_max_over_mean_load",
                "train_s",
                "error",
            ],
            [
                f"tiny byte LM {TRAIN}; MoE: {TRAIN['experts']} experts top-{TRAIN['top_k']}, expert hidden = dense "
                "hidden / top_k (equal active parameters); aux loss 1e-2 LBL + 1e-3 z-loss",
                "global LBL: expert frequencies counted over the 4 accumulated micro-batches of a step (single "
                "process: no data-parallel ranks)",
                "max_over_mean_load: max over layers and validation batches of max_i load_i / mean_i load_i",
            ],
        ),
    ):
        if part not in parts:
            continue
        before = _load()
        t0 = time.perf_counter()
        rows = fn(args)
        after = _load()
        busy = _busy(before, after)
        part_meta = dict(meta, load_before=before, load_after=after, busy=busy, seconds=time.perf_counter() - t0)
        part_notes = list(notes)
        if busy:
            part_notes.append(
                f"busy: load average {before:.1f} -> {after:.1f} on {os.cpu_count()} cores while "
                "measuring; times are pessimistic"
            )
        if part == "dispatch":
            harness.write_report(out, f"moe_{part}", rows, columns, meta=part_meta, notes=part_notes)
            png = _plot(out, rows, machine)
            if png:
                part_notes.append(f"plot: {png}")
        md = harness.write_report(out, f"moe_{part}", rows, columns, meta=part_meta, notes=part_notes)
        print(md.read_text())
