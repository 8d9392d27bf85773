"""``python -m effattn bench train``: training memory and speed of each memory option of ``effattn.nn.LM``.

Two parts (``--parts``, default both):

- ``step``: one training step (forward + backward of the next-token loss, batch 1) of a byte-level LM
  (default ``dim`` 512, 6 layers, 8 heads, softmax attention, SwiGLU: about 19M parameters) at each
  context of ``--contexts`` (default 2048), with every option and the combinations that make sense
  (``--options``): peak memory of the step (rise of the process's peak RSS above the resident model, or
  the CUDA allocator's peak; it includes the parameter gradients) and time, against the plain
  baseline measured in the same run. Each row is one step after one warm-up step of the baseline
  (``--repeats`` more steps are timed when asked); a row whose context exceeds ``--max-tokens-for``
  limits is skipped and listed.
- ``loss``: the inexact options (``mesa``) and the architectural one (``reversible``) trained for
  ``--loss-steps`` steps on :func:`effattn.data.byte_corpus` next to the baseline: the loss curves
  and the final validation loss.

The 32k goal of the issue: the best combination at <= 1/4 of the baseline's activation memory at
<= 1.5x its step time. The report says whether the measured rows meet it at the contexts measured.
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from effattn.bench import harness, suite
from effattn.nn import LM, LMConfig
from effattn.train import LossModel, TrainConfig, train

PARTS = ("step", "loss")
# name -> LMConfig memory options
OPTIONS: dict[str, dict] = {
    "baseline": {},
    "checkpoint=block": {"checkpoint": "block"},
    "checkpoint=mixer": {"checkpoint": "mixer"},
    "checkpoint=mlp": {"checkpoint": "mlp"},
    "chunked_mlp": {"chunked_mlp": 512},
    "chunked_loss": {"chunked_loss": 512},
    "reversible": {"reversible": True},
    "mesa": {"mesa": True},
    "block+chunked_loss": {"checkpoint": "block", "chunked_loss": 512},
    "block+chunked_loss+mlp": {"checkpoint": "block", "chunked_loss": 512, "chunked_mlp": 512},
    "reversible+chunked": {"reversible": True, "chunked_loss": 512, "chunked_mlp": 512},
    "reversible+mesa": {"reversible": True, "mesa": True},
    "streambp": {"streambp": 512},
}
EXACT = {
    "baseline",
    "checkpoint=block",
    "checkpoint=mixer",
    "checkpoint=mlp",
    "chunked_mlp",
    "chunked_loss",
    "block+chunked_loss",
    "block+chunked_loss+mlp",
    "streambp",
}
# the rows measured above --max-tokens: the baseline and the best combinations
LONG = ("baseline", "block+chunked_loss+mlp", "streambp")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The train suite's options."""
    p.add_argument("--quick", action="store_true", help="a tiny model at 128 tokens, 3 loss steps: seconds")
    p.add_argument("--parts", default="step,loss", help="step and/or loss (default: both)")
    p.add_argument("--contexts", default=None, metavar="T1,T2", help="contexts (default: 2048; quick: 128)")
    p.add_argument("--options", default=",".join(OPTIONS), help="comma-separated rows (default: all)")
    p.add_argument("--mixers", default="attention", help="mixer pattern of the LM (default: attention)")
    p.add_argument("--dim", type=int, default=None, help="model width (default 512; quick 32)")
    p.add_argument("--layers", type=int, default=None, help="layers (default 6; quick 2)")
    p.add_argument("--heads", type=int, default=8, help="attention heads of the LM (default 8)")
    p.add_argument(
        "--chunk", type=int, default=512, help="tokens/rows per chunk of the chunked options and StreamBP (default 512)"
    )
    p.add_argument("--repeats", type=int, default=0, help="timed steps after the measured one (default 0)")
    p.add_argument(
        "--paired",
        type=int,
        default=0,
        metavar="N",
        help="0: one model at a time (default); N >= 1: keep every option's model, run N rounds of one step "
        "each in the order of --options, baseline first, and report the median and range of the per-round "
        "time ratios (each option against the baseline step of its own round)",
    )
    p.add_argument(
        "--full-warmup",
        type=int,
        default=1,
        choices=(0, 1),
        help="1: one untimed baseline step at full size before its measured one (default); 0: skip it (long contexts)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=8192,
        help="skip contexts above this for every option but baseline and the best combination (default 8192)",
    )
    p.add_argument("--loss-steps", type=int, default=None, help="training steps of the loss part (default 60)")
    p.add_argument("--loss-seq-len", type=int, default=256, help="sequence length of the loss part (default 256)")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device to measure on (default: cuda when present, else cpu)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own setting)")
    p.add_argument("--out", default=None, help="output directory (default bench_out/train)")


