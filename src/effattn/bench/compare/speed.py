"""The speed section of ``effattn compare``: time, memory and decode step of every registered mechanism.

Every forward and forward+backward row is measured by :func:`effattn.bench.harness.measure_forward_backward`
(the linear suite's :func:`effattn.bench.linear.measure_op` for linear ops; exact backends, sparse methods
and external baselines on the same sizes here): the peak memory of a first call, then ``repeats`` timed
calls, each followed by SDPA causal at the same length on inputs of the same shape (the *paired* method of
``bench sparse --paired``). A row keeps the median, min and max of its own timings, and the median of the
per-pair ratios ``time(SDPA) / time(row)`` (``fwd_speedup_paired``, ``fwd_bwd_speedup_paired``): the
machine's drift over minutes cancels within a pair, so these ratios are the headline speed figures. Decode
steps come from :func:`effattn.bench.linear.decode_rows` and :func:`effattn.bench.linear.sdpa_decode_row`.

With ``--mixers`` (``cfg.mixers``), each named mixer of :mod:`effattn.nn`'s registry adds a row per length
(family ``mixer``, :func:`mixer_mechanisms`): the layer alone at ``bench memory``'s size
(:func:`effattn.bench.memory_speed.build_layer`: width 64, 2 heads, batch 1, float32), its defaults plus its
``--mixer-options``; forward and forward+backward through the same ``measure_forward_backward`` (not
paired: a layer with its projections is not the ops' size), one decode step after a prefill of ``T``
tokens (:func:`effattn.bench.memory_speed.decode_step_stats`) and ``state_bytes`` = ``state_size(1, T)``.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from effattn.bench import attention as att
from effattn.bench import harness
from effattn.bench import linear as lin
from effattn.bench.compare.config import CompareConfig, guard
from effattn.bench.compare.speed_report import MIXER_FAMILY
from effattn.bench.memory_speed import DIM, HEADS, build_layer, decode_step_stats
from effattn.bench.table import Progress
from effattn.exact import MAX_DENSE_ELEMENTS, attention, decode_attention
from effattn.linear import REGISTRY as LINEAR
from effattn.sparse import REGISTRY as SPARSE


@dataclass
class SpeedMechanism:
    """One mechanism of the speed section: ``forward(T)`` measures a full sequence (a row with
    ``fwd_ms``, ``fwd_bwd_ms``, ``fwd_MiB``, ``fwd_bwd_MiB``, ``eff_%``), ``decode(T)`` one decode step
    against a context of ``T`` tokens (``step_us``, ``state_bytes``) or None where not applicable."""

    family: str
    name: str
    forward: Callable[[int], dict]
    decode: Callable[[int], dict] | None = None


def _from_attention_suite(row: dict) -> dict:
    """The attention suite's row keys -> this report's (the compiled FlexAttention rows, not paired)."""
    out = {}
    for a, b in (("fwd_s", "fwd_ms"), ("fwdbwd_s", "fwd_bwd_ms")):
        for s in ("", "_min", "_max"):
            if a + s in row:
                out[b + s] = 1e3 * row[a + s]
    for a, b in (("fwd_mem_MiB", "fwd_MiB"), ("fwdbwd_mem_MiB", "fwd_bwd_MiB")):
        if a in row:
            out[b] = row[a]
    if "fwd_eff" in row:
        out["eff_%"] = 100 * row["fwd_eff"]
    if "note" in row:
        out["note"] = row["note"]
    if "error" in row:
        if str(row["error"]).startswith("skipped"):
            out["note"] = row["error"]
        else:
            raise RuntimeError(row["error"])
    return out


TIMING_KEYS = tuple(f"{k}{s}" for k in ("fwd_ms", "fwd_bwd_ms") for s in ("", "_min", "_max")) + (
    "repeats",
    "fwd_speedup_paired",
    "fwd_bwd_speedup_paired",
    "baseline_fwd_ms",
    "baseline_fwd_bwd_ms",
)


def _from_linear_suite(row: dict) -> dict:
    """A :func:`effattn.bench.harness.measure_forward_backward` row -> this report's keys."""
    out = {k: row.get(k) for k in TIMING_KEYS}
    out.update({"fwd_MiB": row.get("fwd_peak_MiB"), "fwd_bwd_MiB": row.get("fwd_bwd_peak_MiB")})
    out["eff_%"] = row.get("fwd_eff_%")
    return out


