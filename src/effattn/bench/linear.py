"""Benchmark suite ``linear``: every registered linear op's chunk form against SDPA causal.

``python -m effattn bench linear [--quick] [--lengths 1024,4096] [--repeats 3] [--device cpu] [--forward-only]``

For each op in :data:`effattn.linear.REGISTRY` (its ``make_inputs`` at ``B=1, H=4, D=64``, gate
strength 0.5, float32) and for ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``
on the same ``q, k, v`` (converted to SDPA's ``[B, H, T, D]`` outside the timed region), at each
length T (default 1k, 4k, 16k, 64k; ``--quick``: 1k, 4k):

- forward time (under ``torch.no_grad``, as in inference) and forward+backward time (upstream
  gradient on the output, gradients of every differentiable input): median of ``--repeats`` after
  a first call (which also measures peak memory); when that first call is slower than
  :data:`SLOW_CALL_S`, it is the only timing (a 64k SDPA backward takes a minute on 2 CPU cores);
- peak memory of one forward and of one forward+backward (``harness.measure_peak_memory``,
  measured on the warm-up call);
- efficiency: FLOPs / time / the machine's GEMM rate measured in the same run. SDPA counts only
  the unmasked pairs, ``T (T + 1) / 2``, with the FlashAttention convention backward = 2.5 x forward.
  Chunk ops count an estimate of their chunk algorithm's work (:func:`flops_for`, backward
  = 2 x forward); an op without an estimate reports time only;
- the crossover length per op: the smallest measured T where the op's forward+backward beats SDPA's.

Decoding (report ``linear_decode``): the time of one ``step`` (one token) against the state left by
a chunk run over a context of each length (the step's cost should not depend on the context), the
state's size in bytes, and as the baseline SDPA for one query against a KV cache of the context
(and the cache's size).

With ``--device cuda`` it runs the GPU comparison instead (:mod:`effattn.bench.linear_gpu`): bf16,
``B * T = 16k`` tokens, ``H = 16``, ``D = 64`` and ``128``, T from 1k to 32k, forward and forward+backward
TFLOP/s of the gated delta rule and simple GLA, effattn's PyTorch chunk form vs its Triton kernels vs fla's
chunk kernels (optional baseline), report ``linear_gpu``.

Reports ``linear``, ``linear_crossover`` and ``linear_decode`` (JSON + markdown) land in ``--out``.
A full run reaches T = 65536, where one SDPA causal forward takes ~20 s on 2 CPU cores: expect tens
of minutes; ``--quick`` takes a minute or two.
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from effattn.bench import harness, suite
from effattn.bench.cli import add_common_arguments
from effattn.bench.linear_flops import (
    CHUNK_BWD_FACTOR,
    flops_delta_chunk,
    flops_scalar_decay_chunk,
    flops_selective_scan,
)
from effattn.bench.table import Column, print_table

DEFAULT_LENGTHS = (1024, 4096, 16384, 65536)
QUICK_LENGTHS = (1024, 4096)
BATCH, HEADS, HEAD_DIM = 1, 4, 64
CHUNK_SIZE = 64
GATE_STRENGTH = 0.5
SLOW_CALL_S = harness.SLOW_CALL_S  # a first call slower than this is the only timing (repeats column: 0)
STEP_REPEATS = 20  # one step is microseconds: more repeats for a stable median


# linear attention (all feature-map variants), simple GLA, RetNet, Lightning: the scalar-decay kernel
SCALAR_DECAY_OPS = (
    "linear_attn",
    "linear_attn_elu1",
    "based",
    "cottention",
    "simple_gla",
    "retnet",
    "lightning_attn",
)
DELTA_OPS = ("delta_rule", "gated_delta_rule")


def flops_aaren_chunk(T: int, B: int, H: int, D: int, V: int, C: int) -> float:
    """Aaren's chunk form: the scores ``q . k_i`` (2 D per token), and per chunk a ``[C, C]``
    causal weight (difference, exp, sum: ~4 C^2) applied to the values (2 C^2 V)."""
    n = math.ceil(T / C)
    return B * H * (2 * T * D + n * C * C * (2 * V + 4))


def _state_kv(op) -> tuple[int, int]:
    """``(K, V)`` of an op's (first) matrix state at the suite's sizes: the feature dim of a
    feature-map linear attention (e.g. 1 + K + K^2 for Based), else the head dims."""
    shape = op.state_shape(BATCH, HEADS, HEAD_DIM)
    if isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return shape[-2], shape[-1]


def flops_for(name: str) -> Callable[[object, int], float] | None:
    """``f(op, T) -> forward FLOPs`` of op ``name``'s chunk form at the suite's sizes, or None where
    no estimate is known (the op is then reported with time and memory only).

    The scalar-decay count uses the state's ``[K, V]`` (the feature dim for feature maps); ``gla``
    uses it too (a lower bound: its vector gate adds elementwise work); ``mom`` lays its memories
    side by side as heads, so it is that count times the number of memories (the state's dim 2)."""
    B, H, D, C = BATCH, HEADS, HEAD_DIM, CHUNK_SIZE
    if name in SCALAR_DECAY_OPS or name == "gla":
        return lambda op, T: flops_scalar_decay_chunk(T, B, H, *_state_kv(op), C)
    if name == "mom":
        return lambda op, T: op.state_shape(B, H, D)[2] * flops_scalar_decay_chunk(T, B, H, *_state_kv(op), C)
    if name in DELTA_OPS:
        return lambda op, T: flops_delta_chunk(T, B, H, *_state_kv(op), C)
    if name == "mamba":
        return lambda op, T: flops_selective_scan(T, B, H, *_state_kv(op))
    if name == "aaren":
        return lambda op, T: flops_aaren_chunk(T, B, H, D, D, C)
    return None


SDPA_BWD_FACTOR = 2.5  # FlashAttention's benchmark convention: backward = 2.5 x forward FLOPs


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


class _Call:
    """An op's ``make_inputs`` result with names (from the naive form's signature)."""

    def __init__(self, op, B: int, T: int, device: str):
        args, kwargs = op.make_inputs(
            B, T, HEADS, HEAD_DIM, device=device, dtype=torch.float32, gate_strength=GATE_STRENGTH
        )
        params = inspect.signature(op.naive).parameters.values()
        pos = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.pos_names = pos[: len(args)]
        self.values = dict(zip(self.pos_names, args, strict=True)) | dict(kwargs)
        self.B, self.T = B, T

    def __call__(self, fn, **extra):
        args = [self.values[n] for n in self.pos_names]
        kwargs = {n: x for n, x in self.values.items() if n not in self.pos_names}
        return fn(*args, **kwargs, **extra)

    def is_per_token(self, x) -> bool:
        return isinstance(x, torch.Tensor) and x.dim() >= 2 and tuple(x.shape[:2]) == (self.B, self.T)

    def slice(self, a: int, b: int) -> _Call:
        new = object.__new__(_Call)
        new.pos_names, new.B, new.T = self.pos_names, self.B, b - a
        new.values = {n: (x[:, a:b] if self.is_per_token(x) else x) for n, x in self.values.items()}
        return new

    def grad_leaves(self, names) -> list[torch.Tensor]:
        leaves = []
        for n in names:
            x = self.values.get(n)
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                x = x.detach().requires_grad_(True)
                self.values[n] = x
                leaves.append(x)
        return leaves


def _state_bytes(state) -> int:
    parts = state if isinstance(state, (tuple, list)) else (state,)
    return sum(p.numel() * p.element_size() for p in parts)


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------


def sdpa_row(T: int, repeats: int, device: str, gemm: float, backward: bool = True) -> dict:
    """SDPA causal at the suite's sizes: a :func:`effattn.bench.harness.measure_forward_backward` row with
    the FLOPs of the ``T (T + 1) / 2`` unmasked pairs, backward counted 2.5 x forward."""
    B, H, D = BATCH, HEADS, HEAD_DIM
    q, k, v = (torch.randn(B, T, H, D, device=device) for _ in range(3))
    q, k, v = (x.transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v))  # [B, H, T, D]
    flops = harness.attention_flops(B, H, D, D, T * (T + 1) / 2)
    return harness.measure_forward_backward(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        [q, k, v],
        repeats=repeats,
        device=device,
        flops=flops,
        bwd_factor=SDPA_BWD_FACTOR,
        gemm=gemm,
        backward=backward,
    )


