"""``python -m effattn bench models``: a ~20M-parameter language model of every mixer family.

For each registered mixer (:func:`effattn.nn.list_mixers`), an :class:`effattn.nn.LM` with that mixer
in every layer (dim 384, 8 layers, 6 heads, vocabulary 16384, tied embeddings; ``--quick``: 4 layers)
is measured on the same machine in one run:

- training throughput: tokens/s of forward + backward + AdamW step on a batch of ``4 x 1024``
  tokens (``--quick``: ``2 x 256``), median of repeats;
- at each context length (default 1k / 8k / 32k, ``--quick`` 256 / 1k, ``--lengths`` overrides):
  prefill time of one sequence, decoding throughput (tokens/s of one-token steps against the
  prefilled state), and the decoding state in bytes per sequence (KV caches grow with the
  context, recurrent states do not).

Every measurement is guarded: a mixer that fails or exceeds the time budget is reported in its
row (``error``) and the suite goes on. The number of parameters of every model is printed.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F

from effattn.bench import suite
from effattn.bench.cli import add_common_arguments
from effattn.bench.harness import command_line, machine_info, measure_time, run_guarded, sync, write_report
from effattn.bench.table import Column, format_value, print_table
from effattn.nn import LM, LMConfig, list_mixers

VOCAB = 16384
DIM, HEADS = 384, 6
# a prefill slower than this (seconds) skips the mixer's longer contexts
PREFILL_BUDGET_S = 120.0
# above this context the prefill is timed once, without warm-up
LONG_CONTEXT = 4096


def model_config(mixer: str, n_layers: int, max_len: int) -> LMConfig:
    return LMConfig(
        vocab_size=VOCAB, dim=DIM, n_layers=n_layers, heads=HEADS, mixers=mixer, max_seq_len=max(max_len, 2048)
    )


def measure_training(model: LM, batch: int, T: int, repeats: int, device: str) -> dict:
    """tokens/s of one optimizer step (forward, cross-entropy, backward, AdamW)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (batch, T + 1), device=device)

    def step():
        logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    sec = measure_time(step, repeats=repeats, warmup=1, device=device)
    model.eval()
    return {"train_tok_s": batch * T / sec, "train_step_s": sec}


@torch.no_grad()
def measure_context(model: LM, L: int, n_decode: int, repeats: int, device: str) -> dict:
    """Prefill time of one sequence of ``L`` tokens, then decoding tokens/s and state bytes."""
    ids = torch.randint(0, VOCAB, (1, L), device=device)
    last = {}

    def prefill():
        last["out"] = model(ids)

    # long contexts: one timed prefill, whose state the decode steps then use
    long = L > LONG_CONTEXT
    prefill_s = measure_time(prefill, repeats=1 if long else repeats, warmup=0 if long else 1, device=device)
    logits, state = last.pop("out")
    tok = logits[:, -1:].argmax(-1)
    logits, state = model(tok, state)  # warm-up step
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n_decode):
        tok = logits[:, -1:].argmax(-1)
        logits, state = model(tok, state)
    sync(device)
    decode_s = time.perf_counter() - t0
    return {
        "prefill_s": prefill_s,
        "decode_tok_s": n_decode / decode_s,
        "state_MiB": model.state_size(L, batch=1) / 2**20,
    }


DEFAULT_LENGTHS = (1024, 8192, 32768)
QUICK_LENGTHS = (256, 1024)

# the terminal summary (the report files hold every column)
TERMINAL_COLUMNS = (
    Column("mixer", text=True, min_width=12, key_column=True),
    Column("params_M", "params M"),
    Column("L", key_column=True),
    Column("train_tok_s", "train tok/s"),
    Column("prefill_s", "prefill s"),
    Column("decode_tok_s", "decode tok/s"),
    Column("state_MiB", "state MiB"),
    Column("error", text=True),
)