def sdpa_baseline(T: int, device: str) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """``(forward, leaves)`` of the pairing baseline: SDPA causal at length ``T`` on fresh float32 inputs of
    the suites' sizes, already in SDPA's ``[B, H, T, D]`` layout (no conversion in the timed call)."""
    B, H, D = lin.BATCH, lin.HEADS, lin.HEAD_DIM
    q, k, v = (torch.randn(B, H, T, D, device=device, requires_grad=True) for _ in range(3))
    return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), [q, k, v]


def _linear_forward(op, T: int, cfg: CompareConfig, gemm: float) -> dict:
    """A linear op's chunk form through the linear suite's :func:`effattn.bench.linear.measure_op`,
    paired with SDPA causal."""
    row = lin.measure_op(op, T, cfg.repeats, cfg.device, gemm, cfg.backward, baseline=sdpa_baseline(T, cfg.device))
    return _from_linear_suite(row)


def _exact_forward(impl: str, pattern: str, T: int, cfg: CompareConfig, gemm: float) -> dict:
    """``impl`` (``sdpa`` or an :func:`effattn.exact.attention` backend) on the attention suite's
    ``pattern`` (:func:`effattn.bench.attention.pattern_spec`) at the suites' sizes, paired with SDPA
    causal; FLOPs counted on the unmasked pairs, backward 2.5 x forward (FlashAttention's convention)."""
    B, H, D = lin.BATCH, lin.HEADS, lin.HEAD_DIM
    if impl == "reference" and B * H * T * T > MAX_DENSE_ELEMENTS:
        return {"note": "skipped: would materialize the T x T scores"}
    kw, _, pairs = att.pattern_spec(pattern, T)
    if impl == "sdpa":
        if pattern != "causal":
            raise ValueError(f"pattern: the sdpa row is causal only, got {pattern!r}")
        forward, leaves = sdpa_baseline(T, cfg.device)  # its own inputs: paired with another SDPA call
    else:
        q, k, v = (torch.randn(B, T, H, D, device=cfg.device, requires_grad=True) for _ in range(3))
        forward, leaves = (lambda: attention(q, k, v, backend=impl, **kw)), [q, k, v]
    row = harness.measure_forward_backward(
        forward,
        leaves,
        repeats=cfg.repeats,
        device=cfg.device,
        flops=harness.attention_flops(B, H, D, D, pairs),
        bwd_factor=lin.SDPA_BWD_FACTOR,
        gemm=gemm,
        backward=cfg.backward,
        baseline=sdpa_baseline(T, cfg.device),
    )
    out = _from_linear_suite(row)
    if impl == "sdpa":
        out["note"] = "paired with another SDPA call: its x sdpa is the noise floor of the pairing"
    return out


def _exact_decode(T: int, device: str) -> dict:
    """One token of ``effattn.exact.decode_attention`` against a float32 KV cache of ``T`` tokens."""
    q = torch.randn(lin.BATCH, 1, lin.HEADS, lin.HEAD_DIM, device=device)
    kc, vc = (torch.randn(lin.BATCH, T + 1, lin.HEADS, lin.HEAD_DIM, device=device) for _ in range(2))
    with torch.no_grad():
        t = harness.time_stats(lambda: decode_attention(q, kc, vc), repeats=lin.STEP_REPEATS, warmup=2, device=device)
    steps = {"step_us": 1e6 * t.median, "step_us_min": 1e6 * t.min, "step_us_max": 1e6 * t.max}
    return steps | {"state_bytes": 2 * kc.numel() * kc.element_size()}


