"""``python -m effattn bench attention``: exact attention backends side by side.

For dense causal, sliding-window (w=256, causal) and document (packed causal) masks over
several lengths: forward and forward+backward time (median of repeats) and peak memory of
``sdpa`` (plain causal; SDPA with the equivalent dense boolean mask for the others), ``tiled``,
``auto``, ``reference`` (skipped where it would not fit) and compiled FlexAttention (``--flex``),
with efficiency = useful FLOP/s over the machine's matmul FLOP/s measured in the same run
(only unmasked pairs count; backward counted as 2.5x forward, FlashAttention's convention).

With ``--device cuda`` it runs the GPU comparison instead (:func:`run_gpu`): bf16, ``B * T = 16k``
tokens, ``H = 16``, ``D = 64`` and ``128``, T from 1k to 32k, forward and forward+backward TFLOP/s of
the ``triton`` backend, FlashAttention-2 (``flash_attn``, optional), PyTorch SDPA (its own choice, and held
to its FlashAttention-2 backend: ``sdpa_flash``, the causal baseline when ``flash_attn`` is missing) and compiled
FlexAttention on dense causal and on a 1/16-dense block-sparse pattern (the same BlockMask for
triton and Flex; FA2 and SDPA have no block-sparse form).
"""

from __future__ import annotations

import argparse

import torch

from effattn.bench import suite
from effattn.bench.cli import add_common_arguments
from effattn.bench.harness import (
    attention_flops,
    command_line,
    machine_info,
    matmul_flops_per_second,
    measure_peak_memory,
    run_guarded,
    run_guarded_gpu,
    time_stats,
    write_report,
)
from effattn.bench.table import Column, Progress, print_table
from effattn.exact import (
    MAX_DENSE_ELEMENTS,
    and_masks,
    attention,
    causal_mask,
    create_block_mask,
    document_ids_from_cu_seqlens,
    document_mask,
    sliding_window_mask,
)

WINDOW = 256
SDPA_MASK_BUDGET_BYTES = 6 * 2**30  # SDPA with a dense mask converts it to a float T x T bias (and more)