def measure_op(
    op, T: int, repeats: int, device: str, gemm: float, backward: bool = True, baseline: tuple | None = None
) -> dict:
    """Linear op ``op``'s chunk form at length ``T`` and the suite's sizes (``make_inputs``, gradients of
    its differentiable inputs): a :func:`effattn.bench.harness.measure_forward_backward` row with the FLOP
    estimate of :func:`flops_for` (none where unknown), backward counted 2 x forward; a ``baseline``
    (``(forward, leaves)``) is timed back to back with every call (the ``*_speedup_paired`` keys)."""
    call = _Call(op, BATCH, T, device)
    leaves = call.grad_leaves(op.differentiable_args)
    flops_fn = flops_for(op.name)
    return harness.measure_forward_backward(
        lambda: call(op.chunk, chunk_size=CHUNK_SIZE)[0],
        leaves,
        repeats=repeats,
        device=device,
        flops=None if flops_fn is None else flops_fn(op, T),
        bwd_factor=CHUNK_BWD_FACTOR,
        gemm=gemm,
        backward=backward,
        baseline=baseline,
    )


def decode_rows(op, contexts: list[int], device: str) -> list[dict]:
    """One-token ``step`` time against the states left by chunk runs over each context.

    The states are built first, then the steps are timed round-robin over the contexts (one step
    per context per round, median over rounds), so a disturbance of the machine falls on every
    context alike instead of on whichever context happened to be measured at that moment."""
    tokens, states = [], []
    with torch.no_grad():
        for context in contexts:
            call = _Call(op, BATCH, context + 1, device)
            _, state = call.slice(0, context)(op.chunk, output_final_state=True, chunk_size=CHUNK_SIZE)
            tokens.append(call.slice(context, context + 1))
            states.append(state)
        steps = [
            (lambda tok=tok, st=st: tok(op.step, initial_state=st, output_final_state=True))
            for tok, st in zip(tokens, states)
        ]
        for step in steps:  # warm-up
            for _ in range(3):
                step()
        times: list[list[float]] = [[] for _ in contexts]
        for _ in range(STEP_REPEATS):
            for i, step in enumerate(steps):
                times[i].append(harness.measure_time(step, repeats=1, warmup=0, device=device))
    return [
        {"step_us": 1e6 * statistics.median(t), "step_us_min": 1e6 * min(t), "step_us_max": 1e6 * max(t)}
        | {"state_bytes": _state_bytes(st)}
        for t, st in zip(times, states)
    ]