def _sparse_forward(method, T: int, cfg: CompareConfig, gemm: float) -> dict:
    """A sparse method's ``attend`` at the linear suite's sizes, FLOPs counted on its dense selection."""
    B, H, D = lin.BATCH, lin.HEADS, lin.HEAD_DIM
    causal = True in method.causal_modes
    params = method.make_params(T)
    q, k, v = (torch.randn(B, T, H, D, device=cfg.device, requires_grad=True) for _ in range(3))
    flops = None
    # count the selected pairs where the method has a dense selection and it is affordable
    if callable(method.dense_mask) and B * H * T * T <= 2**26:
        try:
            with torch.no_grad():
                m = method.dense_mask(q, k, causal=causal, **params)
        except Exception:  # noqa: BLE001 - the FLOP count is optional; the timing is what matters
            m = None
        if isinstance(m, torch.Tensor):
            pairs = float(m.expand(B, H, T, T).sum()) / (B * H)
            flops = harness.attention_flops(B, H, D, D, pairs)
    row = harness.measure_forward_backward(
        lambda: method.attend(q, k, v, causal=causal, **params),
        [q, k, v],
        repeats=cfg.repeats,
        device=cfg.device,
        flops=flops,
        bwd_factor=lin.SDPA_BWD_FACTOR,
        gemm=gemm,
        backward=cfg.backward,
        baseline=sdpa_baseline(T, cfg.device),
    )
    out = _from_linear_suite(row)
    notes = [] if flops is not None else ["no dense selection to count FLOPs on: time and memory only"]
    if not causal:
        notes.append("non-causal (method has no causal mode)")
    if notes:
        out["note"] = "; ".join(notes)
    return out


def speed_mechanisms(cfg: CompareConfig, gemm: float) -> tuple[list[SpeedMechanism], list[str]]:
    """Every registered mechanism as a :class:`SpeedMechanism`, plus notes on what was skipped."""
    dev = cfg.device
    B, H, D = lin.BATCH, lin.HEADS, lin.HEAD_DIM

    def flex_row(pattern: str, T: int) -> dict:
        row = att.measure(
            "flex",
            pattern,
            T,
            B,
            H,
            D,
            device=dev,
            repeats=cfg.repeats,
            backward=cfg.backward,
            gemm=gemm,
            flex=cfg.flex,
        )
        return _from_attention_suite(row)

    mechs: list[SpeedMechanism] = []
    for impl in ("sdpa", "tiled", "auto", "reference"):
        mechs.append(
            SpeedMechanism(
                "exact",
                f"{impl} causal",
                lambda T, impl=impl: _exact_forward(impl, "causal", T, cfg, gemm),
                (lambda T: lin.sdpa_decode_row(T, dev))
                if impl == "sdpa"
                else (lambda T: _exact_decode(T, dev))
                if impl == "tiled"
                else None,
            )
        )
    mechs.append(
        SpeedMechanism(
            "exact",
            f"tiled window={att.WINDOW}",
            lambda T: _exact_forward("tiled", "window", T, cfg, gemm),
        )
    )
    for pattern, label in (("causal", "causal"), ("window", f"window={att.WINDOW}")):
        mechs.append(
            SpeedMechanism(
                "baseline",
                f"flex {label} (torch.compile)",
                lambda T, p=pattern: flex_row(p, T),
            )
        )
    external, external_notes = external_baselines(cfg, gemm)
    mechs += external
    for name in sorted(LINEAR):
        op = LINEAR[name]
        mechs.append(
            SpeedMechanism(
                "linear",
                name,
                lambda T, op=op: _linear_forward(op, T, cfg, gemm),
                lambda T, op=op: lin.decode_rows(op, [T], dev)[0],
            )
        )
    for name in sorted(SPARSE):
        mechs.append(SpeedMechanism("sparse", name, lambda T, m=SPARSE[name]: _sparse_forward(m, T, cfg, gemm)))
    return mechs + mixer_mechanisms(cfg) + list(cfg.extra_mechanisms), external_notes


def mixer_label(name: str, options: dict | None) -> str:
    """A mixer row's mechanism: the mixer's name, with its ``--mixer-options`` where it has any.

    Example::

        >>> mixer_label("titans_mal", {"chunk_size": 16, "depth": 1}), mixer_label("gla", None)
        ('titans_mal (chunk_size=16, depth=1)', 'gla')
    """
    if not options:
        return name
    return f"{name} ({', '.join(f'{k}={v!r}' for k, v in options.items())})"


