"""The speed section of ``effattn compare``: time, memory and decode step of every registered mechanism.

The measurements are those of the ``attention`` and ``linear`` benchmark suites, through their public
functions (:func:`effattn.bench.attention.measure`, :func:`effattn.bench.linear.measure_op`,
:func:`effattn.bench.linear.decode_rows`) and :func:`effattn.bench.harness.measure_forward_backward`.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from effattn.bench import attention as att
from effattn.bench import harness
from effattn.bench import linear as lin
from effattn.bench.compare.config import CompareConfig, guard
from effattn.bench.table import Progress
from effattn.exact import decode_attention
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
    """The attention suite's row keys -> this report's."""
    out = {}
    if "fwd_s" in row:
        out["fwd_ms"] = 1e3 * row["fwd_s"]
    if "fwdbwd_s" in row:
        out["fwd_bwd_ms"] = 1e3 * row["fwdbwd_s"]
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


def _from_linear_suite(row: dict) -> dict:
    return {
        "fwd_ms": row.get("fwd_ms"),
        "fwd_bwd_ms": row.get("fwd_bwd_ms"),
        "fwd_MiB": row.get("fwd_peak_MiB"),
        "fwd_bwd_MiB": row.get("fwd_bwd_peak_MiB"),
        "eff_%": row.get("fwd_eff_%"),
    }


def _exact_decode(T: int, device: str) -> dict:
    """One token of ``effattn.exact.decode_attention`` against a float32 KV cache of ``T`` tokens."""
    q = torch.randn(lin.BATCH, 1, lin.HEADS, lin.HEAD_DIM, device=device)
    kc, vc = (torch.randn(lin.BATCH, T + 1, lin.HEADS, lin.HEAD_DIM, device=device) for _ in range(2))
    with torch.no_grad():
        t = harness.measure_time(lambda: decode_attention(q, kc, vc), repeats=lin.STEP_REPEATS, warmup=2, device=device)
    return {"step_us": 1e6 * t, "state_bytes": 2 * kc.numel() * kc.element_size()}


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

    def exact_row(impl: str, pattern: str, T: int, flex: bool = False) -> dict:
        row = att.measure(
            impl, pattern, T, B, H, D, device=dev, repeats=cfg.repeats, backward=cfg.backward, gemm=gemm, flex=flex
        )
        return _from_attention_suite(row)

    mechs: list[SpeedMechanism] = []
    for impl in ("sdpa", "tiled", "auto", "reference"):
        mechs.append(
            SpeedMechanism(
                "exact",
                f"{impl} causal",
                lambda T, impl=impl: exact_row(impl, "causal", T),
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
            lambda T: exact_row("tiled", "window", T),
        )
    )
    for pattern, label in (("causal", "causal"), ("window", f"window={att.WINDOW}")):
        mechs.append(
            SpeedMechanism(
                "baseline",
                f"flex {label} (torch.compile)",
                lambda T, p=pattern: exact_row("flex", p, T, flex=cfg.flex),
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
                lambda T, op=op: _from_linear_suite(lin.measure_op(op, T, cfg.repeats, dev, gemm, cfg.backward)),
                lambda T, op=op: lin.decode_rows(op, [T], dev)[0],
            )
        )
    for name in sorted(SPARSE):
        mechs.append(SpeedMechanism("sparse", name, lambda T, m=SPARSE[name]: _sparse_forward(m, T, cfg, gemm)))
    return mechs + list(cfg.extra_mechanisms), external_notes


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
    """Every mechanism at every length of ``cfg``: ``(rows, meta additions, notes)``."""
    gemm = harness.matmul_flops_per_second(cfg.device, sizes=(512,) if cfg.preset == "tiny" else (2048, 4096))
    mechs, notes = speed_mechanisms(cfg, gemm)
    if cfg.preset != "tiny":  # one small call of every linear op first: no one-time setup in a timing
        lin.warm_up([LINEAR[n] for n in sorted(LINEAR)], cfg.device)
    rows: list[dict] = []
    bar = Progress("speed", len(mechs) * len(cfg.lengths))
    for m in mechs:
        for T in cfg.lengths:
            row = {"family": m.family, "mechanism": m.name, "T": T}
            r = guard(lambda m=m, T=T: m.forward(T))
            if "error" not in r and m.decode is not None:
                d = guard(lambda m=m, T=T: m.decode(T))
                r.update({k: d[k] for k in ("step_us", "state_bytes") if k in d})
                if "error" in d:
                    r["note"] = f"decode: {d['error']}"
            row.update({k: v for k, v in r.items() if v is not None})
            rows.append(row)
            bar.advance(f"{m.name} T={T}")
    bar.close()
    notes += [
        f"GEMM rate {gemm / 1e9:.1f} GFLOP/s (float32 matmul, this run); eff_% = useful forward FLOP/s over it",
        "B=1, H=4, D=64, float32; fwd under no_grad; fwd_bwd = forward + backward of every input; "
        "MiB = rise of peak memory over the memory in use before one call",
        "step_us: one decode token against a context of T tokens; state_bytes: the KV cache (exact) or "
        "the recurrent state (linear) it needs; sparse methods have no decode form here",
    ]
    return rows, {"gemm_flops_per_s": gemm}, notes
