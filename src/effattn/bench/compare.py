"""``python -m effattn compare``: which attention should I use for my length and memory budget?

On the machine at hand, in one run:

1. **speed and memory** — for every registered mechanism (the exact backends ``sdpa``, ``tiled``,
   ``auto``, ``reference`` on causal attention and the tiled engine on sliding-window attention;
   every linear op's chunk form from :data:`effattn.linear.REGISTRY`; every sparse method in
   :data:`effattn.sparse.REGISTRY`) at each length: forward and forward+backward time (median of
   repeats), peak memory, efficiency against the machine's own GEMM rate, and the time of one decode
   step with the state or KV cache it needs. The measurements are those of the ``attention`` and
   ``linear`` benchmark suites (their functions are reused, not rewritten);
2. **recall** — MQAR (Zoology, Arora et al. 2023): a 2-layer :class:`effattn.nn.LM` per mixer and
   width is trained on generated data; accuracy at the query positions of a held-out set against
   the model's state size (KV cache for attention, the recurrent state otherwise);
3. **reasoning** — ListOps (Long Range Arena, Tay et al. 2021) at a CPU-sized length (the LRA
   length 500-2000 with ``--full``).

Presets: ``tiny`` (seconds; tests), ``quick`` (default, about 10 minutes on 2 CPU cores),
``recall`` (``--preset recall``: the recall section alone, Zoology's state-size trend at a CPU size:
attention and fixed-state mixers at three widths, trained on a mixture of pair counts and tested per
pair count; about half an hour on one CPU core), ``state`` (the same task at width 64 with head dims
4-32: the state of linear attention, GLA and DeltaNet spans 16x at one width) and ``full`` (``--full``;
long: LRA length, 64k tokens).
A mechanism that fails is reported with its error in the tables and the run goes on. Output: tables
on the terminal (``rich`` where installed, plain text otherwise) and a report folder (default
``bench_out/compare``) with ``report.md``, ``results.json`` and PNG plots (time and memory vs length,
recall vs state size).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import pkgutil
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from effattn.bench import harness

SECTIONS = ("speed", "recall", "listops")


@dataclass
class CompareConfig:
    """Sizes of one comparison run (see :data:`PRESETS`)."""

    preset: str = "quick"
    lengths: tuple[int, ...] = (512, 2048)
    repeats: int = 3
    backward: bool = True
    device: str = "cpu"
    out: str = "bench_out/compare"
    only: tuple[str, ...] = SECTIONS
    mixers: tuple[str, ...] | None = None  # None: every registered mixer
    # MQAR
    mqar_widths: tuple[int, ...] = (64,)
    mqar_head_dims: tuple[int, ...] = (32,)  # heads = width // head_dim; several: one training per head dim
    # CPU budget: T 16 with 4 pairs (the smallest length Zoology's rule 4 * pairs <= T allows), where a
    # 2-layer attention LM at width 64 passes 0.9 after ~300 steps (seeds 0-3); --full runs T 256, 32 pairs
    mqar_seq_len: int = 16
    mqar_kv_pairs: int | tuple[int, ...] = 4  # several: trained on their mixture, tested per pair count
    mqar_vocab: int = 32
    mqar_train: int = 4000
    mqar_test: int = 256
    mqar_steps: int = 400
    mqar_batch: int = 32
    mqar_lr: float = 1e-3
    mqar_weight_decay: float = 0.0
    mqar_random_non_queries: bool = False  # Zoology's default is True (used by --full)
    # ListOps
    listops_mixers: tuple[str, ...] | None = None  # None: a small default set (the mixers of recall)
    listops_dim: int = 64
    listops_min_len: int = 16
    listops_max_len: int = 64
    listops_depth: int = 6
    listops_train: int = 2000
    listops_test: int = 256
    listops_steps: int = 200
    listops_batch: int = 32
    listops_lr: float = 1e-3
    seed: int = 0
    flex: bool = False  # compiled FlexAttention rows (about a minute of compilation per shape on a CPU)
    extra_mechanisms: list = field(default_factory=list)  # more SpeedMechanism objects (tests)


# attention and fixed-state mixers whose states span ~4 KB to ~400 KB at widths 32-128:
# GLA < linear attention < DeltaNet < Mamba-2 < Based (attention's KV cache at T=32: 16-64 KB)
RECALL_MIXERS = ("attention", "gla", "linear_attention", "deltanet", "mamba2", "based")

# the MQAR task and training budget of the recall and state presets
_RECALL_TASK = dict(
    only=("recall",),
    mqar_seq_len=32,
    mqar_kv_pairs=(2, 4, 8),
    mqar_vocab=34,
    mqar_train=24000,
    mqar_test=256,
    mqar_steps=800,
    mqar_batch=32,
    mqar_lr=1e-3,
)

PRESETS: dict[str, dict] = {
    "tiny": dict(
        lengths=(64, 128),
        repeats=1,
        mqar_widths=(32,),
        mqar_seq_len=32,
        mqar_kv_pairs=4,
        mqar_vocab=64,
        mqar_train=128,
        mqar_test=32,
        mqar_steps=4,
        mqar_batch=32,
        listops_dim=32,
        listops_min_len=8,
        listops_max_len=32,
        listops_depth=4,
        listops_train=64,
        listops_test=16,
        listops_steps=3,
        listops_batch=16,
    ),
    "quick": {},
    # Meant to show Zoology's finding (attention solves MQAR at every width; fixed-state mixers need more
    # state as the pair count grows) at a size one CPU core trains in about half an hour. Sized by
    # scratch calibration runs of a 2-layer attention LM on this CPU (docs/results/compare_recall/
    # calibration): at T=64 (vocabulary 66-128) and at T=32 with vocabulary 64 it stayed at chance
    # (1 / pairs) for as long as it ran (450-2250 steps); at T=32, 2/4/8 pairs, vocabulary 34, width
    # 64 left chance within 300 steps. With 16 distinct keys and head dim 32 every mixer's key space can
    # hold every key, so this preset does not bind the state: see docs/compare.md
    "recall": dict(_RECALL_TASK, mixers=RECALL_MIXERS, mqar_widths=(32, 64, 128)),
    # The same task at width 64 with head dims 4-32: the state of the mixers whose state is heads x
    # head_dim^2 (linear attention, GLA, DeltaNet) spans 16x and binds at small head dims, while attention's
    # KV cache (2 x T x width) stays put. Mamba-2 and Based are left out: their state does not depend on
    # the head dim (d_state, the feature dimension)
    "state": dict(
        _RECALL_TASK,
        mixers=("attention", "gla", "linear_attention", "deltanet"),
        mqar_widths=(64,),
        mqar_head_dims=(4, 8, 16, 32),
    ),
    "full": dict(
        lengths=(1024, 4096, 16384, 65536),
        repeats=3,
        mqar_widths=(64, 128, 256),
        mqar_seq_len=256,
        mqar_kv_pairs=32,
        mqar_vocab=8192,
        mqar_lr=1e-3,
        mqar_train=20000,
        mqar_test=1000,
        mqar_steps=3000,
        mqar_batch=64,
        mqar_weight_decay=0.1,
        mqar_random_non_queries=True,
        listops_dim=128,
        listops_min_len=500,
        listops_max_len=2000,
        listops_depth=10,
        listops_train=20000,
        listops_test=1000,
        listops_steps=5000,
        flex=True,
    ),
}


def make_config(preset: str = "quick", **overrides) -> CompareConfig:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return replace(CompareConfig(preset=preset, **PRESETS[preset]), **overrides)


# ------------------------------------------------------------------------------------------------
# terminal output: rich when installed, plain text otherwise
# ------------------------------------------------------------------------------------------------


def _fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        return f"{x:.4g}"
    return str(x)


def print_table(title: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
        print(f"\n{title}")
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)), flush=True)
        return
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: no 80-column wrap
        console = Console(width=max(160, sum(max(len(c), 8) + 3 for c in columns)))
    table = Table(title=title)
    for c in columns:
        table.add_column(c, overflow="fold")
    for row in cells:
        table.add_row(*row)
    console.print(table)


class _Progress:
    """A progress bar over ``total`` steps (rich where installed, one printed line per step otherwise)."""

    def __init__(self, title: str, total: int):
        self.title, self.total, self.done = title, total, 0
        try:
            from rich.console import Console
            from rich.progress import Progress

            if not Console().is_terminal:  # a log file: one line per step reads better than a redrawn bar
                raise ImportError
            self._rich = Progress(transient=False)
            self._rich.start()
            self._task = self._rich.add_task(title, total=total)
        except ImportError:
            self._rich = None

    def advance(self, what: str) -> None:
        self.done += 1
        if self._rich is not None:
            self._rich.update(self._task, advance=1, description=f"{self.title}: {what}")
        else:
            print(f"[{self.title} {self.done}/{self.total}] {what}", flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


def _guard(fn: Callable[[], dict]) -> dict:
    """Run one measurement or training; any exception becomes an ``error`` entry (the run goes on)."""
    try:
        return fn()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a failing mechanism is a result, not a crash
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        return {"error": f"{type(e).__name__}: {msg}", "traceback": traceback.format_exc(limit=3)}


# ------------------------------------------------------------------------------------------------
# 1. speed and memory
# ------------------------------------------------------------------------------------------------


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
    from effattn.bench.linear import BATCH, HEAD_DIM, HEADS, STEP_REPEATS
    from effattn.exact.decode import decode_attention

    q = torch.randn(BATCH, 1, HEADS, HEAD_DIM, device=device)
    kc, vc = (torch.randn(BATCH, T + 1, HEADS, HEAD_DIM, device=device) for _ in range(2))
    with torch.no_grad():
        t = harness.measure_time(lambda: decode_attention(q, kc, vc), repeats=STEP_REPEATS, warmup=2, device=device)
    return {"step_us": 1e6 * t, "state_bytes": 2 * kc.numel() * kc.element_size()}


def _load_sparse_methods() -> dict:
    """The sparse registry, with every method module of :mod:`effattn.sparse` imported (they
    register on import; one that fails to import is skipped here and named in the notes)."""
    import effattn.sparse as sparse

    failed = []
    for mod in pkgutil.iter_modules(sparse.__path__):
        if not mod.name.startswith("_"):
            try:
                importlib.import_module(f"effattn.sparse.{mod.name}")
            except Exception as e:  # noqa: BLE001
                failed.append(f"effattn.sparse.{mod.name}: {type(e).__name__}: {e}")
    _load_sparse_methods.failed = failed
    return dict(sparse.REGISTRY)


def _sparse_forward(method, T: int, cfg: CompareConfig, gemm: float) -> dict:
    from effattn.bench import linear as lin

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
    row = lin._measure(
        lambda: method.attend(q, k, v, causal=causal, **params),
        [q, k, v],
        cfg.repeats,
        cfg.device,
        flops,
        lin.SDPA_BWD_FACTOR,
        gemm,
        cfg.backward,
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
    from effattn.bench import attention as att
    from effattn.bench import linear as lin
    from effattn.linear import REGISTRY as LINEAR

    dev = cfg.device
    suite_args = argparse.Namespace(device=dev, repeats=cfg.repeats, forward_only=not cfg.backward)
    B, H, D = lin.BATCH, lin.HEADS, lin.HEAD_DIM
    mechs: list[SpeedMechanism] = []
    for impl in ("sdpa", "tiled", "auto", "reference"):
        mechs.append(
            SpeedMechanism(
                "exact",
                f"{impl} causal",
                lambda T, impl=impl: _from_attention_suite(
                    att._measure(impl, "causal", T, B, H, D, suite_args, gemm, False)
                ),
                (lambda T: lin._sdpa_decode_row(T, dev))
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
            lambda T: _from_attention_suite(att._measure("tiled", "window", T, B, H, D, suite_args, gemm, False)),
        )
    )
    for pattern, label in (("causal", "causal"), ("window", f"window={att.WINDOW}")):
        mechs.append(
            SpeedMechanism(
                "baseline",
                f"flex {label} (torch.compile)",
                lambda T, p=pattern: _from_attention_suite(
                    att._measure("flex", p, T, B, H, D, suite_args, gemm, cfg.flex)
                ),
            )
        )
    external, external_notes = _external_baselines(cfg, gemm)
    mechs += external
    for name in sorted(LINEAR):
        op = LINEAR[name]
        mechs.append(
            SpeedMechanism(
                "linear",
                name,
                lambda T, op=op: _from_linear_suite(lin._op_row(op, T, cfg.repeats, dev, gemm, cfg.backward)),
                lambda T, op=op: lin._decode_rows(op, [T], dev)[0],
            )
        )
    sparse = _load_sparse_methods()
    for name in sorted(sparse):
        mechs.append(SpeedMechanism("sparse", name, lambda T, m=sparse[name]: _sparse_forward(m, T, cfg, gemm)))
    notes = [f"could not import {f}" for f in getattr(_load_sparse_methods, "failed", [])] + external_notes
    return mechs + list(cfg.extra_mechanisms), notes


def _external_baselines(cfg: CompareConfig, gemm: float) -> tuple[list[SpeedMechanism], list[str]]:
    """``flash_attn`` (FlashAttention-2 causal) and ``fla`` (chunked Gated DeltaNet) as labelled
    baselines, in bfloat16, where the package is installed and the run is on CUDA (both are GPU-only
    Triton/CUDA kernels); otherwise a note says why the row is absent."""
    import importlib.util

    mechs, notes = [], []
    for pkg in ("flash_attn", "fla"):
        if importlib.util.find_spec(pkg) is None:
            notes.append(f"{pkg} is not installed: no {pkg} baseline")
        elif not cfg.device.startswith("cuda"):
            notes.append(f"{pkg} is installed but its kernels need --device cuda: no {pkg} baseline")
        else:
            mechs.append(
                SpeedMechanism("baseline", _EXTERNAL_LABELS[pkg], functools.partial(_external_row, pkg, cfg, gemm))
            )
    return mechs, notes


_EXTERNAL_LABELS = {"flash_attn": "flash_attn causal (bf16)", "fla": "fla chunk_gated_delta_rule (bf16)"}


def _external_row(pkg: str, cfg: CompareConfig, gemm: float, T: int) -> dict:
    from effattn.bench import linear as lin

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
    row = lin._measure(fn, leaves, cfg.repeats, dev, flops, bwd, gemm, cfg.backward)
    return _from_linear_suite(row)


def run_speed(cfg: CompareConfig) -> tuple[list[dict], dict, list[str]]:
    gemm = harness.matmul_flops_per_second(cfg.device, sizes=(512,) if cfg.preset == "tiny" else (2048, 4096))
    mechs, notes = speed_mechanisms(cfg, gemm)
    if cfg.preset != "tiny":  # one small call of every linear op first: no one-time setup in a timing
        from effattn.bench import linear as lin
        from effattn.linear import REGISTRY as LINEAR

        lin._warm_up([LINEAR[n] for n in sorted(LINEAR)], cfg.device)
    rows: list[dict] = []
    bar = _Progress("speed", len(mechs) * len(cfg.lengths))
    for m in mechs:
        for T in cfg.lengths:
            row = {"family": m.family, "mechanism": m.name, "T": T}
            r = _guard(lambda m=m, T=T: m.forward(T))
            if "error" not in r and m.decode is not None:
                d = _guard(lambda m=m, T=T: m.decode(T))
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


# ------------------------------------------------------------------------------------------------
# 2. recall (MQAR) and 3. reasoning (ListOps)
# ------------------------------------------------------------------------------------------------


def _mixer_names(cfg: CompareConfig) -> list[str]:
    if cfg.mixers:
        return list(cfg.mixers)
    from effattn.nn import list_mixers

    return list_mixers()


def _heads_for(dim: int, head_dim: int = 32) -> int:
    return max(1, dim // head_dim)


def run_recall(cfg: CompareConfig, on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """One MQAR training per (mixer, width, head dim); ``on_row(rows so far)`` after each (partial reports)."""
    from effattn.bench.train import train_mqar

    names = _mixer_names(cfg)
    rows = []
    shapes = [(dim, hd) for dim in cfg.mqar_widths for hd in cfg.mqar_head_dims]
    bar = _Progress("recall (MQAR)", len(names) * len(shapes))
    for name in names:
        for dim, hd in shapes:
            heads = _heads_for(dim, hd)
            r = _guard(
                lambda name=name, dim=dim, heads=heads: train_mqar(
                    name,
                    dim,
                    heads=heads,
                    vocab_size=cfg.mqar_vocab,
                    seq_len=cfg.mqar_seq_len,
                    num_kv_pairs=cfg.mqar_kv_pairs,
                    num_train=cfg.mqar_train,
                    num_test=cfg.mqar_test,
                    steps=cfg.mqar_steps,
                    batch_size=cfg.mqar_batch,
                    lr=cfg.mqar_lr,
                    weight_decay=cfg.mqar_weight_decay,
                    random_non_queries=cfg.mqar_random_non_queries,
                    seed=cfg.seed,
                    device=cfg.device,
                )
            )
            by_pairs = r.pop("accuracy_by_pairs", None) or {}
            if len(by_pairs) > 1:
                r.update({f"acc@{p}": a for p, a in by_pairs.items()})
            rows.append({"mixer": name, "dim": dim, "head_dim": dim // heads, **r})
            bar.advance(f"{name} dim={dim} head_dim={dim // heads}: acc {_fmt(r.get('accuracy'))}")
            if on_row is not None:
                on_row(rows)
    bar.close()
    return rows


DEFAULT_LISTOPS_MIXERS = ("attention", "gated_deltanet", "mamba2", "gla")


def run_listops(cfg: CompareConfig) -> list[dict]:
    from effattn.bench.train import train_listops

    if cfg.listops_mixers:
        names = list(cfg.listops_mixers)
    elif cfg.mixers:
        names = list(cfg.mixers)
    else:
        from effattn.nn import list_mixers

        have = set(list_mixers())
        names = [n for n in DEFAULT_LISTOPS_MIXERS if n in have] or sorted(have)[:3]
    rows = []
    bar = _Progress("reasoning (ListOps)", len(names))
    for name in names:
        r = _guard(
            lambda name=name: train_listops(
                name,
                cfg.listops_dim,
                heads=_heads_for(cfg.listops_dim),
                min_len=cfg.listops_min_len,
                max_len=cfg.listops_max_len,
                max_depth=cfg.listops_depth,
                num_train=cfg.listops_train,
                num_test=cfg.listops_test,
                steps=cfg.listops_steps,
                batch_size=cfg.listops_batch,
                lr=cfg.listops_lr,
                seed=cfg.seed,
                device=cfg.device,
            )
        )
        rows.append({"mixer": name, "dim": cfg.listops_dim, **r})
        bar.advance(f"{name}: acc {_fmt(r.get('accuracy'))}")
    bar.close()
    return rows


# ------------------------------------------------------------------------------------------------
# report: tables, advice, plots
# ------------------------------------------------------------------------------------------------

SPEED_COLUMNS = (
    "family",
    "mechanism",
    "T",
    "fwd_ms",
    "fwd_bwd_ms",
    "fwd_MiB",
    "fwd_bwd_MiB",
    "eff_%",
    "step_us",
    "state_bytes",
    "note",
    "error",
)
RECALL_COLUMNS = ("mixer", "dim", "head_dim", "state_bytes", "params", "accuracy", "train_s", "final_loss", "error")


def _pair_counts(cfg: CompareConfig) -> tuple[int, ...]:
    p = cfg.mqar_kv_pairs
    return (p,) if isinstance(p, int) else tuple(p)


def recall_columns(cfg: CompareConfig) -> tuple[str, ...]:
    """The recall table's columns: one accuracy per pair count where the run has several."""
    pairs = _pair_counts(cfg)
    if len(pairs) == 1:
        return RECALL_COLUMNS
    return RECALL_COLUMNS[:5] + tuple(f"acc@{p}" for p in pairs) + ("accuracy",) + RECALL_COLUMNS[6:]


