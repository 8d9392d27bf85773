"""``python -m effattn bench streaming``: StreamingLLM on a stream 8x longer than training, with and
without positions inside the cache.

Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks": a model trained at a
short context keeps its loss flat over an unbounded stream when its cache holds a few *sink* tokens
plus a window of recent ones *and* positions are counted inside the cache (keys cached before RoPE,
rotated by their slot at each step). This suite checks that claim on a model of ours:

1. train a small :class:`effattn.nn.LM` (``--layers`` layers, width ``--dim``, RoPE, causal attention)
   on ``--train-len``-byte windows (default 128) of the standard-library byte corpus
   (:func:`effattn.data.byte_corpus`, ``"train"`` split) for ``--steps`` AdamW steps (seeded);
2. stream ``--streams`` validation windows of ``--factor`` x ``--train-len`` bytes (default 8 x 128 =
   1024) through it one token at a time and record the next-byte loss at every position, for:

   - ``dense``: every token kept, positions 0..T-1 (the whole stream in one causal forward: the same
     result as token-by-token with a full cache), so both the distances and the positions grow
     past training;
   - ``sinks+window, cache positions``: ``make_policy("streaming_llm", budget=--budget, sinks=4)``
     (re-indexed: the paper's rule);
   - ``sinks+window, text positions``: the same cache with ``reindex=False`` (each token keeps the
     position it was encoded at; the distance to the sinks grows with the stream);
   - ``window only, cache positions``: ``sinks=0``.

Per row: mean loss (nats/byte) over position bins (inside training, 1-2x, 2-4x, 4-8x the training
length). ``streaming.png`` plots the loss per position (a running mean over ``--smooth`` positions).
One seed, one small model: a qualitative check of the claim, not a measurement of its size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from effattn.bench import suite
from effattn.bench.harness import command_line, load_snapshot, machine_info, write_report
from effattn.bench.table import Column, print_table

__all__ = ["add_arguments", "run", "stream_losses", "train_lm", "write_plot"]

METHODS = {  # name -> StreamingLLM settings (None: the dense model over the whole stream)
    "dense": None,
    "sinks+window, cache positions": {"sinks": 4, "reindex": True},
    "sinks+window, text positions": {"sinks": 4, "reindex": False},
    "window only, cache positions": {"sinks": 0, "reindex": True},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds): 30 steps, 2 streams of 2x")
    p.add_argument("--train-len", type=int, default=128, help="training context in bytes (default: %(default)s)")
    p.add_argument("--factor", type=int, default=8, help="stream length / training context (default: %(default)s)")
    p.add_argument("--steps", type=int, default=800, help="training steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="training windows per step (default: %(default)s)")
    p.add_argument("--dim", type=int, default=128, help="model width (default: %(default)s)")
    p.add_argument("--layers", type=int, default=3, help="attention layers (default: %(default)s)")
    p.add_argument("--budget", type=int, default=64, help="tokens the streaming cache keeps (default: %(default)s)")
    p.add_argument("--streams", type=int, default=8, help="validation streams (default: %(default)s)")
    p.add_argument("--smooth", type=int, default=32, help="running mean in the plot (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and of the streams (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--device", type=str, default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--out", type=str, default="bench_out/streaming", help="report folder (default: %(default)s)")


def train_lm(args: argparse.Namespace):
    """The small LM trained on ``--train-len`` windows; returns ``(model, final training loss)``."""
    from effattn.data import byte_corpus, sample_windows
    from effattn.nn import LM, LMConfig

    torch.manual_seed(args.seed)
    cfg = LMConfig(vocab_size=256, dim=args.dim, n_layers=args.layers, heads=4, max_seq_len=args.train_len)
    model = LM(cfg).to(args.device)
    data = byte_corpus("train")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    loss = float("nan")
    for step in range(args.steps):
        x, y = sample_windows(data, args.batch, args.train_len, g)
        logits, _ = model(x.long().to(args.device))
        loss_t = F.cross_entropy(logits.flatten(0, 1), y.to(args.device).flatten())
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = loss_t.item()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: train loss {loss:.3f}", flush=True)
    return model.eval(), loss


@torch.no_grad()
def stream_losses(model, x: torch.Tensor, settings: dict | None, budget: int) -> torch.Tensor:
    """Next-token losses ``[B, T - 1]`` of ``x [B, T]`` streamed one token at a time through the StreamingLLM
    cache ``settings`` (``None``: one causal forward over the whole stream, every token kept)."""
    from effattn.kv import make_policy

    if settings is None:
        logits = model(x[:, :-1])[0]
    else:
        state = model.compressed_state(make_policy("streaming_llm", budget=budget, **settings))
        outs = []
        for t in range(x.shape[1] - 1):
            lo, state = model(x[:, t : t + 1], state)
            outs.append(lo)
        logits = torch.cat(outs, 1)
    return F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")


@suite(
    "streaming",
    add_arguments=add_arguments,
    summary="StreamingLLM: loss over a stream 8x the training length, with/without positions inside the cache",
    description=__doc__,
)
def run(args: argparse.Namespace) -> None:
    from effattn.data import byte_corpus, sample_windows

    if args.quick:
        args.steps, args.streams, args.factor, args.train_len, args.budget = 30, 2, 2, 64, 32
    torch.set_num_threads(max(1, args.threads))
    load_before = load_snapshot()
    t0 = time.perf_counter()
    model, train_loss = train_lm(args)
    train_s = time.perf_counter() - t0
    T = args.factor * args.train_len
    x, _ = sample_windows(byte_corpus("validation"), args.streams, T + 1, torch.Generator().manual_seed(args.seed + 1))
    x = x.long().to(args.device)
    losses, rows = {}, []
    bins = [(0, args.train_len)] + [(args.train_len * a, args.train_len * b) for a, b in ((1, 2), (2, 4), (4, 8))]
    bins = [(lo, min(hi, T)) for lo, hi in bins if lo < T]
    for name, settings in METHODS.items():
        t1 = time.perf_counter()
        per_pos = stream_losses(model, x, settings, args.budget).mean(0)  # [T]
        losses[name] = per_pos.tolist()
        row = {"method": name, "stream_s": time.perf_counter() - t1}
        for lo, hi in bins:
            row[f"loss_{lo}_{hi}"] = per_pos[lo:hi].mean().item()
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith("loss")), flush=True)
    load_after = load_snapshot()
    cols = ["method"] + [f"loss_{lo}_{hi}" for lo, hi in bins] + ["stream_s"]
    print_table(f"next-byte loss (nats) by position, trained at {args.train_len}", rows, [Column(c) for c in cols])
    notes = [
        f"model: LM dim {args.dim}, {args.layers} attention layers, 4 heads, RoPE; trained {args.steps} steps "
        f"x {args.batch} windows of {args.train_len} bytes in {train_s:.0f} s (final train loss {train_loss:.3f})",
        f"streams: {args.streams} validation windows of {T} bytes; StreamingLLM budget {args.budget}",
        f"load average before {load_before}, after {load_after}",
        "one seed, one small model: a qualitative check",
    ]
    out = Path(args.out)
    meta = {"command": command_line(), "machine": machine_info(args.device), "load": [load_before, load_after]}
    write_report(out, "streaming", rows, cols, meta=meta, notes=notes)
    (out / "streaming_losses.json").write_text(json.dumps({"train_len": args.train_len, "losses": losses}))
    png = write_plot(out, losses, args.train_len, args.smooth, args.budget)
    print(f"report: {out / 'streaming.md'}" + (f", plot: {out / png}" if png else ""))


def write_plot(out: Path, losses: dict, train_len: int, smooth: int, budget: int) -> str | None:
    """``streaming.png``: loss per position (running mean over ``smooth``), and below it each streaming
    cache's loss minus that of the re-indexed sinks+window cache; the training length is marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    def smoothed(per_pos):
        y = torch.tensor(per_pos)
        k = max(1, min(smooth, y.numel()))
        return torch.arange(y.numel() - k + 1) + (k - 1) / 2, F.avg_pool1d(y[None, None], k, stride=1)[0, 0]

    fig, (ax, dax) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ref_name = "sinks+window, cache positions"
    styles = {"dense": ("-", 1.3), ref_name: ("-", 2.4), "sinks+window, text positions": ("--", 1.4)}
    for i, (name, per_pos) in enumerate(losses.items()):
        ls, lw = styles.get(name, (":", 1.6))
        xs, ys = smoothed(per_pos)
        ax.plot(xs.tolist(), ys.tolist(), linestyle=ls, color=f"C{i}", label=name, linewidth=lw)
        if ref_name in losses and name not in (ref_name, "dense"):  # dense is far above: upper panel
            diff = [a - b for a, b in zip(per_pos, losses[ref_name])]
            xs, ys = smoothed(diff)
            dax.plot(xs.tolist(), ys.tolist(), linestyle=ls, color=f"C{i}", label=name, linewidth=lw)
    for a in (ax, dax):
        a.axvline(train_len, color="gray", linewidth=1, linestyle="-.")
        a.grid(True, alpha=0.3)
    ax.text(train_len, 0.02, " training length", transform=ax.get_xaxis_transform(), fontsize=8, color="gray")
    dax.axhline(0.0, color="C1", linewidth=1.2)
    ax.set_ylabel(f"next-byte loss (nats)\nrunning mean over {smooth}")
    dax.set_ylabel("loss - loss of sinks+window,\ncache positions (nats)", fontsize=9)
    dax.set_xlabel("position in the stream (bytes)")
    factor = len(next(iter(losses.values()))) / train_len
    ax.set_title(f"StreamingLLM (cache of {budget} tokens) on a stream {factor:g}x the training length")
    ax.legend(fontsize=8, loc="upper left")
    fig.align_ylabels((ax, dax))
    fig.tight_layout()
    fig.subplots_adjust(left=0.12)
    fig.savefig(out / "streaming.png", dpi=110)
    plt.close(fig)
    return "streaming.png"