def _mixer_forward(name: str, kw: dict, T: int, cfg: CompareConfig) -> dict:
    """The mixer layer alone (:func:`effattn.bench.memory_speed.build_layer`) on a ``[1, T, 64]`` input:
    forward under no_grad, forward+backward with the gradients of the input and of every parameter
    (:func:`effattn.bench.harness.measure_forward_backward`, not paired), and ``state_bytes``."""
    layer = build_layer(name, kw, cfg.device)
    x = torch.randn(1, T, DIM, device=cfg.device, requires_grad=True)
    row = harness.measure_forward_backward(
        lambda: layer(x)[0],
        [x, *layer.parameters()],
        repeats=cfg.repeats,
        device=cfg.device,
        backward=cfg.backward,
    )
    return _from_linear_suite(row) | {"state_bytes": layer.state_size(1, T)}  # no FLOP count: eff_% is None


def _mixer_decode(name: str, kw: dict, T: int, device: str) -> dict:
    """One decode step of the mixer layer after a prefill of ``T`` tokens
    (:func:`effattn.bench.memory_speed.decode_step_stats`, :data:`effattn.bench.linear.STEP_REPEATS` steps);
    empty where the layer returns no state."""
    layer = build_layer(name, kw, device)
    t = decode_step_stats(
        layer, torch.randn(1, T, DIM, device=device), repeats=lin.STEP_REPEATS, warmup=2, device=device
    )
    if t is None:
        return {}
    return {"step_us": 1e6 * t.median, "step_us_min": 1e6 * t.min, "step_us_max": 1e6 * t.max}


def mixer_mechanisms(cfg: CompareConfig) -> list[SpeedMechanism]:
    """One :class:`SpeedMechanism` (family ``mixer``) per mixer of ``cfg.mixers`` (none when it is None), built
    with its ``cfg.mixer_options``; an unknown mixer or one that fails gives error rows (``run_speed``)."""
    mechs = []
    for name in cfg.mixers or ():
        kw = dict(cfg.mixer_options.get(name, {}))
        mechs.append(
            SpeedMechanism(
                MIXER_FAMILY,
                mixer_label(name, kw),
                functools.partial(_mixer_forward, name, kw, cfg=cfg),
                functools.partial(_mixer_decode, name, kw, device=cfg.device),
            )
        )
    return mechs


MIXER_NOTE = (
    f"family mixer (--mixers): each named mixer of effattn.nn's registry as one layer alone, projections included, "
    f"width {DIM}, {HEADS} heads, batch 1, float32, its defaults plus --mixer-options (bench memory's size); "
    "not paired with SDPA (no x sdpa) and not the op rows' size; f+b: gradients of the input and every parameter; "
    f"step_us: one token after a prefill of T tokens (median of {lin.STEP_REPEATS}); state_bytes: state_size(1, T)"
)


def external_baselines(cfg: CompareConfig, gemm: float) -> tuple[list[SpeedMechanism], list[str]]:
    """``flash_attn`` (FlashAttention-2 causal) and ``fla`` (chunked Gated DeltaNet) as labelled
    baselines, in bfloat16, where the package is installed and the run is on CUDA (both are GPU-only
    Triton/CUDA kernels); otherwise a note says why the row is absent."""
    mechs, notes = [], []
    for pkg in ("flash_attn", "fla"):
        if importlib.util.find_spec(pkg) is None:
            notes.append(f"{pkg} is not installed: no {pkg} baseline")
        elif not cfg.device.startswith("cuda"):
            notes.append(f"{pkg} is installed but its kernels need --device cuda: no {pkg} baseline")
        else:
            mechs.append(
                SpeedMechanism("baseline", EXTERNAL_LABELS[pkg], functools.partial(external_row, pkg, cfg, gemm))
            )
    return mechs, notes


EXTERNAL_LABELS = {"flash_attn": "flash_attn causal (bf16)", "fla": "fla chunk_gated_delta_rule (bf16)"}