def _shape(r: dict) -> str:
    """``dim=64 head_dim=8`` (reports made before head dims were swept have no ``head_dim``)."""
    return f"dim={r['dim']}" + (f" head_dim={r['head_dim']}" if r.get("head_dim") else "")


def recall_trend(recall: list[dict], pairs: Sequence[int], threshold: float = 0.9) -> list[str]:
    """Per pair count, which mixers reach ``threshold`` accuracy and at which smallest width and
    state: the reading of Zoology's finding off the measurements."""
    lines = []
    mixers = sorted({r["mixer"] for r in recall if r.get("accuracy") is not None})
    for p in pairs:
        key = f"acc@{p}" if len(pairs) > 1 else "accuracy"
        parts = []
        for m in mixers:
            ok = [r for r in recall if r["mixer"] == m and r.get(key) is not None and r[key] >= threshold]
            if ok:
                r = min(ok, key=lambda r: (r["state_bytes"], r["dim"]))
                parts.append(f"{m} from {_shape(r)} ({r['state_bytes']} B)")
            else:
                best = max((r[key] for r in recall if r["mixer"] == m and r.get(key) is not None), default=None)
                parts.append(f"{m} never (best {best:.2f})" if best is not None else f"{m} never")
        lines.append(f"MQAR {p} pairs, accuracy >= {threshold}: " + "; ".join(parts))
    return lines


