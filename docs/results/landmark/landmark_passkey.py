"""Passkey retrieval beyond the training context: the ``landmark`` mixer vs the old stand-in (``topk_block``
scoring each block by its last key), both trained the same way on short prompts only.

Each model: :class:`effattn.nn.LM`, 2 layers, width 64, 2 heads, RoPE on a quarter of each head's channels
(as the passkey LM of ``bench kv``), blocks of ``--block`` tokens, ``--top-k`` blocks retrieved per query at
evaluation. Training: ``--steps`` AdamW steps on :func:`effattn.bench.tasks.passkey.make_passkey` prompts of
``--train-min``..``--train-max`` tokens (length log-uniform per step, ``--tokens`` tokens per step; the first
``--warm-steps`` on ``--warm-min``..``--warm-max`` tokens, ``--warm-tokens`` per step), loss on
the answer digits only (teacher forcing). Evaluation: ``--eval`` prompts per context length at random
depths (a seed the training never drew), exact match of all digits under teacher forcing (= greedy
decoding's exact match: each digit is predicted from a correct prefix exactly when greedy decoding
reaches it). The landmark mixer trains with the grouped softmax over every block and evaluates with
top-k retrieval; the stand-in trains and evaluates with its top-k selection.

Run: ``nice -n 5 .venv/bin/python docs/results/landmark/landmark_passkey.py`` (writes passkey.json,
passkey.md and passkey.png beside this file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from effattn.bench.harness import machine_info
from effattn.bench.tasks.passkey import IGNORE_INDEX, make_passkey
from effattn.bench.train import build_lm, lr_at

HERE = Path(__file__).resolve().parent


def models(block: int, top_k: int) -> dict:
    common = {"block": block, "top_k": top_k, "rope_fraction": 0.25}
    return {
        "landmark": ("landmark", common),
        "topk_block (last key)": ("topk_block", {**common, "representative": "last"}),
    }


def train(name, mixer, kw, args, log):
    torch.manual_seed(args.seed)
    model = build_lm(mixer, 64, 2, 128, 2, max_seq_len=max(args.lengths) + 16, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.98))
    model.train()
    t0, curve = time.perf_counter(), []
    for step in range(args.steps):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        u = torch.rand(1, generator=g).item()
        short = step < args.warm_steps  # first a stage of short prompts: the lookup forms there
        lo, hi = (args.warm_min, args.warm_max) if short else (args.train_min, args.train_max)
        T = int(round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))))
        tokens = args.warm_tokens if short else args.tokens
        batch = make_passkey(max(1, tokens // T), T, args.digits, 128, seed=args.seed + 7919 * step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        logits = model(batch.inputs)[0]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=IGNORE_INDEX
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            log(f"{name}: step {step} T={T} loss={loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    return model.eval(), {"train_s": time.perf_counter() - t0, "final_loss": curve[-1], "loss_curve": curve}


@torch.no_grad()
def evaluate(model, T: int, args) -> float:
    hits = 0
    for start in range(0, args.eval, args.eval_batch):
        n = min(args.eval_batch, args.eval - start)
        b = make_passkey(n, T, args.digits, 128, seed=10**6 + 7 * T + start)
        pred = model(b.inputs)[0][:, T - 1 :].argmax(-1)
        hits += int((pred == b.keys).all(-1).sum())
    return hits / args.eval


def run_one(todo, args):
    """Train and evaluate one model (in its own process): ``(name, rows, training info)``."""
    torch.set_num_threads(1)  # one thread: this shared machine is busy, two threads contend
    name, mixer, kw = todo
    model, info = train(name, mixer, kw, args, lambda s: print(s, flush=True))
    rows = []
    for T in args.lengths:
        acc = evaluate(model, T, args)
        print(f"{name}: context {T}: exact match {acc:.3f}", flush=True)
        rows.append({"model": name, "context": T, "accuracy": acc})
    return name, rows, info


def plot(rows, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = [(r["context"], r["accuracy"]) for r in rows if r["model"] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.axvspan(args.warm_min, args.train_max, color="0.9", label="training lengths")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel(f"passkey exact match ({args.digits} digits, {args.eval} prompts)")
    ax.set_title(f"Passkey beyond training: block {args.block}, top-{args.top_k} at evaluation\n(busy 2-core CPU)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--steps", type=int, default=600, help="training steps in all")
    p.add_argument("--warm-steps", type=int, default=200, help="first steps on short prompts")
    p.add_argument("--warm-min", type=int, default=24)
    p.add_argument("--warm-max", type=int, default=64)
    p.add_argument("--warm-tokens", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per training step")
    p.add_argument("--train-min", type=int, default=64)
    p.add_argument("--train-max", type=int, default=192)
    p.add_argument("--digits", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 192, 512, 1024, 2048])
    p.add_argument("--eval", type=int, default=40, help="prompts per length")
    p.add_argument("--eval-batch", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", help="model names to run (default: both; none: only merge --rows-from)")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument(
        "--rows-from",
        type=Path,
        nargs="+",
        help="passkey.json files of earlier runs with the same settings: the rows of models not run here "
        "(the first file that has a model wins)",
    )
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    todo = [(name, mixer, kw) for name, (mixer, kw) in models(args.block, args.top_k).items()]
    todo = [t for t in todo if args.only is None or t[0] in args.only]
    rows, info = [], {}
    if todo:
        with ProcessPoolExecutor(max_workers=len(todo)) as pool:  # one process (one thread) per model
            for name, r, i in pool.map(run_one, todo, [args] * len(todo)):
                rows += r
                info[name] = i
    sources = []
    for path in args.rows_from or []:  # the other models' rows from earlier runs with the same settings
        earlier = json.loads(path.read_text())
        same = ("out", "only", "rows_from")
        diff = {k: v for k, v in earlier["meta"]["args"].items() if k not in same and vars(args).get(k) != v}
        if diff:
            raise SystemExit(f"--rows-from {path} was run with other settings: {diff}")
        for name, i in earlier["meta"]["training"].items():
            if name not in info:
                info[name] = i
                rows += [r for r in earlier["rows"] if r["model"] == name]
                sources.append({"model": name, "path": str(path), "command": earlier["meta"]["command"]})
    meta = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "args": {k: json.loads(json.dumps(v, default=str)) for k, v in vars(args).items()},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "machine": machine_info(),
        "training": info,
        "rows_from": sources,
        "note": "busy shared 2-core CPU; accuracies do not depend on the load, times do",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "passkey.json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=1))
    lines = [
        f"Command: `{meta['command']}`; load average before {load_before[0]:.1f}, "
        f"after {meta['load_average_after'][0]:.1f} (busy shared 2-core CPU)",
        "",
        "| model | " + " | ".join(str(T) for T in args.lengths) + " | train s | final loss |",
        "|---|" + "---|" * (len(args.lengths) + 2),
    ]
    for name in info:
        acc = [f"{r['accuracy']:.2f}" for r in rows if r["model"] == name]
        lines.append(
            f"| {name} | " + " | ".join(acc) + f" | {info[name]['train_s']:.0f} | {info[name]['final_loss']:.3f} |"
        )
    (args.out / "passkey.md").write_text("\n".join(lines) + "\n")
    plot(rows, args, args.out / "passkey.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