def external_row(pkg: str, cfg: CompareConfig, gemm: float, T: int) -> dict:
    """One speed row of an external baseline (``flash_attn`` or ``fla``) at length ``T``, bfloat16."""
    B, H, D = lin.BATCH, lin.HEADS, lin.HEAD_DIM
    dev, dt = cfg.device, torch.bfloat16
    q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    if pkg == "flash_attn":
        from flash_attn import flash_attn_func

        fn, leaves = (lambda: flash_attn_func(q, k, v, causal=True)), [q, k, v]
        flops, bwd = harness.attention_flops(B, H, D, D, T * (T + 1) / 2), lin.SDPA_BWD_FACTOR
    else:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=dev)).requires_grad_(True)
        beta = torch.rand(B, T, H, device=dev, dtype=dt).requires_grad_(True)

        def fn():  # k normalized inside the timed call: each backward needs its own graph
            kn = torch.nn.functional.normalize(k, dim=-1)
            return chunk_gated_delta_rule(q=q, k=kn, v=v, g=g, beta=beta)[0]

        leaves = [q, k, v, g, beta]
        flops, bwd = None, 2.0
    row = harness.measure_forward_backward(
        fn, leaves, repeats=cfg.repeats, device=dev, flops=flops, bwd_factor=bwd, gemm=gemm, backward=cfg.backward
    )
    return _from_linear_suite(row)


def run_speed(cfg: CompareConfig) -> tuple[list[dict], dict, list[str]]:
    """Every mechanism at every length of ``cfg``: ``(rows, meta additions, notes)``.

    The meta additions record the GEMM rate and the machine's load before and after the section
    (:func:`effattn.bench.harness.load_snapshot`); a load above the CPU count is printed as a warning.
    Each row's ``flags`` are :func:`effattn.bench.harness.timing_flags` of its stored timings.
    """
    load_before = harness.load_snapshot()
    warn(harness.busy_warning(load_before), "before the speed section")
    gemm = harness.matmul_flops_per_second(cfg.device, sizes=(512,) if cfg.preset == "tiny" else (2048, 4096))
    mechs, notes = speed_mechanisms(cfg, gemm)
    if cfg.preset != "tiny":  # one small call of everything first: no one-time setup in a timing
        lin.warm_up([LINEAR[n] for n in sorted(LINEAR)], cfg.device)
        for m in mechs:
            if m.family != "linear":
                guard(lambda m=m: m.forward(WARM_UP_LENGTH))
    rows: list[dict] = []
    bar = Progress("speed", len(mechs) * len(cfg.lengths))
    for m in mechs:
        for T in cfg.lengths:
            row = {"family": m.family, "mechanism": m.name, "T": T}
            r = guard(lambda m=m, T=T: m.forward(T))
            if "error" not in r and m.decode is not None:
                d = guard(lambda m=m, T=T: m.decode(T))
                r.update({k: d[k] for k in ("step_us", "step_us_min", "step_us_max", "state_bytes") if k in d})
                if "error" in d:
                    r["note"] = f"decode: {d['error']}"
            row.update({k: v for k, v in r.items() if v is not None})
            flags = harness.timing_flags(row)
            if flags:
                row["flags"] = "; ".join(flags)
            rows.append(row)
            bar.advance(f"{m.name} T={T}")
    bar.close()
    load_after = harness.load_snapshot()
    warn(harness.busy_warning(load_after), "after the speed section")
    notes += [
        f"GEMM rate {gemm / 1e9:.1f} GFLOP/s (float32 matmul, this run); eff_% = useful forward FLOP/s over it",
        "B=1, H=4, D=64, float32; fwd under no_grad; fwd_bwd = forward + backward of every input; "
        "MiB = rise of peak memory over the memory in use before one call",
        f"times: median of the repeats after a first call (which measures the memory), with min and max; "
        f"each timed call is followed by SDPA causal at the same T (paired); x sdpa = median over the pairs of "
        f"time(SDPA) / time(row), > 1 faster than SDPA; flags: max/min of a timing's repeats above "
        f"{harness.SPREAD_LIMIT} (spread), or a forward median above the forward+backward median",
        "step_us: one decode token against a context of T tokens; state_bytes: the KV cache (exact) or "
        "the recurrent state (linear) it needs; sparse methods have no decode form here",
    ]
    if any(m.family == MIXER_FAMILY for m in mechs):
        notes.append(MIXER_NOTE)
    return rows, {"gemm_flops_per_s": gemm, "load_before": load_before, "load_after": load_after}, notes


WARM_UP_LENGTH = 256


def warn(message: str | None, when: str) -> None:
    """Print a warning line to the terminal (none for ``None``)."""
    if message:
        print(f"warning ({when}): {message}", flush=True)