def _doc_cu_seqlens(T: int) -> torch.Tensor:
    """Deterministic packed documents of varied length (mean ~T/8)."""
    g = torch.Generator().manual_seed(T)
    lens, total = [], 0
    while total < T:
        n = int(torch.randint(T // 16 + 1, T // 4 + 2, (1,), generator=g))
        n = min(n, T - total)
        lens.append(n)
        total += n
    return torch.tensor([0] + lens).cumsum(0)


def pattern_spec(name: str, T: int) -> tuple[dict, object, float]:
    """``(attention kwargs, mask_mod, allowed (q, k) pairs)`` of a benchmark pattern."""
    if name == "causal":
        return {"causal": True}, causal_mask(), T * (T + 1) / 2
    if name == "window":
        w = min(WINDOW, T)
        pairs = w * (w + 1) / 2 + (T - w) * w
        return {"causal": True, "window": WINDOW}, and_masks(causal_mask(), sliding_window_mask(WINDOW - 1)), pairs
    if name == "document":
        cu = _doc_cu_seqlens(T)
        lens = (cu[1:] - cu[:-1]).double()
        pairs = float((lens * (lens + 1) / 2).sum())
        return (
            {"causal": True, "cu_seqlens": cu},
            and_masks(causal_mask(), document_mask(document_ids_from_cu_seqlens(cu, T))),
            pairs,
        )
    raise KeyError(name)


def _dense_bool_mask(mask_mod, T: int) -> torch.Tensor:
    i = torch.arange(T)
    rows = [mask_mod(None, None, i[a : a + 1024, None], i[None, :]) for a in range(0, T, 1024)]
    return torch.cat(rows)


def _runner(impl: str, pattern: str, q, k, v, kw, mask_mod):
    """A callable computing the attention output with ``impl`` (layout conversions done here, once)."""
    if impl in ("tiled", "auto", "reference"):
        return lambda: attention(q, k, v, backend=impl, **kw)
    qt, kt, vt = (x.transpose(1, 2).detach().contiguous().requires_grad_(x.requires_grad) for x in (q, k, v))
    T = q.shape[1]
    if impl == "sdpa":
        if pattern == "causal":
            return lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        if q.shape[0] * q.shape[2] * T * T * 4 > SDPA_MASK_BUDGET_BYTES:
            raise MemoryError(f"SDPA with a dense mask would need > {SDPA_MASK_BUDGET_BYTES >> 30} GiB of T x T bias")
        m = _dense_bool_mask(mask_mod, T)
        return lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=m)
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask as flex_block_mask
        from torch.nn.attention.flex_attention import flex_attention

        fn = torch.compile(flex_attention, dynamic=False)
        bm = flex_block_mask(lambda b, h, qi, ki: mask_mod(b, h, qi, ki), None, None, T, T, device=str(q.device))
        return lambda: fn(qt, kt, vt, block_mask=bm)
    raise KeyError(impl)


def measure(
    impl: str,
    pattern: str,
    T: int,
    B: int,
    H: int,
    D: int,
    *,
    device: str = "cpu",
    repeats: int = 3,
    backward: bool = True,
    gemm: float = 1.0,
    flex: bool = False,
) -> dict:
    """One row of the suite: ``impl`` (``sdpa``, ``tiled``, ``auto``, ``reference``, ``flex``) on mask
    ``pattern`` (:func:`pattern_spec`) at length ``T`` with ``[B, T, H, D]`` float32 inputs.

    Keys: ``fwd_s`` (median; ``fwd_s_min``, ``fwd_s_max`` over the repeats), ``fwd_mem_MiB``, ``fwd_eff``
    (useful forward FLOP/s over ``gemm``) and with ``backward`` ``fwdbwd_s`` (with its min and max),
    ``fwdbwd_mem_MiB``, ``fwdbwd_eff`` (backward counted 2.5x forward); ``note``; an ``error``
    (``skipped: ...`` for ``reference`` above its dense bound and ``flex`` without ``flex=True``).
    """
    kw, mask_mod, pairs = pattern_spec(pattern, T)
    row = {"pattern": pattern, "T": T, "impl": impl}
    if impl == "reference" and B * H * T * T > MAX_DENSE_ELEMENTS:
        return {**row, "error": "skipped: would materialize the T x T scores"}
    if impl == "flex" and not flex:
        return {**row, "error": "skipped (run with --flex)"}
    dev = device
    flex_on_cpu = impl == "flex" and torch.device(dev).type == "cpu"  # FlexAttention has no CPU backward
    q, k, v = (torch.randn(B, T, H, D, device=dev, requires_grad=not flex_on_cpu) for _ in range(3))
    do = torch.randn(B, T, H, D, device=dev)
    fwd_flops = attention_flops(B, H, D, D, pairs)

    def one():
        run = _runner(impl, pattern, q, k, v, kw, mask_mod)
        transposed = impl in ("sdpa", "flex")
        g = do.transpose(1, 2) if transposed else do

        def fwd():
            with torch.no_grad():
                return run()

        def fwd_bwd():
            run().backward(g)

        out = {}
        t = time_stats(fwd, repeats=repeats, device=dev)
        out.update({"fwd_s": t.median, "fwd_s_min": t.min, "fwd_s_max": t.max})
        out["fwd_mem_MiB"] = (measure_peak_memory(fwd, dev) or 0) / 2**20
        out["fwd_eff"] = fwd_flops / out["fwd_s"] / gemm
        if flex_on_cpu:
            out["note"] = "forward only: FlexAttention has no backward on the CPU"
        elif backward:
            t = time_stats(fwd_bwd, repeats=repeats, device=dev)
            out.update({"fwdbwd_s": t.median, "fwdbwd_s_min": t.min, "fwdbwd_s_max": t.max})
            out["fwdbwd_mem_MiB"] = (measure_peak_memory(fwd_bwd, dev) or 0) / 2**20
            out["fwdbwd_eff"] = 3.5 * fwd_flops / out["fwdbwd_s"] / gemm
        return out

    return {**row, **run_guarded(one)}


DEFAULT_LENGTHS = (1024, 4096, 16384, 32768)
QUICK_LENGTHS = (1024, 2048)
IMPLS = ("sdpa", "auto", "tiled", "reference", "flex")
PATTERNS = ("causal", "window", "document")

# the terminal summary (the report files hold every column)
TERMINAL_COLUMNS = (
    Column("pattern", key_column=True),
    Column("T", key_column=True),
    Column("impl", key_column=True),
    Column("fwd_s", "fwd ms", scale=1e3),
    Column("fwdbwd_s", "f+b ms", scale=1e3),
    Column("fwd_mem_MiB", "fwd MiB"),
    Column("fwdbwd_mem_MiB", "f+b MiB"),
    Column("fwd_eff", "fwd eff%", scale=100),
    Column("fwdbwd_eff", "f+b eff%", scale=100),
    Column("remark", text=True),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The attention suite's options."""
    add_common_arguments(p, "attention", lengths=DEFAULT_LENGTHS, quick_lengths=QUICK_LENGTHS)
    p.add_argument(
        "--impls",
        type=str,
        default=",".join(IMPLS),
        metavar="A,B,...",
        help="comma-separated implementations to time (default: %(default)s)",
    )
    p.add_argument(
        "--patterns",
        type=str,
        default=",".join(PATTERNS),
        metavar="A,B,...",
        help="comma-separated mask patterns (default: %(default)s)",
    )
    p.add_argument("--flex", action="store_true", help="also time compiled FlexAttention (slow to compile on a CPU)")
    p.add_argument("--forward-only", action="store_true", help="skip the forward+backward measurements")


@suite(
    "attention",
    add_arguments=add_arguments,
    summary="exact attention backends (SDPA, tiled, auto, reference, Flex) on causal, window, document masks",
    description=__doc__,
)
def run(args: argparse.Namespace) -> None:
    if torch.device(args.device).type == "cuda":
        run_gpu(args)
        return
    default = QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else list(default)
    B, H, D = 1, 4, 64
    flex_ok = bool(getattr(args, "flex", False))
    impls = args.impls.split(",") if getattr(args, "impls", None) else list(IMPLS)
    patterns = args.patterns.split(",") if getattr(args, "patterns", None) else list(PATTERNS)
    backward = not getattr(args, "forward_only", False)
    torch.manual_seed(0)
    gemm = matmul_flops_per_second(args.device)
    print(f"matmul rate: {gemm / 1e9:.1f} GFLOP/s (float32)", flush=True)
    rows = []
    bar = Progress("attention", len(patterns) * len(lengths) * len(impls))
    for pattern in patterns:
        for T in lengths:
            for impl in impls:
                r = measure(
                    impl,
                    pattern,
                    T,
                    B,
                    H,
                    D,
                    device=args.device,
                    repeats=args.repeats,
                    backward=backward,
                    gemm=gemm,
                    flex=flex_ok,
                )
                rows.append(r)
                bar.advance(f"{pattern} T={T} {impl}: " + (r.get("error") or f"fwd {1e3 * r['fwd_s']:.3g} ms"))
    bar.close()
    # block-mask density of the tiled engine, for the notes
    notes = [
        f"B={B}, H={H}, D={D}, float32; window={WINDOW} (causal); document = packed causal documents",
        f"matmul rate {gemm / 1e9:.1f} GFLOP/s; eff = useful FLOP/s / matmul FLOP/s (bwd counted 2.5x fwd)",
        "sdpa for window/document = SDPA with the equivalent dense boolean mask; fwd timed under no_grad",
        "peak memory = rise of the process's peak RSS over the RSS before the call (CPU)",
    ]
    for T in lengths:
        bm = create_block_mask(pattern_spec("window", T)[1], 1, 1, T, T)
        notes.append(f"T={T}: window block mask density {bm.density():.4f}")
    _summarize(rows, notes)
    meta = {
        "command": command_line(),
        "machine": machine_info(args.device),
        "gemm_flops": gemm,
        "lengths": lengths,
        "B": B,
        "H": H,
        "D": D,
    }
    cols = [
        "pattern",
        "T",
        "impl",
        "fwd_s",
        "fwdbwd_s",
        "fwd_mem_MiB",
        "fwdbwd_mem_MiB",
        "fwd_eff",
        "fwdbwd_eff",
        "note",
        "error",
    ]
    path = write_report(args.out, "attention", rows, cols, meta=meta, notes=notes)
    shown = [{**r, "remark": r.get("error") or r.get("note")} for r in rows]
    print_table("attention: time, peak memory, efficiency against the GEMM rate", shown, TERMINAL_COLUMNS)
    print(f"report: {path}")


def _summarize(rows: list[dict], notes: list[str]) -> None:
    """Ratios the issue's targets are stated in."""

    def get(pattern, T, impl, key):
        for r in rows:
            if r["pattern"] == pattern and r["T"] == T and r["impl"] == impl:
                return r.get(key)
        return None

    for T in sorted({r["T"] for r in rows}):
        t_sdpa, t_tiled = get("window", T, "sdpa", "fwd_s"), get("window", T, "tiled", "fwd_s")
        m_sdpa, m_tiled = get("window", T, "sdpa", "fwd_mem_MiB"), get("window", T, "tiled", "fwd_mem_MiB")
        if t_sdpa and t_tiled:
            notes.append(f"T={T} window: tiled fwd {t_sdpa / t_tiled:.1f}x faster than SDPA+dense mask")
        if m_sdpa and m_tiled:
            notes.append(f"T={T} window: tiled fwd peak memory {m_sdpa / max(m_tiled, 1e-3):.1f}x lower")
        t_auto, t_plain = get("causal", T, "auto", "fwd_s"), get("causal", T, "sdpa", "fwd_s")
        if t_auto and t_plain:
            notes.append(f"T={T} causal: auto/sdpa time ratio {t_auto / t_plain:.3f}")
        e = get("causal", T, "tiled", "fwd_eff")
        if e:
            notes.append(
                f"T={T} causal: tiled fwd efficiency {e:.2f} of GEMM "
                f"(sdpa {get('causal', T, 'sdpa', 'fwd_eff') or 0:.2f})"
            )


# ----------------------------------------------------------------- GPU: triton vs FA2 vs SDPA vs Flex
# sdpa_flash: SDPA held to its FlashAttention-2 backend (PyTorch's port of FA2), the causal baseline where the
# flash_attn package is not installed
GPU_IMPLS = ("triton", "fa2", "sdpa", "sdpa_flash", "flex")
GPU_PATTERNS = ("causal", "block_sparse")
GPU_HEAD_DIMS = (64, 128)
GPU_HEADS = 16
GPU_TOKENS = 16384  # B * T, FlashAttention's benchmark setting
GPU_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
SPARSE_BLOCK = 128  # FlexAttention's default block; the triton kernels walk it as two 64-tiles
SPARSE_DENSITY = 1 / 16


def sparse_block_mask(T: int, device, block: int = SPARSE_BLOCK, seed: int = 0):
    """A non-causal BlockMask with about ``SPARSE_DENSITY`` of the key blocks per query block: its
    diagonal block plus random others (all full tiles), the same for every batch and head.

    Example::

        >>> bm = sparse_block_mask(4096, "cpu")
        >>> bm.kv_counts.flatten().tolist()[:4], round(bm.density(), 4)
        ([2, 2, 2, 2], 0.0625)
    """
    from effattn.exact import BlockMask

    n = -(-T // block)
    k = max(1, round(n * SPARSE_DENSITY))
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, n, generator=g)
    scores.fill_diagonal_(2.0)  # own block first
    idx = scores.topk(k, dim=-1).indices.view(1, 1, n, k)
    return BlockMask.from_kv_indices(idx.to(device), T, T, q_block=block, kv_block=block)


def _allowed_pairs(pattern: str, T: int, bm) -> float:
    if pattern == "causal":
        return T * (T + 1) / 2
    sizes = torch.full((bm.num_kv_blocks,), bm.kv_block, dtype=torch.float64)
    sizes[-1] = T - bm.kv_block * (bm.num_kv_blocks - 1)
    valid = torch.arange(bm.kv_indices.shape[-1]) < bm.kv_counts[0, 0, :, None].cpu()
    cols = torch.where(valid, sizes[bm.kv_indices[0, 0].cpu()], 0.0).sum(-1)  # keys per query block
    rows = torch.full((bm.num_q_blocks,), float(bm.q_block), dtype=torch.float64)
    rows[-1] = T - bm.q_block * (bm.num_q_blocks - 1)
    return float((rows * cols).sum())


def gpu_runner(impl: str, pattern: str, q, k, v, bm):
    """A callable computing ``impl`` on ``[B, T, H, D]`` inputs (``bm``: the block-sparse pattern's mask)."""
    causal = pattern == "causal"
    if impl == "triton":
        if causal:
            return lambda: attention(q, k, v, causal=True, backend="triton")
        return lambda: attention(q, k, v, block_mask=bm, backend="triton")
    if impl == "fa2":
        if not causal:
            raise ValueError("skipped: FlashAttention-2 has no block-sparse mask")
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            raise RuntimeError("skipped: flash_attn is not installed") from None
        return lambda: flash_attn_func(q, k, v, causal=True)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # views; SDPA and Flex take [B, H, T, D]
    if impl in ("sdpa", "sdpa_flash"):
        if not causal:
            raise ValueError("skipped: SDPA has no block-sparse mask (only a dense T x T one)")
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if impl == "sdpa":
            return lambda: sdpa(qt, kt, vt, is_causal=True).transpose(1, 2)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash_only():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa(qt, kt, vt, is_causal=True).transpose(1, 2)

        return flash_only
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask as flex_block_mask
        from torch.nn.attention.flex_attention import flex_attention

        T = q.shape[1]
        if causal:
            mod = lambda b, h, qi, ki: ki <= qi  # noqa: E731
        else:
            tiles = _tile_table(bm)
            mod = lambda b, h, qi, ki: tiles[qi // SPARSE_BLOCK, ki // SPARSE_BLOCK]  # noqa: E731
        fbm = flex_block_mask(mod, None, None, T, T, device=str(q.device), BLOCK_SIZE=SPARSE_BLOCK)
        fn = torch.compile(flex_attention, dynamic=False)
        return lambda: fn(qt, kt, vt, block_mask=fbm).transpose(1, 2)
    raise KeyError(impl)


def _tile_table(bm) -> torch.Tensor:
    """``[n_q, n_k]`` bool: the tiles the (batch- and head-broadcast) BlockMask lists."""
    n_q, n_k = bm.num_q_blocks, bm.num_kv_blocks
    valid = torch.arange(bm.kv_indices.shape[-1], device=bm.kv_indices.device) < bm.kv_counts[0, 0, :, None]
    table = torch.zeros(n_q, n_k + 1, dtype=torch.bool, device=bm.kv_indices.device)
    table.scatter_(1, torch.where(valid, bm.kv_indices[0, 0], n_k), True)
    return table[:, :n_k]


def measure_gpu(
    impl: str,
    pattern: str,
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
) -> dict:
    """One row of the GPU comparison: ``fwd_tflops`` and ``fwdbwd_tflops`` (useful FLOPs: unmasked pairs
    only, backward 2.5x forward) of ``impl`` on ``pattern`` with ``B = tokens // T``. ``runners`` maps
    an impl to ``(pattern, q, k, v, bm) -> callable`` in place of :func:`gpu_runner` (the CPU smoke
    test's stand-ins)."""
    B = max(1, tokens // T)
    row = {"pattern": pattern, "T": T, "D": D, "B": B, "impl": impl}
    g = torch.Generator(device=device).manual_seed(T + D)
    q, k, v = (
        torch.randn(B, T, heads, D, device=device, dtype=dtype, generator=g).requires_grad_(backward) for _ in range(3)
    )
    bm = sparse_block_mask(T, device) if pattern == "block_sparse" else None
    flops = attention_flops(B, heads, D, D, _allowed_pairs(pattern, T, bm))

    def one():
        make = (runners or {}).get(impl)
        fn = make(pattern, q, k, v, bm) if make else gpu_runner(impl, pattern, q, k, v, bm)
        out = {}

        def fwd():
            with torch.no_grad():
                return fn()

        s = time_stats(fwd, repeats=repeats, device=device)
        out.update(fwd_ms=1e3 * s.median, fwd_min_ms=1e3 * s.min, fwd_max_ms=1e3 * s.max)
        out["fwd_tflops"] = flops / out["fwd_ms"] * 1e3 / 1e12
        if backward:
            do = torch.randn_like(q)
            s = time_stats(lambda: fn().backward(do), repeats=repeats, device=device)
            out.update(fwdbwd_ms=1e3 * s.median, fwdbwd_min_ms=1e3 * s.min, fwdbwd_max_ms=1e3 * s.max)
            out["fwdbwd_tflops"] = 3.5 * flops / out["fwdbwd_ms"] * 1e3 / 1e12
        out["repeats"] = repeats
        return out

    return {**row, **run_guarded_gpu(one)}


def run_gpu(args: argparse.Namespace, *, dtype: torch.dtype = torch.bfloat16, runners: dict | None = None, **sizes):
    """The GPU comparison (``bench attention --device cuda``); ``sizes`` overrides ``heads``, ``tokens``,
    ``head_dims`` (for the CPU smoke test)."""
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"bench attention --device {args.device}: no CUDA device is visible to torch {torch.__version__}"
        )
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else list(GPU_LENGTHS)
    head_dims = sizes.get("head_dims", GPU_HEAD_DIMS)
    heads, tokens = sizes.get("heads", GPU_HEADS), sizes.get("tokens", GPU_TOKENS)
    backward = not getattr(args, "forward_only", False)
    # every (length, head dim, pattern) is a new shape and BlockMask for the compiled FlexAttention: let dynamo
    # recompile for each instead of falling back to eager after its default limit of 8
    dynamo_config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # older torch
    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 4 * len(lengths) * len(head_dims)))
    machine = machine_info(args.device)
    meta = {"command": command_line(), "machine": machine, "lengths": lengths, "H": heads, "tokens": tokens}
    rows = []
    path = None
    for pattern in GPU_PATTERNS:
        for D in head_dims:
            for T in lengths:
                for impl in GPU_IMPLS:
                    r = measure_gpu(
                        impl, pattern, T, D, heads=heads, tokens=tokens, device=args.device, dtype=dtype,
                        repeats=args.repeats, backward=backward, runners=runners,
                    )  # fmt: skip
                    rows.append(r)
                    done = r.get("error") or f"{r['fwd_tflops']:.1f} TFLOP/s fwd"
                    print(f"{pattern} D={D} T={T} {impl}: {done}", flush=True)
                    # rewritten after every row: a run stopped by a time limit keeps what it measured
                    path = _write_gpu_report(args.out, rows, meta, dtype, heads, tokens)
    print(f"report: {path}")
    return rows


# the targets: triton's forward+backward throughput over the baseline's, per pattern (the first
# baseline with a measurement: FA2 itself, else SDPA's FA2 backend)
GPU_TARGETS = {"causal": (("fa2", "sdpa_flash"), 0.8), "block_sparse": (("flex",), 1.0)}


def _write_gpu_report(out, rows: list[dict], meta: dict, dtype: torch.dtype, heads: int, tokens: int):
    notes = [
        f"{str(dtype).removeprefix('torch.')}, H={heads}, B*T={tokens}; TFLOP/s of useful work (unmasked pairs; "
        "backward counted 2.5x forward); times: median of the repeats after one warm-up call (min/max beside)",
        f"block_sparse: {SPARSE_BLOCK}-blocks, about {SPARSE_DENSITY:.4f} of the key blocks per query block "
        "(diagonal + random), the same BlockMask for triton and FlexAttention",
    ]
    for pattern, D, T in {(r["pattern"], r["D"], r["T"]) for r in rows}:
        tr = next((r for r in rows if (r["pattern"], r["D"], r["T"], r["impl"]) == (pattern, D, T, "triton")), {})
        bases, target = GPU_TARGETS[pattern]
        same = {r["impl"]: r for r in rows if (r["pattern"], r["D"], r["T"]) == (pattern, D, T)}
        base = next((b for b in bases if same.get(b, {}).get("fwdbwd_tflops")), bases[0])
        ref = same.get(base, {})
        if tr.get("fwdbwd_tflops") and ref.get("fwdbwd_tflops"):
            ratio = tr["fwdbwd_tflops"] / ref["fwdbwd_tflops"]
            verdict = "met" if ratio >= target else "NOT met"
            notes.append(
                f"{pattern} D={D} T={T}: triton / {base} fwd+bwd = {ratio:.2f} (target >= {target}: {verdict})"
            )
    cols = ["pattern", "D", "T", "B", "impl", "fwd_ms", "fwd_min_ms", "fwd_max_ms", "fwd_tflops", "fwdbwd_ms",
            "fwdbwd_min_ms", "fwdbwd_max_ms", "fwdbwd_tflops", "repeats", "error"]  # fmt: skip
    return write_report(out, "attention_gpu", rows, cols, meta=meta, notes=sorted(notes))
