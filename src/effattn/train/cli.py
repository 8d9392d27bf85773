"""``python -m effattn train``: train an LM of any mixer pattern on a byte corpus, text files or token ids.

    python -m effattn train --mixers gated_deltanet,attention --layers 4 --dim 256 --steps 500 \\
        --seq-len 512 --batch-size 8 --eval-every 100 --save-every 100 --out runs/gdn
    python -m effattn train --out runs/gdn --resume --steps 1000          continue exactly
    python -m effattn train --data my.txt other.txt --checkpoint block --chunked-loss 1024
    torchrun --nproc-per-node 2 -m effattn train --parallel ddp ...      (or fsdp, or --sequence-parallel ring)

Data: ``stdlib`` (default: the standard library's sources, bytes as tokens, a fixed validation
split), text files (bytes as tokens), or one ``.bin`` of token ids (``--bin-dtype``). Prints loss,
tokens/s and memory (a rich progress bar when rich is installed), validation loss and perplexity;
writes ``history.json``, ``loss.png`` and checkpoints (``--save-every``) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from effattn.nn import CHECKPOINT_MODES, LMConfig
from effattn.train.checkpoint import CheckpointError
from effattn.train.loop import PARALLEL, TrainConfig, train

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``effattn train``.

    >>> import argparse
    >>> p = argparse.ArgumentParser(); add_arguments(p)
    >>> a = p.parse_args(["--mixers", "gla,attention", "--checkpoint", "block", "--steps", "3"])
    >>> a.mixers, a.checkpoint, a.steps
    ('gla,attention', 'block', 3)
    """
    m = p.add_argument_group("model")
    m.add_argument("--mixers", default="attention", help="mixer per layer, comma-separated, repeated to --layers")
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--dim", type=int, default=256)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=None)
    m.add_argument("--vocab-size", type=int, default=256, help="256 for bytes; the .bin's vocabulary otherwise")
    m.add_argument("--mlp-ratio", type=float, default=4.0)
    fields = {f.name for f in dataclasses.fields(LMConfig)}
    if "ffn" in fields:  # MoE layers, when effattn.nn.LM has them
        m.add_argument("--ffn", default=None, help="feed-forward per layer: 'dense' or 'moe', comma-separated")
        m.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
        m.add_argument("--top-k", type=int, default=2, help="experts per token")
    mem = p.add_argument_group("training memory (docs/train.md)")
    mem.add_argument("--checkpoint", choices=CHECKPOINT_MODES, default="none", help="recompute this part in backward")
    mem.add_argument("--reversible", action="store_true", help="reversible two-stream residual (RevNet coupling)")
    mem.add_argument("--chunked-mlp", type=int, default=0, metavar="TOKENS", help="MLP in sequence chunks (0: off)")
    mem.add_argument("--chunked-loss", type=int, default=0, metavar="ROWS", help="loss without full logits (0: off)")
    mem.add_argument("--mesa", action="store_true", help="store saved activations in int8 (inexact, bounded)")
    mem.add_argument(
        "--streambp",
        type=int,
        default=0,
        metavar="TOKENS",
        help="StreamBP: exact backward in sequence chunks, attention mixers only (0: off)",
    )
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", default=["stdlib"], help="'stdlib', text files, or one .bin of token ids")
    d.add_argument("--bin-dtype", default="uint16", choices=("uint8", "uint16", "int32", "int64"))
    d.add_argument("--max-bytes", type=int, default=None, help="use only the first tokens of the data")
    t = p.add_argument_group("optimization")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=8, help="sequences per micro-step (global)")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=10)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--z-loss", type=float, default=0.0)
    t.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16: autocast")
    t.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--out", default=None, help="directory for checkpoints, history.json and loss.png")
    r.add_argument("--eval-every", type=int, default=0, help="validation loss every N steps (0: at the end only)")
    r.add_argument("--eval-batches", type=int, default=4)
    r.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (needs --out)")
    r.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    r.add_argument("--parallel", choices=PARALLEL, default="none", help="under torchrun: ddp or fsdp (FSDP2)")
    r.add_argument("--sequence-parallel", default=None, metavar="METHOD", help="ring, token_ring or ulysses")
    r.add_argument("--device", default=None)
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--no-plot", action="store_true")


def configs(args: argparse.Namespace) -> tuple[LMConfig, TrainConfig]:
    """The model and train configs of parsed ``args`` (bad values raise ``ValueError`` naming them)."""
    extra = {}
    if getattr(args, "ffn", None):
        extra = {"ffn": args.ffn, "moe": {"num_experts": args.experts, "top_k": args.top_k}}
    model = LMConfig(
        vocab_size=args.vocab_size,
        dim=args.dim,
        n_layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        mixers=args.mixers,
        mlp_ratio=args.mlp_ratio,
        max_seq_len=args.seq_len,
        checkpoint=args.checkpoint,
        reversible=args.reversible,
        chunked_mlp=args.chunked_mlp,
        chunked_loss=args.chunked_loss,
        mesa=args.mesa,
        streambp=args.streambp,
        **extra,
    )
    data = args.data[0] if args.data == ["stdlib"] else list(args.data)
    cfg = TrainConfig(
        data=data,
        bin_dtype=args.bin_dtype,
        max_bytes=args.max_bytes,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        label_smoothing=args.label_smoothing,
        z_loss=args.z_loss,
        dtype=args.dtype,
        eval_every=args.eval_every or args.steps,
        eval_batches=args.eval_batches,
        save_every=args.save_every,
        out_dir=args.out,
        resume=args.resume,
        seed=args.seed,
        parallel=args.parallel,
        sequence_parallel=args.sequence_parallel,
        progress=not args.no_progress,
        plot=not args.no_plot,
        device=args.device,
    )
    return model, cfg


def main(args: argparse.Namespace) -> dict:
    """Run ``effattn train`` with parsed ``args``; a bad option or path exits with its message."""
    try:
        model, cfg = configs(args)
        history = train(model, cfg)
    except (ValueError, TypeError, FileNotFoundError, CheckpointError, NotImplementedError) as e:
        raise SystemExit(f"effattn train: error: {e}") from e
    if history["val"]:
        step, val = history["val"][-1]
        print(
            f"step {step}: validation loss {val:.4f} (perplexity {math.exp(min(val, 50)):.2f}); "
            f"{history['tokens_per_s']:,.0f} tokens/s; peak {history['peak_mib']:,.0f} MiB",
            file=sys.stderr,
        )
    return history