def sdpa_decode_row(context: int, device: str) -> dict:
    """SDPA of one query against a float32 KV cache of ``context + 1`` tokens: ``step_us`` (median of
    :data:`STEP_REPEATS`) and ``state_bytes`` (the cache, ``2 B H (T + 1) D x 4``)."""
    B, H, D = BATCH, HEADS, HEAD_DIM
    q = torch.randn(B, H, 1, D, device=device)
    k, v = (torch.randn(B, H, context + 1, D, device=device) for _ in range(2))  # cache incl. the new token
    with torch.no_grad():
        t = harness.time_stats(
            lambda: F.scaled_dot_product_attention(q, k, v), repeats=STEP_REPEATS, warmup=3, device=device
        )
    steps = {"step_us": 1e6 * t.median, "step_us_min": 1e6 * t.min, "step_us_max": 1e6 * t.max}
    return steps | {"state_bytes": 2 * k.numel() * k.element_size()}


def warm_up(ops, device: str) -> None:
    """One small call of everything first, so one-time initialisation is in no measurement."""
    for op in ops:
        harness.run_guarded(lambda op=op: (measure_op(op, 256, 1, device, 1.0), decode_rows(op, [256], device))[0])
    harness.run_guarded(lambda: sdpa_row(256, 1, device, 1.0))


def _crossover(rows: list[dict], name: str, lengths: list[int], key: str = "fwd_bwd_ms") -> dict:
    sdpa = {r["T"]: r.get(key) for r in rows if r["method"] == "sdpa_causal"}
    mine = {r["T"]: r.get(key) for r in rows if r["method"] == name}
    wins = [T for T in lengths if mine.get(T) is not None and sdpa.get(T) is not None and mine[T] < sdpa[T]]
    measured = [T for T in lengths if mine.get(T) is not None and sdpa.get(T) is not None]
    if not measured:
        return {"method": name, "crossover_T": None, "note": "no successful pair of measurements"}
    if not wins:
        return {
            "method": name,
            "crossover_T": None,
            "note": f"slower than SDPA at every measured T <= {measured[-1]}",
        }
    note = "faster than SDPA at every measured T" if wins[0] == measured[0] else "faster from this T on"
    if any(T > wins[0] and T not in wins for T in measured):
        note = "first measured T where faster (not faster at every longer T)"
    return {"method": name, "crossover_T": wins[0], "note": note}


# ------------------------------------------------------------------------------------------------
# the suite
# ------------------------------------------------------------------------------------------------