def _progress(r: dict) -> None:
    """One readable line per measured row while the suite runs (the table comes at the end)."""
    parts = [f"{c.title} {format_value(r[c.key])}" for c in TERMINAL_COLUMNS[1:-1] if r.get(c.key) is not None]
    print(f"{r['mixer']}: " + (r.get("error") or ", ".join(parts)), flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The models suite's options."""
    add_common_arguments(
        p,
        "models",
        lengths=DEFAULT_LENGTHS,
        quick_lengths=QUICK_LENGTHS,
        quick="a smaller model (4 layers) and batch, short contexts",
        lengths_help="comma-separated context lengths for prefill and decoding",
    )
    p.add_argument(
        "--mixers",
        type=str,
        default=None,
        metavar="A,B,...",
        help="comma-separated mixers, one model each (default: every registered mixer)",
    )


@suite(
    "models",
    add_arguments=add_arguments,
    summary="a ~20M-parameter LM per mixer: training tokens/s, prefill, decoding, state size",
    description=__doc__,
)
def run(args: argparse.Namespace) -> None:
    lengths = (
        [int(x) for x in args.lengths.split(",")]
        if args.lengths
        else list(QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    )
    n_layers = 4 if args.quick else 8
    batch, T_train = (2, 256) if args.quick else (4, 1024)
    n_decode = 8 if args.quick else 32
    repeats = max(1, args.repeats)
    device = args.device
    mixers = getattr(args, "mixers", None)
    mixers = [m.strip() for m in mixers.split(",")] if isinstance(mixers, str) else list_mixers()
    rows = []
    for mixer in mixers:
        torch.manual_seed(0)
        cfg_args = (mixer, n_layers, max(lengths))
        built = run_guarded(lambda a=cfg_args: {"model": LM(model_config(*a)).to(device)})
        if "error" in built:
            rows.append({"mixer": mixer, **built})
            _progress(rows[-1])
            continue
        model = built["model"]
        params = model.num_parameters()
        print(f"{mixer}: {params / 1e6:.2f}M parameters", flush=True)
        base = {"mixer": mixer, "params_M": params / 1e6}
        train = run_guarded(functools.partial(measure_training, model, batch, T_train, repeats, device))
        rows.append({**base, "L": None, **train})
        _progress(rows[-1])
        skip = None
        for L in lengths:
            if skip:
                rows.append({**base, "L": L, "error": skip})
                continue
            r = run_guarded(functools.partial(measure_context, model, L, n_decode, repeats, device))
            rows.append({**base, "L": L, **r})
            _progress(rows[-1])
            if "error" in r:
                skip = f"skipped after the error at L={L}"
            elif r["prefill_s"] > PREFILL_BUDGET_S:
                skip = f"skipped: prefill at L={L} took {r['prefill_s']:.0f}s > {PREFILL_BUDGET_S:.0f}s"
        model = built = None  # free the model before building the next one
    notes = [
        f"LM: dim {DIM}, {n_layers} layers, {HEADS} heads, vocab {VOCAB}, tied embeddings, SwiGLU MLP, "
        "one mixer in every layer (default mixer settings), float32",
        f"training: batch {batch} x {T_train} tokens, forward + backward + AdamW, median of {repeats}",
        f"prefill: one sequence, median of {repeats} after a warm-up (one run, no warm-up, above "
        f"L={LONG_CONTEXT}); decode: {n_decode} one-token steps after the prefill",
        "state_MiB: decoding state per sequence (KV caches, recurrent + conv states) at context L",
    ]
    meta = {
        "command": command_line(),
        "machine": machine_info(device),
        "lengths": lengths,
        "n_layers": n_layers,
        "dim": DIM,
        "heads": HEADS,
        "vocab": VOCAB,
    }
    cols = ["mixer", "params_M", "L", "train_tok_s", "prefill_s", "decode_tok_s", "state_MiB", "error"]
    path = write_report(args.out, "models", rows, cols, meta=meta, notes=notes)
    print_table("models: training, prefill and decoding per mixer (L: context; none: training)", rows, TERMINAL_COLUMNS)
    print(f"report: {path}")