LISTOPS_COLUMNS = ("mixer", "dim", "params", "accuracy", "majority", "train_s", "final_loss", "error")


def advice(speed: list[dict], recall: list[dict], pairs: Sequence[int] = ()) -> list[str]:
    """Short answers read off the measurements: per length the fastest and the leanest mechanism,
    the smallest state that reached the best recall and, with several MQAR pair counts
    (``pairs``), per pair count which mixers reach 0.9 and from which width."""
    lines = []
    key = "fwd_bwd_ms" if any("fwd_bwd_ms" in r for r in speed) else "fwd_ms"
    for T in sorted({r["T"] for r in speed}):
        ok = [r for r in speed if r["T"] == T and r.get(key) is not None and "error" not in r]
        if not ok:
            continue
        fast = min(ok, key=lambda r: r[key])
        line = f"T={T}: fastest {key.replace('_ms', '')} is {fast['mechanism']} ({fast['family']}, {fast[key]:.3g} ms)"
        mem = [r for r in ok if r.get("fwd_bwd_MiB" if key == "fwd_bwd_ms" else "fwd_MiB") is not None]
        if mem:
            mk = "fwd_bwd_MiB" if key == "fwd_bwd_ms" else "fwd_MiB"
            low = min(r[mk] for r in mem)
            lean = [r["mechanism"] for r in mem if r[mk] <= low + 1e-9]
            more = f" and {len(lean) - 3} more" if len(lean) > 3 else ""
            line += f"; least peak memory: {', '.join(lean[:3])}{more} ({low:.3g} MiB)"
        dec = [r for r in ok if r.get("state_bytes")]
        if dec:
            small = min(dec, key=lambda r: r["state_bytes"])
            line += f"; smallest decode state: {small['mechanism']} ({small['state_bytes']} B)"
        lines.append(line)
    good = [r for r in recall if r.get("accuracy") is not None]
    if good:
        best = max(r["accuracy"] for r in good)
        near = [r for r in good if r["accuracy"] >= best - 0.05 and r.get("state_bytes") is not None]
        if best < 0.5:
            lines.append(f"MQAR: best accuracy {best:.3f}: no mixer learned the task at this budget (train longer)")
        elif near:
            r = min(near, key=lambda r: r["state_bytes"])
            lines.append(
                f"MQAR: best accuracy {best:.3f}; the smallest state within 0.05 of it is {r['mixer']} "
                f"{_shape(r)} ({r['state_bytes']} B, accuracy {r['accuracy']:.3f})"
            )
    if len(pairs) > 1 and good:
        lines += recall_trend(recall, pairs)
    return lines


