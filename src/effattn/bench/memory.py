"""``python -m effattn bench memory``: learned long-term memories on passkey retrieval past the window, and speed.

Two parts (``--parts``, default both):

- ``passkey``: one small :class:`effattn.nn.LM` per model (2 layers, width 64, 2 heads unless the
  model says otherwise) trained on generated passkey prompts (:mod:`effattn.bench.tasks.passkey`,
  place-tagged digits, random needle depth) at short contexts (``--train-len``, log-uniform per step),
  then evaluated at contexts up to 32x the attention window (``--contexts``): per-digit and whole-key
  accuracy (chance 0.1 and ``10^-digits``). Every attention in the models sees at most ``--window``
  keys (the SWA of Titans MAL/MAG, the segment of Titans MAC and Infini-attention), so past the window
  a key can only come back through the memory. Baselines: sliding-window attention at the same window
  (``swa``) and at the window whose KV cache equals Titans MAG's whole state (``swa_eq``), and Gated
  DeltaNet with one head (its ``[64, 64]`` state per layer, the largest a width-64 GDN holds). State
  bytes per model (``LM.state_size`` at the longest context) are in the table. Further models, not in the
  default list (``EXTRA_MODELS``): Infini-attention with short convolutions on q and k
  (``infini_attention_conv``), recurrent memory tokens per layer (``rmt``, the mixer) and through the whole
  stack (``rmt_stack``, :class:`effattn.nn.RecurrentMemoryLM`: causal attention over each segment and its
  memory tokens), with segments of ``--window`` tokens and 4 memory tokens, and the Miras memories
  (``moneta``, ``yaad``, ``memora``: a memory alone, as ATLAS, no attention). The neural memories
  train and evaluate with the chunked form (``--chunk-size``: gradients inside a chunk taken at the
  chunk-start memory, Titans' parallel form); ``--exact-context`` re-evaluates them with the exact
  token-by-token rule (``chunk_size=1``) at one context, with the same weights.
- ``speed`` (:mod:`effattn.bench.memory_speed`): each memory mixer alone (width 64, 2 heads, batch 1) at
  ``--lengths``: forward and forward+backward time, peak memory, one decode step, state bytes, in the
  mixers' default chunked form; the fast form paired with the materialized one (before/after) and the
  token-by-token rule for Titans MAL/MAG/MAC; titans-pytorch as a labelled external row where installed;
  sliding-window attention and Gated DeltaNet beside them.

The load average is recorded before and after each part; above the core count the part is marked busy.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from effattn.bench import harness, suite
from effattn.bench.memory_report import passkey_table_rows, plot_passkey, saved_passkey_rows
from effattn.bench.memory_speed import SPEED_MIXERS, run_speed, speed_row  # noqa: F401 (speed part, re-exported)
from effattn.bench.tasks.passkey import DEFAULT_VOCAB_SIZE, IGNORE_INDEX, make_passkey
from effattn.bench.train import build_lm, lr_at

PARTS = ("passkey", "speed")
MEMORY_MODELS = ("titans_mal", "titans_mag", "titans_mac", "atlas", "infini_attention")
BASELINES = ("swa", "swa_eq", "gated_deltanet")
EXTRA_MODELS = ("infini_attention_conv", "rmt", "rmt_stack", "moneta", "yaad", "memora")
DIM, HEADS, LAYERS = 64, 2, 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The memory suite's options."""
    p.add_argument("--quick", action="store_true", help="a few training steps at tiny contexts (seconds; tests)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run (default: %(default)s)")
    p.add_argument(
        "--models",
        default=",".join(MEMORY_MODELS + BASELINES),
        help=f"passkey: comma-separated models, of these and {', '.join(EXTRA_MODELS)} (default: %(default)s)",
    )
    p.add_argument("--window", type=int, default=64, help="attention window / segment of every model (default: 64)")
    p.add_argument(
        "--contexts", default="128,256,512,1024,2048", help="passkey: evaluation contexts (default: %(default)s)"
    )
    p.add_argument(
        "--train-len", default="64,256", metavar="MIN,MAX", help="passkey: training contexts (default: %(default)s)"
    )
    p.add_argument("--steps", type=int, default=300, help="passkey: training steps per model (default: 300)")
    p.add_argument(
        "--tokens-per-step", type=int, default=1024, help="passkey: tokens per training batch (default: %(default)s)"
    )
    p.add_argument("--lr", type=float, default=3e-3, help="passkey: AdamW learning rate (default: 3e-3)")
    p.add_argument(
        "--weight-decay",
        type=float,
        default=0.1,
        help="passkey: AdamW weight decay of the weight matrices; biases, gains and other 1-D parameters (the "
        "memories' gate biases among them) are not decayed (default: %(default)s)",
    )
    p.add_argument(
        "--curriculum",
        type=float,
        default=0.0,
        metavar="FRAC",
        help="passkey: over the first FRAC of the steps the longest training context grows linearly from the "
        "shortest (--train-len MIN) to the longest (MAX); 0: MIN..MAX from the first step (default: %(default)s)",
    )
    p.add_argument(
        "--heads",
        type=int,
        default=HEADS,
        help="passkey: heads of every model but Gated DeltaNet, which keeps one (default: %(default)s)",
    )
    p.add_argument(
        "--theta-max",
        type=float,
        default=None,
        help="passkey: largest step size of the neural memories (theta_t = theta_max * sigmoid(.)) (default: the "
        "memories' own, 1.0)",
    )
    p.add_argument(
        "--forget-bias",
        type=float,
        default=None,
        help="passkey: initial bias of the neural memories' forgetting gate, alpha_t = sigmoid(w x + bias) (default: "
        "the memories' own, -3: alpha 0.047, half the memory gone in ~14 tokens)",
    )
    p.add_argument(
        "--max-grad-norm",
        type=_float_or_none,
        default=1.0,
        help="passkey: clip each token's memory gradient to this norm, 'none' for no clipping (NeuralMemory's "
        "max_grad_norm) (default: %(default)s)",
    )
    p.add_argument(
        "--conv-size",
        type=int,
        default=None,
        help="passkey: the neural memories' short convolution on q, k, v, 0 for none (default: the memories' own, 4)",
    )
    p.add_argument(
        "--conv-values",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="passkey: --conv-values also convolves the neural memories' v (the papers' block), --no-conv-values "
        "q and k only (NeuralMemory's conv_values; default: the memories' own, q and k only)",
    )
    p.add_argument("--digits", type=int, default=4, help="passkey: digits of the key (default: 4)")
    p.add_argument("--depth", type=int, default=1, help="depth of the neural memories' MLP (default: 1)")
    p.add_argument(
        "--chunk-size", type=int, default=16, help="chunk of the neural memories' parallel form (default: %(default)s)"
    )
    p.add_argument("--eval-examples", type=int, default=32, help="passkey: prompts per context (default: 32)")
    p.add_argument(
        "--exact-context",
        type=int,
        default=256,
        help="passkey: context of the token-by-token re-check (default: %(default)s)",
    )
    p.add_argument("--lengths", default="512,2048", help="speed: sequence lengths (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="speed: timed runs after a warm-up (default: 3)")
    p.add_argument(
        "--token-max-len",
        type=int,
        default=512,
        help="speed: longest T at which the token-by-token rule is timed (default: %(default)s)",
    )
    p.add_argument(
        "--speed-mixers",
        default="all",
        help="speed: comma list of mixers (and 'external' for the titans-pytorch row) to time (default: %(default)s)",
    )
    p.add_argument(
        "--workers", type=int, default=2, help="passkey: models trained in parallel processes (default: %(default)s)"
    )
    p.add_argument(
        "--report-only",
        default=None,
        metavar="LOAD NOTE",
        help="passkey: train nothing; rebuild the report from the passkey_<model>.json files under --out (a run "
        "split over processes) with this note on the machine's load while they ran (default: none, measure)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of data and initialisation (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    p.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu, cuda (default: %(default)s)")
    p.add_argument("--out", default=None, help="report folder (default: bench_out/memory)")


def _float_or_none(text: str) -> float | None:
    return None if str(text).strip().lower() == "none" else float(text)


def _ints(text: str) -> list[int]:
    return [int(t) for t in str(text).split(",") if t.strip()]


def model_spec(
    name: str,
    window: int,
    depth: int,
    chunk_size: int,
    heads: int = HEADS,
    theta_max: float | None = None,
    max_grad_norm: float | None = 1.0,
    conv_size: int | None = None,
    conv_values: bool | None = None,
) -> tuple[str, dict, int]:
    """``(mixer, mixer kwargs, heads)`` of passkey model ``name`` (``swa_eq``'s window is set by
    :func:`equal_state_window`)."""
    mem = dict(depth=depth, chunk_size=chunk_size, max_grad_norm=max_grad_norm)
    if theta_max is not None:
        mem["theta_max"] = theta_max
    if conv_size is not None:
        mem["conv_size"] = conv_size
    if conv_values is not None:
        mem["conv_values"] = conv_values
    specs = {
        "titans_mal": ("titans_mal", dict(window=window, **mem), heads),
        "titans_mag": ("titans_mag", dict(window=window, **mem), heads),
        "titans_mac": ("titans_mac", dict(segment=window, **mem), heads),
        "atlas": ("atlas", dict(**mem), heads),
        "moneta": ("moneta", dict(**mem), heads),
        "yaad": ("yaad", dict(**mem), heads),
        "memora": ("memora", dict(**mem), heads),
        "infini_attention": ("infini_attention", dict(segment=window), heads),
        "infini_attention_conv": ("infini_attention", dict(segment=window, conv_size=4), heads),
        "rmt": ("rmt", dict(segment=window, num_memory=4), heads),
        "rmt_stack": ("attention", dict(recurrent_memory=dict(segment=window, num_memory=4)), heads),
        "swa": ("sliding_window", dict(window=window), heads),
        "swa_eq": ("sliding_window", dict(window=window), heads),
        "gated_deltanet": ("gated_deltanet", {}, 1),
    }
    if name not in specs:
        raise SystemExit(f"unknown passkey model {name!r}; choose from {', '.join(specs)}")
    return specs[name]


def _spec(name: str, args: argparse.Namespace, window: int | None = None) -> tuple[str, dict, int]:
    return model_spec(
        name,
        window or args.window,
        args.depth,
        args.chunk_size,
        getattr(args, "heads", HEADS),
        getattr(args, "theta_max", None),
        getattr(args, "max_grad_norm", 1.0),
        getattr(args, "conv_size", None),
        getattr(args, "conv_values", None),
    )


def build_model(name: str, args: argparse.Namespace, max_len: int, window: int | None = None):
    mixer, kw, heads = _spec(name, args, window)
    model = build_lm(mixer, DIM, heads, DEFAULT_VOCAB_SIZE, LAYERS, max_seq_len=max_len + args.digits, **kw)
    if getattr(args, "forget_bias", None) is not None:
        set_forget_bias(model, args.forget_bias)
    return model


def set_forget_bias(model: torch.nn.Module, bias: float) -> int:
    """Set the initial bias of the forgetting gate ``alpha_t = sigmoid(w_alpha x + bias)`` (Titans, Behrouz
    et al. 2025) of every neural memory of ``model`` to ``bias``; returns how many memories were changed. The
    gate projection's bias holds ``[theta, eta, alpha, (gamma)]`` blocks of one value per head
    (:class:`effattn.memory.NeuralMemory`).

    Example::

        >>> from effattn.memory import NeuralMemory
        >>> mem = torch.nn.Sequential(NeuralMemory(8, 2))
        >>> set_forget_bias(mem, -6.0), mem[0].gate_proj.bias.view(-1, 2)[2].tolist()
        (1, [-6.0, -6.0])
    """
    from effattn.memory import NeuralMemory

    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NeuralMemory):
                m.gate_proj.bias.view(-1, m.heads)[2].fill_(bias)
                n += 1
    return n


def optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019) with ``weight_decay`` on the
    weight matrices only: biases and gains (1-D parameters) are not pulled to zero, since a decayed gate bias
    would drift the memories' initial forgetting towards ``sigmoid(0) = 0.5``.

    Example::

        >>> opt = optimizer(torch.nn.Linear(4, 3), 1e-3, 0.1)
        >>> [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups]
        [(1, 0.1), (1, 0.0)]
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.98))


def equal_state_window(args: argparse.Namespace, max_len: int) -> tuple[int, int]:
    """The sliding window whose KV cache at ``max_len`` is closest to Titans MAG's whole state
    (memory, momentum and its own window cache), and that state in bytes."""
    target = build_model("titans_mag", args, max_len).state_size(max_len)
    w1, w2 = args.window, 2 * args.window  # a window cache's bytes are linear in the window below max_len
    b1, b2 = (build_model("swa", args, max_len, window=w).state_size(max_len) for w in (w1, w2))
    return max(1, w1 + round((target - b1) * (w2 - w1) / (b2 - b1))), target


def train_shape(
    step: int, lo: int, hi: int, tokens: int, seed: int, steps: int = 1, curriculum: float = 0.0
) -> tuple[int, int]:
    """``(context, batch)`` of training step ``step``: the context ``T = exp(log lo + u (log hi - log lo))``,
    log-uniform in ``[lo, hi]`` with ``u`` drawn from ``seed`` and ``step`` (with a curriculum, ``hi`` grows
    linearly from ``lo`` over the first ``curriculum`` of the ``steps``: short prompts first, as in the
    length curricula of long-context training), and the batch ``tokens // T``.

    Example::

        >>> train_shape(0, 48, 192, 768, 0, steps=100, curriculum=0.5)
        (48, 16)
        >>> lo, hi = 48, 192
        >>> all(lo <= train_shape(s, lo, hi, 768, 0)[0] <= hi for s in range(50))
        True
    """
    if curriculum > 0:
        hi = min(hi, round(lo + (hi - lo) * step / max(1.0, curriculum * steps)))
    u = torch.rand(1, generator=torch.Generator().manual_seed(seed * 1_000_003 + step)).item()
    T = int(round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))))
    return T, max(1, tokens // T)


def set_chunk_size(model, chunk_size: int) -> None:
    """Set the chunk size of every neural memory of ``model`` (1: the exact token-by-token rule)."""
    from effattn.memory import NeuralMemory

    for m in model.modules():
        if isinstance(m, NeuralMemory):
            m.chunk_size = chunk_size


@torch.no_grad()
def passkey_accuracy(model, context: int, args: argparse.Namespace, examples: int, seed: int) -> dict:
    """Teacher-forced accuracy on ``examples`` fresh prompts of ``context`` tokens: the fraction of
    digits predicted (argmax) right, of whole keys right, the digit accuracy over the needles that lie
    more than ``window`` tokens before the query, and ``nonfinite``: the fraction of answer positions whose
    logits hold a NaN or inf (counted wrong: a diverged memory is told apart from a wrong guess)."""
    batch = make_passkey(examples, context, args.digits, seed=seed)
    model.eval()
    right, finite = [], []
    for i in range(0, examples, 8):
        logits = model(batch.inputs[i : i + 8].to(args.device))[0][:, context - 1 :]
        ok = torch.isfinite(logits).all(-1)
        # a non-finite answer position counts as wrong whatever its argmax, and is counted on its own
        right.append(((logits.argmax(-1) == batch.keys[i : i + 8].to(args.device)) & ok).cpu())
        finite.append(ok.cpu())
    right, finite = torch.cat(right), torch.cat(finite)
    far = (context - 1 - batch.needle_pos) > args.window
    return {
        "digit_acc": right.float().mean().item(),
        "key_acc": right.all(1).float().mean().item(),
        "far_digit_acc": right[far].float().mean().item() if bool(far.any()) else None,
        "far_examples": int(far.sum()),
        "nonfinite": 1.0 - finite.float().mean().item(),
    }


def train_and_eval(name: str, args: argparse.Namespace, window: int | None = None) -> dict:
    """Train passkey model ``name`` and evaluate it at every context (one process, ``args.threads`` threads)."""
    torch.set_num_threads(args.threads)
    contexts = _ints(args.contexts)
    lo, hi = _ints(args.train_len)
    torch.manual_seed(args.seed)
    model = build_model(name, args, max(contexts + [hi, args.exact_context]), window).to(args.device)
    opt = optimizer(model, args.lr, getattr(args, "weight_decay", 0.1))
    t0, losses = time.perf_counter(), []
    model.train()
    for step in range(args.steps):
        T, bs = train_shape(step, lo, hi, args.tokens_per_step, args.seed, args.steps, getattr(args, "curriculum", 0.0))
        b = make_passkey(bs, T, args.digits, seed=args.seed + 7919 * step + 1)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        logits = model(b.inputs.to(args.device))[0]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            b.labels.reshape(-1).to(args.device),
            ignore_index=IGNORE_INDEX,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(
                f"[{name}] step {step}/{args.steps} T={T} loss={loss.item():.3f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    train_s = time.perf_counter() - t0
    mixer, kw, heads = _spec(name, args, window)
    row = {
        "model": name,
        "mixer": mixer,
        "window": kw.get("window", kw.get("segment", kw.get("recurrent_memory", {}).get("segment"))),
        "heads": heads,
        "state_bytes": model.state_size(max(contexts)),
        "params": sum(p.numel() for p in model.parameters()),
        "final_loss": statistics.mean(losses[-20:]),
        "train_s": round(train_s, 1),
        "form": f"chunked (chunk {args.chunk_size})" if "chunk_size" in kw else "-",
        "acc": {},
    }
    t1 = time.perf_counter()
    for c in contexts:
        row["acc"][c] = passkey_accuracy(model, c, args, args.eval_examples, seed=10_000 + args.seed + c)
        print(f"[{name}] context {c}: {row['acc'][c]}", flush=True)
    if "chunk_size" in kw and args.exact_context:
        ex, seed = min(args.eval_examples, 16), 20_000 + args.seed
        chunked = passkey_accuracy(model, args.exact_context, args, ex, seed=seed)
        set_chunk_size(model, 1)  # the same weights and prompts through the exact token-by-token rule
        exact = passkey_accuracy(model, args.exact_context, args, ex, seed=seed)
        row["exact"] = {"context": args.exact_context, "examples": ex, "chunked": chunked, "token_by_token": exact}
        print(f"[{name}] exact rule at {args.exact_context}: {row['exact']}", flush=True)
    row["eval_s"] = round(time.perf_counter() - t1, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"passkey_{name}.json").write_text(json.dumps(row, indent=2))
    return row


def run_passkey(args: argparse.Namespace) -> tuple[list[dict], str | None]:
    """Train and evaluate every model of ``--models`` (``--workers`` processes); rows in model order."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        _spec(n, args)  # unknown names fail before any training
    max_len = max(_ints(args.contexts))
    windows = {n: None for n in names}
    eq_note = None
    if "swa_eq" in names:
        windows["swa_eq"], target = equal_state_window(args, max_len)
        eq_note = f"swa_eq: window {windows['swa_eq']}, whose KV cache equals Titans MAG's state ({target} bytes)"
    if args.workers <= 1:
        rows = {n: train_and_eval(n, args, windows[n]) for n in names}
    else:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            slow_first = sorted(
                names,
                key=lambda n: (
                    ("atlas", "titans_mal", "titans_mag", "titans_mac").index(n)
                    if n in ("atlas", "titans_mal", "titans_mag", "titans_mac")
                    else 9
                ),
            )
            futures = {n: pool.submit(train_and_eval, n, args, windows[n]) for n in slow_first}
            rows = {n: harness.run_guarded(f.result) for n, f in futures.items()}
    for n, r in rows.items():
        r.setdefault("model", n)
    return [rows[n] for n in names], eq_note


QUICK = dict(
    contexts="32,64", train_len="24,48", steps=3, tokens_per_step=96, eval_examples=8, window=16, exact_context=32
)
QUICK_SPEED = dict(lengths="32", repeats=1)


def _load_note(before: dict, after: dict) -> str:
    busy = (
        " (busy: above the core count; times inflated)"
        if harness.busy_warning(before) or harness.busy_warning(after)
        else ""
    )
    return (
        f"load average (1 min) {before['load_1m']:.1f} before, {after['load_1m']:.1f} after, "
        f"{before['cpu_count']} cores{busy}"
    )


@suite(
    "memory",
    add_arguments=add_arguments,
    summary="learned memories (Titans, ATLAS, Infini-attention): passkey accuracy past the attention window; speed",
    description=__doc__,
)
def run(args: argparse.Namespace) -> None:
    out = Path(args.out or "bench_out/memory")
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    if args.quick:
        for k, v in {**QUICK, **QUICK_SPEED}.items():
            if getattr(args, k) == add_defaults()[k]:
                setattr(args, k, v)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown --parts {unknown}; choose from {PARTS}")
    torch.set_num_threads(args.threads)
    meta = {"command": harness.command_line(), "machine": harness.machine_info("cpu"), "args": vars(args)}
    if "passkey" in parts:
        contexts = _ints(args.contexts)
        before = harness.load_snapshot()
        t0 = time.perf_counter()
        rows, eq_note = saved_passkey_rows(args, out) if args.report_only else run_passkey(args)
        after = harness.load_snapshot()
        load = args.report_only or _load_note(before, after)
        notes = [
            f"digit accuracy (teacher forced, argmax) on {args.eval_examples} prompts per context, random depth; "
            f"chance 0.1; models trained {args.steps} steps of {args.tokens_per_step} tokens at contexts "
            f"{args.train_len} (log-uniform"
            + (
                f"; the longest grows from the shortest over the first {args.curriculum:g} of the steps"
                if args.curriculum
                else ""
            )
            + f"), AdamW lr {args.lr} (weight decay {args.weight_decay} on matrices only), {args.digits}-digit keys, "
            f"seed {args.seed}; {args.heads} heads (Gated DeltaNet 1)",
            f"every attention sees at most {args.window} keys; neural memories: MLP depth {args.depth}, step size "
            f"theta_max {args.theta_max if args.theta_max is not None else 'default (1.0)'}, forgetting-gate bias "
            f"at init {args.forget_bias if args.forget_bias is not None else 'default (-3)'}, per-token gradient "
            f"clipping {'off' if args.max_grad_norm is None else f'to norm {args.max_grad_norm:g}'}, "
            f"short convolution of {4 if args.conv_size is None else args.conv_size} taps on "
            f"{'q, k, v' if args.conv_values else 'q, k'}, "
            f"trained and evaluated in the chunked form (chunk {args.chunk_size}); 'exact rule' = the same weights "
            "through the token-by-token rule (chunk 1) on 16 prompts, beside the chunked form on the same prompts",
            "state_bytes = LM.state_size at the longest context (memory weights, momentum, KV caches, segment buffers)",
            f"{load}; wall {time.perf_counter() - t0:.0f} s, {args.workers} worker processes, {args.threads} thread"
            if not args.report_only
            else f"assembled from the per-model files (--report-only); load while they ran: {args.report_only}",
        ] + ([eq_note] if eq_note else [])
        meta["passkey_load"] = {"before": before, "after": after}
        cols = ["model", "mixer", "window", "heads", "state_bytes", "params", "form", "final_loss", "train_s"]
        cols += [f"acc@{c}" for c in contexts] + ["exact rule", "error"]
        table = passkey_table_rows(rows, contexts)
        harness.write_report(out, "passkey", table, cols, meta=meta, notes=notes)
        (out / "passkey_rows.json").write_text(json.dumps(rows, indent=2, default=str))
        plot_passkey(rows, contexts, args.window, out, str(load) if args.report_only else load.split(";")[0])
        print(harness.format_markdown_table(table, cols))
    if "speed" in parts:
        run_speed(args, out, meta)


def add_defaults() -> dict:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return vars(p.parse_args([]))