def _lengths(args: argparse.Namespace) -> list[int]:
    if args.lengths:
        try:
            lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
        except ValueError:
            raise SystemExit(f"--lengths must be comma-separated integers, got {args.lengths!r}") from None
        if not lengths or lengths[0] < 1:
            raise SystemExit(f"--lengths must be positive integers, got {args.lengths!r}")
        return lengths
    return list(QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)


# the terminal summaries (the report files hold every column)
TERMINAL_COLUMNS = (
    Column("method", text=True, min_width=12, key_column=True),
    Column("T", key_column=True),
    Column("fwd_ms", "fwd ms"),
    Column("fwd_bwd_ms", "f+b ms"),
    Column("fwd_speedup_vs_sdpa", "fwd x"),
    Column("fwd_bwd_speedup_vs_sdpa", "f+b x"),
    Column("fwd_peak_MiB", "fwd MiB"),
    Column("fwd_bwd_peak_MiB", "f+b MiB"),
    Column("fwd_eff_%", "eff %"),
    Column("error", text=True),
)
DECODE_TERMINAL_COLUMNS = (
    Column("method", text=True, min_width=12, key_column=True),
    Column("context", key_column=True),
    Column("step_us", "step us"),
    Column("step_vs_shortest", "x shortest"),
    Column("state_bytes", "state B"),
    Column("error", text=True),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The linear suite's options."""
    add_common_arguments(
        p, "linear", lengths=DEFAULT_LENGTHS, quick_lengths=QUICK_LENGTHS, quick="small sizes: a minute or two"
    )
    p.add_argument(
        "--forward-only", action="store_true", help="skip forward+backward (the crossover then uses forward times)"
    )
    p.add_argument("--decode-only", action="store_true", help="only the decode-step report (linear_decode)")


@suite(
    "linear",
    add_arguments=add_arguments,
    summary="every linear op against SDPA causal: time, memory, efficiency, crossover, decode",
    description=__doc__,
)
def run(args: argparse.Namespace) -> None:
    from effattn.linear import REGISTRY

    if torch.device(args.device).type == "cuda":
        from effattn.bench.linear_gpu import run_gpu

        run_gpu(args)
        return
    device = args.device
    lengths = _lengths(args)
    backward = not getattr(args, "forward_only", False)  # --forward-only: no forward+backward runs
    ops = [REGISTRY[n] for n in sorted(REGISTRY)]
    print(f"linear suite: {len(ops)} ops {[op.name for op in ops]}, T in {lengths}, device {device}", flush=True)

    decode_only = getattr(args, "decode_only", False)  # --decode-only: only the linear_decode report
    gemm = None if decode_only else harness.matmul_flops_per_second(device)
    warm_up(ops, device)

    rows: list[dict] = []
    for T in [] if decode_only else lengths:
        for name, measure in [("sdpa_causal", lambda T=T: sdpa_row(T, args.repeats, device, gemm, backward))] + [
            (op.name, lambda T=T, op=op: measure_op(op, T, args.repeats, device, gemm, backward)) for op in ops
        ]:
            row = {"method": name, "T": T, **harness.run_guarded(measure)}
            rows.append(row)
            print(
                f"  T={T:>6} {name:<18} fwd {row.get('fwd_ms', float('nan')):9.2f} ms  "
                f"fwd+bwd {row.get('fwd_bwd_ms', float('nan')):9.2f} ms  {row.get('error', '')}",
                flush=True,
            )
    for r in rows:
        s = next((x for x in rows if x["method"] == "sdpa_causal" and x["T"] == r["T"]), {})
        if r.get("fwd_bwd_ms") and s.get("fwd_bwd_ms"):
            r["fwd_bwd_speedup_vs_sdpa"] = s["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        if r.get("fwd_ms") and s.get("fwd_ms"):
            r["fwd_speedup_vs_sdpa"] = s["fwd_ms"] / r["fwd_ms"]
    crossover_key = "fwd_bwd_ms" if backward else "fwd_ms"
    crossover = [_crossover(rows, op.name, lengths, crossover_key) for op in ops]

    decode: list[dict] = []
    for ctx in lengths:
        row = {
            "method": "sdpa_kv_cache",
            "context": ctx,
            **harness.run_guarded(lambda c=ctx: sdpa_decode_row(c, device)),
        }
        decode.append(row)
    for op in ops:
        result = harness.run_guarded(lambda op=op: {"rows": decode_rows(op, lengths, device)})
        per_ctx = result.get("rows") or [{"error": result.get("error", "failed")}] * len(lengths)
        decode += [{"method": op.name, "context": ctx, **r} for ctx, r in zip(lengths, per_ctx)]
    for r in decode:
        first = next(x for x in decode if x["method"] == r["method"])
        if r.get("step_us") and first.get("step_us"):
            r["step_vs_shortest"] = r["step_us"] / first["step_us"]
        print(
            f"  decode ctx={r['context']:>6} {r['method']:<18} step {r.get('step_us', float('nan')):9.1f} us  "
            f"{r.get('error', '')}",
            flush=True,
        )

    meta = {
        "command": harness.command_line(),
        "machine": harness.machine_info(device),
        "lengths": lengths,
        "sizes": {
            "batch": BATCH,
            "heads": HEADS,
            "head_dim": HEAD_DIM,
            "chunk_size": CHUNK_SIZE,
            "dtype": "float32",
            "gate_strength": GATE_STRENGTH,
            "repeats": args.repeats,
        },
        "gemm_flops_per_s": gemm,
        "ops": [op.name for op in ops],
    }
    if not decode_only:
        no_flops = [op.name for op in ops if flops_for(op.name) is None]
        notes = [
            f"GEMM rate of this machine in this run: {gemm / 1e9:.1f} GFLOP/s "
            "(best of float32 matmuls at 2048^2 and 4096^2); "
            "eff_% = FLOPs / time / GEMM rate.",
            "SDPA: torch.nn.functional.scaled_dot_product_attention(is_causal=True), FLOPs of the "
            "T(T+1)/2 unmasked pairs only, backward = 2.5 x forward.",
            "Chunk ops: chunk form, chunk_size 64, FLOPs = an estimate of the chunk algorithm's work "
            "(effattn.bench.linear.flops_for), backward = 2 x forward; gla uses the scalar-decay count "
            "(a lower bound), mom that count times its number of memories.",
            "fwd = under torch.no_grad (inference); fwd_bwd = forward + backward with gradients of every "
            "differentiable input. Times: median of repeats after a first call (repeats column: fwd/fwd_bwd; "
            f"0 = the first call, slower than {SLOW_CALL_S:g} s, is the only timing). "
            "Peak memory: rise over the memory in use before one call.",
            "fwd_bwd_speedup_vs_sdpa > 1: the op is faster than SDPA causal at that T.",
        ]
        if no_flops:
            notes.append(f"No FLOP model for {', '.join(no_flops)}: time and memory only (efficiency left blank).")
        harness.write_report(
            args.out,
            "linear",
            rows,
            [
                "method",
                "T",
                "fwd_ms",
                "fwd_bwd_ms",
                "fwd_speedup_vs_sdpa",
                "fwd_bwd_speedup_vs_sdpa",
                "fwd_peak_MiB",
                "fwd_bwd_peak_MiB",
                "fwd_eff_%",
                "fwd_bwd_eff_%",
                "repeats",
                "error",
            ],
            meta=meta,
            notes=notes,
        )
        harness.write_report(
            args.out,
            "linear_crossover",
            crossover,
            ["method", "crossover_T", "note"],
            meta=meta,
            notes=[
                "crossover_T: the smallest measured T where the op's chunk forward+backward is faster "
                "than SDPA causal forward+backward (same B, H, D, dtype, machine, run)"
                + ("." if backward else "; with --forward-only: forward times instead.")
            ],
        )
    path = harness.write_report(
        args.out,
        "linear_decode",
        decode,
        ["method", "context", "step_us", "step_vs_shortest", "state_bytes", "error"],
        meta=meta,
        notes=[
            "step_us: one token against the state after a chunk run over `context` tokens "
            f"(median of {STEP_REPEATS} rounds; each round times one step per context, round-robin); "
            "step_vs_shortest: step_us / step_us at the shortest context; state_bytes: the carried state's size.",
            "sdpa_kv_cache: SDPA of one query against a float32 KV cache of context + 1 tokens; "
            "state_bytes is the cache's size (2 B H (T+1) D x 4 bytes).",
        ],
    )
    if not decode_only:
        print_table("linear: chunk forms against SDPA causal (x = speed-up over SDPA)", rows, TERMINAL_COLUMNS)
    print_table("linear decode: one step against the state of a context", decode, DECODE_TERMINAL_COLUMNS)
    written = "linear_decode.md" if decode_only else "linear.md, linear_crossover.md, linear_decode.md"
    print(f"wrote {path.parent}/{written} (+ .json)", flush=True)