def _plot_label(machine: dict) -> str:
    hw = machine.get("gpu") or machine.get("cpu_model") or machine.get("processor", "")
    return (
        f"{hw} | torch {machine.get('torch')} | python {machine.get('python')} | {machine.get('torch_threads')} threads"
    )


def write_plots(
    out: Path, speed: list[dict], recall: list[dict], machine: dict, pairs: Sequence[int] = ()
) -> tuple[list[str], list[str]]:
    """PNG plots (matplotlib, Agg); returns (files written, notes)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ["matplotlib is not installed (pip install 'effattn[bench]'): no plots"]
    files = []
    label = _plot_label(machine)

    def series(key):
        by = {}
        for r in speed:
            if r.get(key) is not None and "error" not in r:
                by.setdefault(f"{r['family']}: {r['mechanism']}", []).append((r["T"], r[key]))
        return by

    for fname, key, ylabel in (
        ("time_vs_length.png", "fwd_bwd_ms" if any("fwd_bwd_ms" in r for r in speed) else "fwd_ms", "time (ms)"),
        ("memory_vs_length.png", "fwd_MiB", "forward peak memory (MiB)"),
    ):
        by = series(key)
        if not by:
            continue
        fig, ax = plt.subplots(figsize=(12, 6.5))
        colors = plt.get_cmap("tab20").colors
        for i, (name, pts) in enumerate(sorted(by.items())):
            pts.sort()
            style = "-" if name.startswith("exact") else "--" if name.startswith("linear") else ":"
            ax.plot(
                [p[0] for p in pts],
                [max(p[1], 1e-6) for p in pts],
                style,
                marker="os^Dv"[i // len(colors) % 5],
                color=colors[i % len(colors)],
                label=name,
                linewidth=1.2,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(f"{ylabel} [{key}]")
        ax.set_title(f"effattn compare: {key} vs length\n{label}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)

    pts = [r for r in recall if r.get("accuracy") is not None and r.get("state_bytes")]
    # one panel per pair count where the run has several (Zoology's figure), else one panel
    panels = [(f"acc@{p}", f"{p} key-value pairs") for p in pairs] if len(pairs) > 1 else [("accuracy", "")]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8, 4.6 * len(panels)), 5.5), sharey=True, squeeze=False)
    names = sorted({r["mixer"] for r in pts})
    # points are labelled with what the run varies: the width, the head dim, or both ("64/8")
    vary_dim, vary_hd = len({r["dim"] for r in pts}) > 1, len({r.get("head_dim") for r in pts}) > 1

    def point_label(r: dict) -> str:
        return "/".join([str(r["dim"])] * vary_dim + [str(r.get("head_dim"))] * vary_hd)

    for ax, (key, sub) in zip(axes[0], panels):
        for i, name in enumerate(names):
            rs = sorted(
                (r for r in pts if r["mixer"] == name and r.get(key) is not None), key=lambda r: r["state_bytes"]
            )
            ax.plot(
                [r["state_bytes"] for r in rs],
                [r[key] for r in rs],
                marker="os^Dv<>p"[i % 8],
                label=name,
            )
            if len(panels) > 1 and (vary_dim or vary_hd):
                for r in rs:
                    xy = (r["state_bytes"], r[key])
                    ax.annotate(point_label(r), xy, fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("state size (bytes, batch 1, at the MQAR length)")
        ax.set_ylim(-0.02, 1.02)
        if sub:
            ax.set_title(sub, fontsize=9)
        if len(panels) > 1:
            ax.axhline(0.9, color="gray", linewidth=0.6, linestyle=":")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy at query positions")
    what = " / ".join(["model width"] * vary_dim + ["head dim"] * vary_hd)
    what = f"; points labelled with the {what}" if len(panels) > 1 and what else ""
    fig.suptitle(f"effattn compare: recall vs state size{what}\n{label}", fontsize=9)
    if pts:
        axes[0][-1].legend(fontsize=7)
    else:
        axes[0][0].text(0.5, 0.5, "no successful MQAR run", ha="center", transform=axes[0][0].transAxes)
    fig.tight_layout()
    fig.savefig(out / "recall_vs_state.png", dpi=110)
    plt.close(fig)
    files.append("recall_vs_state.png")
    return files, []


def write_report(cfg: CompareConfig, results: dict) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = results["meta"]["machine"]
    plots, plot_notes = write_plots(out, results["speed"], results["recall"], machine, _pair_counts(cfg))
    results["plots"] = plots
    results["notes"] += plot_notes
    payload = {k: v for k, v in results.items()}
    for sec in ("speed", "recall", "listops"):
        payload[sec] = [{k: v for k, v in r.items() if k != "traceback"} for r in results[sec]]
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    meta = results["meta"]
    md = [
        "# effattn compare: which attention for my length and memory budget?",
        "",
        f"Command: `{meta['command']}`  ",
        f"Preset: {cfg.preset}; sections: {', '.join(cfg.only)}; wall time {meta.get('wall_s', 0):.0f} s  ",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()),
        "",
    ]
    if results["advice"]:
        md += ["## Short answer", ""] + [f"- {a}" for a in results["advice"]] + [""]
    if "speed" in cfg.only:
        md += ["## Speed and memory", "", harness.format_markdown_table(payload["speed"], SPEED_COLUMNS), ""]
        md += [f"![{p[:-4].replace('_', ' ')}]({p})" for p in plots if p != "recall_vs_state.png"] + [""]
    if "recall" in cfg.only:
        pairs = _pair_counts(cfg)
        if len(pairs) == 1:
            task = f"{pairs[0]} key-value pairs"
            acc = f"accuracy on {cfg.mqar_test} held-out examples at the query positions"
        else:
            task = (
                f"trained on an even mixture of {', '.join(map(str, pairs))} key-value pairs "
                f"({cfg.mqar_train} examples)"
            )
            acc = (
                f"acc@n: accuracy at the query positions of {cfg.mqar_test} held-out examples with n pairs; "
                "accuracy: their mean"
            )
        md += [
            "## Recall: MQAR (Zoology)",
            "",
            f"2-layer LM per mixer, width and head dim (heads = width / head_dim, head_dim in "
            f"{', '.join(map(str, cfg.mqar_head_dims))}); T={cfg.mqar_seq_len}, {task}, "
            f"vocab {cfg.mqar_vocab}, random_non_queries={cfg.mqar_random_non_queries}, {cfg.mqar_steps} AdamW "
            f"steps of batch {cfg.mqar_batch} (lr {cfg.mqar_lr:g}, weight decay {cfg.mqar_weight_decay:g}, one "
            f"seed, no learning-rate sweep); {acc}; state_bytes = LM.state_size(1, T).",
            "",
            harness.format_markdown_table(payload["recall"], recall_columns(cfg)),
            "",
            "![recall vs state size](recall_vs_state.png)" if "recall_vs_state.png" in plots else "",
            "",
        ]
    if "listops" in cfg.only:
        md += [
            "## Reasoning: ListOps (LRA)",
            "",
            f"Length {cfg.listops_min_len}-{cfg.listops_max_len}, depth <= {cfg.listops_depth}, "
            f"{cfg.listops_steps} steps of batch {cfg.listops_batch}; accuracy over 10 classes on "
            f"{cfg.listops_test} held-out examples (majority = the most frequent test label's share).",
            "",
            harness.format_markdown_table(payload["listops"], LISTOPS_COLUMNS),
            "",
        ]
    md += ["## Notes", ""] + [f"- {n}" for n in results["notes"]]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out / "report.md"


def run_compare(cfg: CompareConfig) -> dict:
    """Run the selected sections, print the tables, write the report folder; returns the results."""
    unknown = set(cfg.only) - set(SECTIONS)
    if unknown:
        raise ValueError(f"only: unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    results: dict = {
        "meta": {
            "command": harness.command_line(),
            "machine": harness.machine_info(cfg.device),
            "config": {k: v for k, v in asdict(cfg).items() if k != "extra_mechanisms"},
        },
        "speed": [],
        "recall": [],
        "listops": [],
        "notes": [],
    }
    if "speed" in cfg.only:
        rows, extra, notes = run_speed(cfg)
        results["speed"], results["notes"] = rows, results["notes"] + notes
        results["meta"].update(extra)
        print_table("speed and memory", rows, SPEED_COLUMNS)
    if "recall" in cfg.only:

        def partial_report(rows: list[dict]) -> None:
            # a long recall run leaves a readable report after every training, not only at its end
            done = {
                **results,
                "recall": rows,
                "advice": advice(results["speed"], rows, _pair_counts(cfg)),
                "meta": {**results["meta"], "wall_s": time.perf_counter() - t0},
                "notes": results["notes"] + [f"partial report: {len(rows)} of {n_runs} trainings done"],
            }
            write_report(cfg, done)

        n_runs = len(_mixer_names(cfg)) * len(cfg.mqar_widths) * len(cfg.mqar_head_dims)
        results["recall"] = run_recall(cfg, partial_report if n_runs > 1 else None)
        print_table("recall: MQAR accuracy vs state size", results["recall"], recall_columns(cfg))
    if "listops" in cfg.only:
        results["listops"] = run_listops(cfg)
        print_table("reasoning: ListOps", results["listops"], LISTOPS_COLUMNS)
    results["advice"] = advice(results["speed"], results["recall"], _pair_counts(cfg))
    results["meta"]["wall_s"] = time.perf_counter() - t0
    path = write_report(cfg, results)
    for a in results["advice"]:
        print(a)
    print(f"report: {path}", flush=True)
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="quick", help="sizes (default quick: ~10 min on 2 cores)"
    )
    p.add_argument(
        "--full", action="store_true", help="the full preset: long lengths, LRA-length ListOps (hours on CPU)"
    )
    p.add_argument("--only", type=str, default=None, help=f"comma-separated sections of {','.join(SECTIONS)}")
    p.add_argument("--lengths", type=str, default=None, help="comma-separated sequence lengths for the speed section")
    p.add_argument("--mixers", type=str, default=None, help="comma-separated mixer names (default: every registered)")
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--forward-only", action="store_true", help="skip forward+backward timings")
    p.add_argument("--out", type=str, default="bench_out/compare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flex", action="store_true", help="also time compiled FlexAttention (slow to compile on a CPU)")
    p.add_argument("--widths", type=str, default=None, help="recall: comma-separated model widths (e.g. 32,64,128)")
    p.add_argument("--head-dims", type=str, default=None, help="recall: comma-separated head dims (heads = width/hd)")
    p.add_argument(
        "--kv-pairs",
        type=str,
        default=None,
        help="recall: comma-separated MQAR pair counts; several train on their mixture and are tested one by one",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run (default: torch's)")


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    preset = "full" if args.full else args.preset
    over: dict = {"device": args.device, "out": args.out, "seed": args.seed, "backward": not args.forward_only}
    if args.only:
        over["only"] = tuple(s.strip() for s in args.only.split(",") if s.strip())
        bad = set(over["only"]) - set(SECTIONS)
        if bad:
            raise SystemExit(f"--only: unknown sections {sorted(bad)}; choose from {','.join(SECTIONS)}")
    if args.lengths:
        try:
            over["lengths"] = tuple(sorted({int(x) for x in args.lengths.split(",") if x.strip()}))
        except ValueError:
            raise SystemExit(f"--lengths must be comma-separated integers, got {args.lengths!r}") from None
        if not over["lengths"] or over["lengths"][0] < 1:
            raise SystemExit(f"--lengths must be positive integers, got {args.lengths!r}")
    if args.mixers:
        over["mixers"] = tuple(s.strip() for s in args.mixers.split(",") if s.strip())
    if args.repeats is not None:
        over["repeats"] = args.repeats
    if getattr(args, "flex", False):
        over["flex"] = True
    for flag, key in (("widths", "mqar_widths"), ("head_dims", "mqar_head_dims"), ("kv_pairs", "mqar_kv_pairs")):
        text = getattr(args, flag, None)
        if text:
            try:
                vals = tuple(int(x) for x in text.split(",") if x.strip())
            except ValueError:
                raise SystemExit(f"--{flag.replace('_', '-')} must be comma-separated integers, got {text!r}") from None
            if not vals or min(vals) < 1 or len(set(vals)) != len(vals):
                raise SystemExit(f"--{flag.replace('_', '-')} must be distinct positive integers, got {text!r}")
            over[key] = vals
    cfg = make_config(preset, **over)
    if isinstance(cfg.mqar_kv_pairs, tuple) and len(cfg.mqar_kv_pairs) == 1:
        cfg = replace(cfg, mqar_kv_pairs=cfg.mqar_kv_pairs[0])
    return cfg


def main(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    run_compare(config_from_args(args))