def _model(args, opts: dict, seq: int) -> LossModel:
    # the chunked options' sizes (512 in OPTIONS) are --chunk
    opts = {k: args.chunk if k in ("chunked_mlp", "chunked_loss", "streambp") else v for k, v in opts.items()}
    torch.manual_seed(0)
    cfg = LMConfig(
        vocab_size=256,
        dim=args.dim,
        n_layers=args.layers,
        heads=args.heads,
        mixers=args.mixers,
        max_seq_len=seq,
        **opts,
    )
    return LossModel(LM(cfg)).to(args.device)


def _step(model: LossModel, ids: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    loss = model(ids[:, :-1], ids[:, 1:], ids.shape[1] - 1)
    loss.backward()


def _options(args) -> list[str]:
    names = [n.strip() for n in args.options.split(",") if n.strip()]
    unknown = sorted(set(names) - set(OPTIONS))
    if unknown:
        raise SystemExit(f"unknown --options {unknown}; choose from {list(OPTIONS)}")
    return ["baseline"] + [n for n in names if n != "baseline"]


def _timed_step(model: LossModel, ids: torch.Tensor, device, peak: bool) -> tuple[float, int | None]:
    """Seconds of one step, and its peak memory rise when ``peak`` (else None)."""
    gc.collect()
    t0 = time.perf_counter()
    mem = harness.measure_peak_memory(lambda: _step(model, ids), device) if peak else _step(model, ids)
    harness.sync(device)
    return time.perf_counter() - t0, mem


def _peak_in_this_process(args, name: str, T: int) -> int | None:
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = torch.randint(0, 256, (1, T + 1), generator=torch.Generator().manual_seed(0)).to(args.device)
    model = _model(args, OPTIONS[name], T)
    _step(model, ids[:, :17])
    return _timed_step(model, ids, args.device, peak=True)[1]


def peaks_alone(args, names: list[str], T: int) -> dict[str, int | None]:
    """Peak memory of one step of each option, each in a fresh process of its own: a step measured after
    another model's step in the same process inherits that step's heap (at 8k, StreamBP measured 0.21x
    the baseline alone and 0.39x after the baseline's step)."""
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for n in names:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            out[n] = pool.submit(_peak_in_this_process, args, n, T).result()
        print(f"train step T={T} {n}: peak {out[n] and round(out[n] / 2**20, 1)} MiB (alone)", flush=True)
    return out


def paired_step_rows(args) -> tuple[list[dict], list[str]]:
    """``--paired N``: the peak memory of each option alone in a fresh process (:func:`peaks_alone`),
    then every option's model built in this one and N rounds of one timed step each, in the order of
    --options, baseline first. ``time_vs_base`` is the median over rounds of ``step(option) /
    step(baseline)`` of the same round, with its min and max: steps minutes apart on a drifting machine
    are never compared."""
    rows, skipped = [], []
    names = _options(args)
    for T in (int(c) for c in args.contexts.split(",")):
        ids = torch.randint(0, 256, (1, T + 1), generator=torch.Generator().manual_seed(0)).to(args.device)
        kept = [n for n in names if T <= args.max_tokens or n in LONG]
        skipped += [f"{n}@{T}" for n in names if n not in kept]
        peaks = peaks_alone(args, kept, T)
        models = {n: _model(args, OPTIONS[n], T) for n in kept}
        for m in models.values():
            _step(m, ids[:, :17])  # lazy imports and inits, not measured
        if args.full_warmup:
            _step(models["baseline"], ids)
        seconds = {n: [] for n in kept}
        for r in range(args.paired):
            for n, m in models.items():
                seconds[n].append(_timed_step(m, ids, args.device, peak=False)[0])
                print(f"train step T={T} round {r + 1} {n}: {seconds[n][-1]:.2f} s", flush=True)
        base_peak = peaks["baseline"]
        for n in kept:
            ratios = [a / b for a, b in zip(seconds[n], seconds["baseline"])]
            sec = statistics.median(seconds[n])
            row = {
                "context": T,
                "option": n,
                "exact": n in EXACT,
                "params_M": round(sum(p.numel() for p in models[n].parameters()) / 1e6, 2),
                "peak_MiB": None if peaks[n] is None else round(peaks[n] / 2**20, 1),
                "step_s": round(sec, 3),
                "step_s_range": f"{min(seconds[n]):.3g}-{max(seconds[n]):.3g}",
                "tokens_per_s": round(T / sec, 1),
                "timed_steps": len(seconds[n]),
                "time_vs_base": round(statistics.median(ratios), 3),
                "time_vs_base_range": f"{min(ratios):.3f}-{max(ratios):.3f}",
            }
            if base_peak and peaks[n] is not None:
                row["mem_vs_base"] = round(peaks[n] / base_peak, 3)
            rows.append(row)
        del models
        gc.collect()
    return rows, skipped


def step_rows(args) -> tuple[list[dict], list[str]]:
    """One row per (context, option): peak MiB, step seconds, ratios to the baseline."""
    if args.paired:
        return paired_step_rows(args)
    rows, skipped = [], []
    contexts = [int(c) for c in args.contexts.split(",")]
    names = _options(args)
    for T in contexts:
        ids = torch.randint(0, 256, (1, T + 1), generator=torch.Generator().manual_seed(0)).to(args.device)
        base = None
        for name in names:
            if T > args.max_tokens and name not in LONG:
                skipped.append(f"{name}@{T}")
                continue
            model = _model(args, OPTIONS[name], T)
            params = sum(p.numel() for p in model.parameters())
            _step(model, ids[:, :17])  # warm-up at 16 tokens: lazy imports and inits, not measured
            if name == "baseline" and args.full_warmup:
                _step(model, ids)  # and the allocator at full size
            gc.collect()
            t0 = time.perf_counter()
            peak = harness.measure_peak_memory(lambda m=model, x=ids: _step(m, x), args.device)
            harness.sync(args.device)
            seconds = [time.perf_counter() - t0]
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                _step(model, ids)
                harness.sync(args.device)
                seconds.append(time.perf_counter() - t0)
            sec = sorted(seconds)[len(seconds) // 2]
            row = {
                "context": T,
                "option": name,
                "exact": name in EXACT,
                "params_M": round(params / 1e6, 2),
                "peak_MiB": None if peak is None else round(peak / 2**20, 1),
                "step_s": round(sec, 3),
                "tokens_per_s": round(T / sec, 1),
                "timed_steps": len(seconds),
            }
            if name == "baseline":
                base = row
            if base is not None and base["peak_MiB"] and row["peak_MiB"] is not None:
                row["mem_vs_base"] = round(row["peak_MiB"] / base["peak_MiB"], 3)
                row["time_vs_base"] = round(sec / base["step_s"], 3)
            rows.append(row)
            print(f"train step T={T} {name}: {row['peak_MiB']} MiB, {sec:.2f} s", flush=True)
            del model
            gc.collect()
    return rows, skipped


def loss_rows(args) -> tuple[list[dict], dict]:
    """Final validation loss after ``loss_steps`` steps, per option, and the curves."""
    rows, curves = [], {}
    for name in ("baseline", "mesa", "reversible", "reversible+mesa"):
        cfg = LMConfig(
            vocab_size=256,
            dim=args.loss_dim,
            n_layers=args.loss_layers,
            heads=args.heads,
            mixers=args.mixers,
            **OPTIONS[name],
        )
        tc = TrainConfig(
            steps=args.loss_steps,
            batch_size=4,
            seq_len=args.loss_seq_len,
            lr=2e-3,
            warmup=max(1, args.loss_steps // 10),
            max_bytes=4_000_000,
            eval_every=args.loss_steps,
            eval_batches=4,
            progress=False,
            plot=False,
            device=args.device,
        )
        h = train(cfg, tc)
        curves[name] = h["loss"]
        rows.append(
            {
                "option": name,
                "steps": args.loss_steps,
                "final_train_loss": round(h["loss"][-1], 4),
                "val_loss": round(h["val"][-1][1], 4),
                "val_bits_per_byte": round(h["val"][-1][1] / math.log(2), 4),
            }
        )
        print(f"train loss {name}: {rows[-1]}", flush=True)
    return rows, curves


def _plot(out: Path, step: list[dict], curves: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    if step:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for T in sorted({r["context"] for r in step}):
            rs = [r for r in step if r["context"] == T and r.get("mem_vs_base") is not None]
            ax.scatter([r["time_vs_base"] for r in rs], [r["mem_vs_base"] for r in rs], label=f"T={T}")
            for r in rs:
                ax.annotate(r["option"], (r["time_vs_base"], r["mem_vs_base"]), fontsize=7)
        ax.axhline(0.25, ls="--", c="gray", lw=0.8)
        ax.axvline(1.5, ls="--", c="gray", lw=0.8)
        ax.set_xlabel("step time / baseline")
        ax.set_ylabel("peak step memory / baseline")
        ax.set_title("memory options: one training step (goal: lower left of the dashed lines)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "train_step.png", dpi=110)
        plt.close(fig)
        made.append("train_step.png")
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, c in curves.items():
            ax.plot(range(1, len(c) + 1), c, label=name, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (nats/byte)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "train_loss.png", dpi=110)
        plt.close(fig)
        made.append("train_loss.png")
    return made


def goal(step: list[dict]) -> list[str]:
    """Whether the best exact/inexact combination meets <= 1/4 memory at <= 1.5x time, per context."""
    lines = []
    for T in sorted({r["context"] for r in step}):
        ok = [
            r
            for r in step
            if r["context"] == T
            and r.get("mem_vs_base") is not None
            and r["option"] != "baseline"
            and r["time_vs_base"] <= 1.5
        ]
        if not ok:
            lines.append(f"T={T}: no option measured within 1.5x the baseline's step time")
            continue
        best = min(ok, key=lambda r: r["mem_vs_base"])
        verdict = "met" if best["mem_vs_base"] <= 0.25 else "not met"
        lines.append(
            f"T={T}: best within 1.5x time is {best['option']} at {best['mem_vs_base']:.2f}x memory, "
            f"{best['time_vs_base']:.2f}x time: goal {verdict}"
        )
    return lines


@suite(
    "train",
    add_arguments=add_arguments,
    summary="training memory options of the LM: peak memory and step time vs baseline, loss of the inexact ones",
    description=__doc__,
)
def run(args: argparse.Namespace) -> None:
    out = Path(args.out or "bench_out/train")
    out.mkdir(parents=True, exist_ok=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown --parts {unknown}; choose from {PARTS}")
    if args.paired < 0:
        raise SystemExit(f"--paired must be >= 0 (0: unpaired), got {args.paired}")
    if args.chunk < 1:
        raise SystemExit(f"--chunk must be >= 1, got {args.chunk}")
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    args.contexts = args.contexts or ("128" if q else "2048")
    args.dim = args.dim or (32 if q else 512)
    args.layers = args.layers or (2 if q else 6)
    args.heads = 2 if q else args.heads
    args.loss_steps = args.loss_steps or (3 if q else 60)
    args.loss_dim, args.loss_layers = (32, 2) if q else (128, 2)
    if q:
        args.loss_seq_len = 32
    meta = {"command": harness.command_line(), "machine": harness.machine_info(args.device)}
    step, skipped, curves = [], [], {}
    if "step" in parts:
        step, skipped = step_rows(args)
        notes = [
            f"LM: dim {args.dim}, {args.layers} layers, {args.heads} heads, mixers {args.mixers}, vocab 256, "
            f"batch 1, float32; chunk sizes {args.chunk} tokens/rows",
            "peak_MiB: rise of peak memory during one forward+backward above the resident model (CPU: RSS "
            "high-water mark; includes parameter gradients); step_s: that step's wall time (one step unless "
            "--repeats; the machine is shared, ratios drift 10-30%)"
            if not args.paired
            else f"paired: {args.paired} round(s), each one step of every option back to back, baseline first; "
            "step_s: median over rounds (range beside it); time_vs_base: median (range) over rounds of the "
            "option's step over the same round's baseline step; peak_MiB: one step of the option alone in a "
            "fresh process",
            "exact: gradients equal the baseline's (tests/train); mesa is inexact (int8 saved activations); "
            "reversible is a different (two-stream) architecture",
            *goal(step),
        ]
        if skipped:
            notes.append("skipped (over --max-tokens): " + ", ".join(skipped))
        harness.write_report(
            out,
            "train_step",
            step,
            [
                "context",
                "option",
                "exact",
                "params_M",
                "peak_MiB",
                "mem_vs_base",
                "step_s",
                "time_vs_base",
                *(["time_vs_base_range", "step_s_range"] if args.paired else []),
                "tokens_per_s",
                "timed_steps",
            ],
            meta=meta,
            notes=notes,
        )
    if "loss" in parts:
        loss, curves = loss_rows(args)
        harness.write_report(
            out,
            "train_loss",
            loss,
            ["option", "steps", "final_train_loss", "val_loss", "val_bits_per_byte"],
            meta=meta,
            notes=[
                f"LM dim {args.loss_dim}, {args.loss_layers} layers, {args.mixers}, seq "
                f"{args.loss_seq_len}, batch 4, AdamW lr 2e-3, byte_corpus (first 4 MB)"
            ],
        )
    _plot(out, step, curves)
