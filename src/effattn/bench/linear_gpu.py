"""``python -m effattn bench linear --device cuda``: the chunked linear ops on a GPU, effattn's PyTorch form
against its Triton kernels and fla's chunk kernels.

Settings of the issue (FlashAttention's benchmark setting): bfloat16, ``B * T = 16k`` tokens, ``H = 16``
heads, head dims ``D = 64`` and ``128`` (``K = V = D``), ``T`` from 1k to 32k, chunk size 64. Two ops:
``gated_delta_rule`` (Gated DeltaNet; Yang, Kautz, Hatamizadeh, "Gated Delta Networks", 2024) and
``simple_gla`` (the scalar-decay kernel that also runs RetNet, Lightning and Mamba-2 SSD; Dao and Gu,
"Transformers are SSMs", 2024). Three implementations of each, on the same inputs (the op's registry
``make_inputs``, gates and betas as drawn there, log-gates in float32):

- ``torch``: ``op.chunk(..., backend="torch")`` (effattn's PyTorch chunk form);
- ``triton``: ``op.chunk(..., backend="triton")`` (effattn's Triton kernels);
- ``fla``: ``fla.ops.<op>.chunk_<op>`` (flash-linear-attention, an optional baseline: used when importable
  and the tensors are on CUDA, otherwise the row says why it was skipped); the gated delta rule with
  ``use_qk_l2norm_in_kernel=True``, as effattn's default ``use_qk_l2norm=True``.

TFLOP/s count the work of the chunk algorithm, the same count for every implementation (so their ratio
is the inverse ratio of times): per chunk of ``C`` tokens, batch row and head,

- scalar decay: ``2 C^2 K + 2 C^2 V + 4 C K V`` (:func:`effattn.bench.linear_flops.flops_scalar_decay_chunk`);
- gated delta rule: ``4 C^2 K + C^2 (K + V) + 2 C K^2 + 6 C K V + 2 K^2 V + 2 C^2 V``
  (:func:`effattn.bench.linear_flops.flops_delta_chunk`),

and forward+backward counts ``3x`` the forward (backward = 2x forward). Times: median of ``--repeats`` after
two warm-up calls (the first compiles), with min and max. The report is rewritten after every row, so a run
stopped by a time limit leaves the rows it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable

import torch

from effattn.bench import harness
from effattn.bench.linear_flops import CHUNK_BWD_FACTOR, flops_delta_chunk, flops_scalar_decay_chunk

__all__ = ["GPU_IMPLS", "GPU_OPS", "fla_runner", "gpu_flops", "measure_gpu", "run_gpu"]

GPU_OPS = ("gated_delta_rule", "simple_gla")
GPU_IMPLS = ("triton", "torch", "fla")
GPU_HEAD_DIMS = (64, 128)
GPU_HEADS = 16
GPU_TOKENS = 16384  # B * T
GPU_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
GPU_CHUNK = 64
TARGET = {"gated_delta_rule": 0.8}  # the target: triton >= 0.8x fla's forward+backward throughput


def gpu_flops(op_name: str, B: int, T: int, H: int, D: int, C: int = GPU_CHUNK) -> float:
    """Forward FLOPs of ``op_name``'s chunk algorithm at ``K = V = D`` (the module docstring's formulas).

    Example::

        >>> gpu_flops("simple_gla", 1, 64, 1, 64) == 2 * 64**2 * 64 * 2 + 4 * 64**3
        True
    """
    if op_name == "gated_delta_rule":
        return flops_delta_chunk(T, B, H, D, D, C)
    if op_name == "simple_gla":
        return flops_scalar_decay_chunk(T, B, H, D, D, C)
    raise KeyError(f"no GPU benchmark for op {op_name!r}; choose from {GPU_OPS}")


def fla_runner(op_name: str, x: dict, device: str) -> Callable[[], torch.Tensor]:
    """fla's chunk kernel for ``op_name`` on the inputs ``x`` (``q, k, v, g`` and ``beta``); raises
    ``RuntimeError("skipped: ...")`` where fla is not installed or the tensors are not on CUDA."""
    if importlib.util.find_spec("fla") is None:
        raise RuntimeError("skipped: fla (flash-linear-attention) is not installed")
    if torch.device(device).type != "cuda":
        raise RuntimeError("skipped: fla's chunk kernels run on CUDA tensors only")
    if op_name == "gated_delta_rule":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        return lambda: chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], use_qk_l2norm_in_kernel=True)[
            0
        ]
    from fla.ops.simple_gla import chunk_simple_gla

    return lambda: chunk_simple_gla(x["q"], x["k"], x["v"], g=x["g"])[0]


def _inputs(op, B: int, T: int, H: int, D: int, device: str, dtype: torch.dtype, backward: bool) -> dict:
    args, _ = op.make_inputs(B, T, H, D, device=device, dtype=dtype)
    names = ("q", "k", "v", "g", "beta")[: len(args)]
    x = dict(zip(names, args, strict=True))
    x["g"] = x["g"].float()  # log-gates in float32 (as fla keeps them)
    return {n: t.detach().contiguous().requires_grad_(backward) for n, t in x.items()}


def measure_gpu(
    op_name: str,
    impl: str,
    T: int,
    D: int,
    *,
    heads: int = GPU_HEADS,
    tokens: int = GPU_TOKENS,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 5,
    backward: bool = True,
    runners: dict | None = None,
    warmup: int = 2,
) -> dict:
    """One row: ``impl`` of ``op_name`` at ``B = tokens // T``: ``fwd_ms`` / ``fwdbwd_ms`` (median, with min
    and max) and TFLOP/s. ``runners`` maps an impl to ``(op_name, inputs, device) -> callable`` in place of
    the built-in ones (the CPU test's stand-ins)."""
    from effattn.linear import REGISTRY

    op = REGISTRY[op_name]
    B = max(1, tokens // T)
    row = {"op": op_name, "D": D, "T": T, "B": B, "impl": impl}
    torch.manual_seed(T + D)
    x = _inputs(op, B, T, heads, D, device, dtype, backward)
    flops = gpu_flops(op_name, B, T, heads, D)

    def one():
        make = (runners or {}).get(impl)
        if make is not None:
            fn = make(op_name, x, device)
        elif impl == "fla":
            fn = fla_runner(op_name, x, device)
        elif impl in ("torch", "triton"):
            fn = lambda: op.chunk(*x.values(), chunk_size=GPU_CHUNK, backend=impl)[0]  # noqa: E731
        else:
            raise KeyError(impl)
        out = {}
        with torch.no_grad():
            s = harness.time_stats(fn, repeats=repeats, warmup=warmup, device=device)
        out.update(fwd_ms=1e3 * s.median, fwd_min_ms=1e3 * s.min, fwd_max_ms=1e3 * s.max)
        out["fwd_tflops"] = flops / s.median / 1e12
        if backward:
            o = fn()
            do = torch.randn_like(o)
            del o
            s = harness.time_stats(lambda: fn().backward(do), repeats=repeats, warmup=warmup, device=device)
            out.update(fwdbwd_ms=1e3 * s.median, fwdbwd_min_ms=1e3 * s.min, fwdbwd_max_ms=1e3 * s.max)
            out["fwdbwd_tflops"] = (1 + CHUNK_BWD_FACTOR) * flops / s.median / 1e12
        out["repeats"] = repeats
        return out

    result = harness.run_guarded_gpu(one)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {**row, **result}


def _ratio_notes(rows: list[dict], key: str) -> list[str]:
    notes = []
    for op_name, D, T in sorted({(r["op"], r["D"], r["T"]) for r in rows}):
        got = {r["impl"]: r.get(key) for r in rows if (r["op"], r["D"], r["T"]) == (op_name, D, T)}
        if got.get("triton") and got.get("fla"):
            ratio, target = got["triton"] / got["fla"], TARGET.get(op_name)
            verdict = "" if target is None else f" (target >= {target}: {'met' if ratio >= target else 'NOT met'})"
            notes.append(f"{op_name} D={D} T={T}: triton / fla {key} = {ratio:.2f}{verdict}")
        if got.get("triton") and got.get("torch"):
            notes.append(f"{op_name} D={D} T={T}: triton / torch {key} = {got['triton'] / got['torch']:.2f}")
    return notes


COLUMNS = ["op", "D", "T", "B", "impl", "fwd_ms", "fwd_min_ms", "fwd_max_ms", "fwd_tflops", "fwdbwd_ms",
           "fwdbwd_min_ms", "fwdbwd_max_ms", "fwdbwd_tflops", "repeats", "error"]  # fmt: skip


def run_gpu(
    args: argparse.Namespace, *, dtype: torch.dtype = torch.bfloat16, runners: dict | None = None, **sizes
) -> list[dict]:
    """The GPU comparison (``bench linear --device cuda``): every op x head dim x length x impl, the report
    ``linear_gpu`` (JSON + markdown, rewritten after each row) in ``args.out``. ``sizes`` overrides ``heads``,
    ``tokens``, ``head_dims``, ``ops`` and ``warmup`` (for the CPU smoke test)."""
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench linear --device {args.device}: no CUDA device is visible to torch {torch.__version__}")
    lengths = [int(t) for t in args.lengths.split(",")] if args.lengths else list(GPU_LENGTHS)
    head_dims = sizes.get("head_dims", GPU_HEAD_DIMS)
    heads, tokens = sizes.get("heads", GPU_HEADS), sizes.get("tokens", GPU_TOKENS)
    ops = sizes.get("ops", GPU_OPS)
    warmup = sizes.get("warmup", 2)
    backward = not getattr(args, "forward_only", False)
    machine = harness.machine_info(args.device)
    fla_version = None
    if importlib.util.find_spec("fla") is not None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            fla_version = version("flash-linear-attention")
        except PackageNotFoundError:
            fla_version = "unknown"
    meta = {
        "command": harness.command_line(),
        "machine": machine,
        "lengths": lengths,
        "H": heads,
        "tokens": tokens,
        "chunk_size": GPU_CHUNK,
        "dtype": str(dtype).removeprefix("torch."),
        "fla": fla_version,
    }
    base_notes = [
        f"{meta['dtype']}, H={heads}, B*T={tokens}, K=V=D, chunk {GPU_CHUNK}; TFLOP/s of the chunk algorithm's "
        "work (effattn.bench.linear_gpu docstring), the same count for every impl; fwd+bwd = 3x fwd",
        "torch = effattn PyTorch chunk form, triton = effattn Triton kernels, fla = fla's chunk kernels "
        "(optional baseline)",
        f"times: median of {args.repeats} after {warmup} warm-up calls (min/max in the JSON and table)",
    ]
    from effattn.linear import choose_linear_backend

    device_type = torch.device(args.device).type
    for D in head_dims:  # what backend="auto" picks for these calls (the rule, not a measurement)
        choice, why = choose_linear_backend("auto", device_type, dtype, D, D)
        base_notes.append(f"backend='auto' at D={D}: {choice} ({why})")
    rows: list[dict] = []
    path = None
    for op_name in ops:
        for D in head_dims:
            for T in lengths:
                for impl in GPU_IMPLS:
                    r = measure_gpu(
                        op_name, impl, T, D, heads=heads, tokens=tokens, device=args.device, dtype=dtype,
                        repeats=args.repeats, backward=backward, runners=runners, warmup=warmup,
                    )  # fmt: skip
                    rows.append(r)
                    done = r.get("error") or f"{r['fwd_tflops']:.2f} TFLOP/s fwd"
                    print(f"{op_name} D={D} T={T} {impl}: {done}", flush=True)
                    notes = base_notes + _ratio_notes(rows, "fwdbwd_tflops" if backward else "fwd_tflops")
                    path = harness.write_report(args.out, "linear_gpu", rows, COLUMNS, meta=meta, notes=notes)
    print(f"report: {path}")
    return rows
