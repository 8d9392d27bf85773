"""The sizes of one ``effattn compare`` run: :class:`CompareConfig`, the presets and the command-line options."""

from __future__ import annotations

import argparse
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace

SECTIONS = ("speed", "recall", "listops", "lra")
DEFAULT_SECTIONS = ("speed", "recall", "listops")  # lra: its own preset (--preset lra) or --only lra

# the wall time of `make demo` (= the quick preset), stated in the same words in --help and the README
# (tests/bench/test_report_trust.py checks both)
DEMO_WALL_TIME = "about 6 minutes on 2 otherwise idle CPU cores"


@dataclass
class CompareConfig:
    """Sizes of one comparison run (see :data:`PRESETS`)."""

    preset: str = "quick"
    lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    repeats: int = 3
    backward: bool = True
    device: str = "cpu"
    out: str = "bench_out/compare"
    only: tuple[str, ...] = DEFAULT_SECTIONS
    # None: every registered mixer but TOKEN_BY_TOKEN_MIXERS (recall), no mixer rows (speed); named: speed rows too
    mixers: tuple[str, ...] | None = None
    # per-mixer keyword arguments of every recall/ListOps training and speed mixer row (--mixer-options),
    # e.g. {"atlas": {"chunk_size": 16}}
    mixer_options: dict[str, dict] = field(default_factory=dict)
    # MQAR
    mqar_widths: tuple[int, ...] = (64,)
    mqar_head_dims: tuple[int, ...] = (32,)  # heads = width // head_dim; several: one training per head dim
    # (mixer, head dim) pairs: only these cells of the mixers x head dims grid train (None: the whole grid)
    mqar_cells: tuple[tuple[str, int], ...] | None = None
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
    mqar_lrs: tuple[float, ...] | None = None  # a learning-rate grid (Zoology's sweep); None: mqar_lr alone
    mqar_seeds: int = 1  # seeds per (cell, lr): seed, seed + 100, ...; cells report the median and spread
    mqar_early_stop: float | None = 0.99  # stop once training accuracy held >= this (pooled over 20 steps)
    mqar_jobs: int = 2  # worker processes (one thread each) that share the trainings
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
    # LRA (--preset lra): ListOps and Pathfinder at LRA's lengths (effattn.bench.compare.lra)
    lra_mixers: tuple[str, ...] = ("attention",)
    lra_dim: int = 64
    lra_listops_min_len: int = 500
    lra_listops_max_len: int = 2000
    lra_pathfinder_difficulty: str = "hard"
    lra_train: int = 512
    lra_test: int = 128
    lra_steps: int = 60
    lra_batch: int = 8
    lra_lr: float = 1e-3
    seed: int = 0
    flex: bool = False  # compiled FlexAttention rows (about a minute of compilation per shape on a CPU)
    extra_mechanisms: list = field(default_factory=list)  # more SpeedMechanism objects (tests)


# attention and fixed-state mixers whose states span ~4 KB to ~400 KB at widths 32-128:
# GLA < linear attention < DeltaNet < Mamba-2 < Based (attention's KV cache at T=32: 16-64 KB)
RECALL_MIXERS = ("attention", "gla", "linear_attention", "deltanet", "mamba2", "based")
# the recall preset's mixers on a CPU with the sweep (Mamba-2 and Based: name them with --mixers)
RECALL_CPU_MIXERS = ("attention", "gla", "linear_attention", "deltanet")

# learned-memory mixers that update their memory token by token by default (exact decode == forward): an MQAR
# training takes minutes each on a 2-core CPU, so "every registered mixer" leaves them out unless named
TOKEN_BY_TOKEN_MIXERS = ("atlas", "memora", "moneta", "titans_mac", "titans_mag", "titans_mal", "yaad")

# Zoology's learning-rate sweep (np.logspace(-4, -2, 4)): the grid of --full
ZOOLOGY_LRS = (1e-4, 4.6e-4, 2.2e-3, 1e-2)
# the grid of the CPU presets: three values, half a decade apart, centred on 1e-3 (the one rate of the
# single-seed runs before the sweep, which solved most cells within 800 steps); 1e-4 and 1e-2 are left to
# --full because each point costs 9-12 trainings per cell on a shared 2-core CPU
CPU_LRS = (3e-4, 1e-3, 3e-3)

# the MQAR task and training budget of the recall and state presets: 3 learning rates x 3 seeds per cell,
# early stop at 0.99 training accuracy; 600 steps (800 before the sweep: cut so that 9 trainings per cell
# fit about half an hour per preset with two worker processes on the shared 2-core machine)
RECALL_TASK = dict(
    only=("recall",),
    mqar_seq_len=32,
    mqar_kv_pairs=(2, 4, 8),
    mqar_vocab=34,
    mqar_train=24000,
    mqar_test=256,
    mqar_steps=600,
    mqar_batch=32,
    mqar_lr=1e-3,
    mqar_lrs=CPU_LRS,
    mqar_seeds=3,
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
        mqar_jobs=1,
    ),
    # one learning rate and one seed (make demo's time budget); the MQAR runs share two worker processes
    "quick": {},
    # Meant to show Zoology's finding (attention solves MQAR at every width; fixed-state mixers need more
    # state as the pair count grows) at a size one CPU core trains in about half an hour. Sized by
    # scratch calibration runs of a 2-layer attention LM on this CPU (docs/results/compare_recall/
    # calibration): at T=64 (vocabulary 66-128) and at T=32 with vocabulary 64 it stayed at chance
    # (1 / pairs) for as long as it ran (450-2250 steps); at T=32, 2/4/8 pairs, vocabulary 34, width
    # 64 left chance within 300 steps. With 16 distinct keys and head dim 32 every mixer's key space can
    # hold every key, so this preset does not bind the state: see docs/compare.md. With the sweep (9
    # trainings per cell) the CPU preset keeps attention, GLA, linear attention and DeltaNet at widths
    # 16/32/64 (width 128, Mamba-2 and Based cost 2-10x more per training: name them with --mixers/--widths)
    "recall": dict(RECALL_TASK, mixers=RECALL_CPU_MIXERS, mqar_widths=(16, 32, 64)),
    # The same task at width 64 with head dims 4-32: the state of the mixers whose state is heads x
    # head_dim^2 (linear attention, GLA, DeltaNet) spans 16x and binds at small head dims, while attention's
    # KV cache (2 x T x width) stays put. Mamba-2 and Based are left out: their state does not depend on
    # the head dim (d_state, the feature dimension). With the sweep, linear attention is left out too (at
    # chance at every head dim in two single-seed runs; the recall preset keeps it) and head dims 4/8/16
    # remain (at 32 all three solved in both single-seed runs), to fit about half an hour
    "state": dict(
        RECALL_TASK,
        mixers=("attention", "gla", "deltanet"),
        mqar_widths=(64,),
        mqar_head_dims=(4, 8, 16),
    ),
    # The claims of the state preset's single-seed runs, in 4 cells with the same sweep (3 learning rates x 3
    # seeds, 36 trainings) and the step budget of those runs (800): attention at head dim 16 (solves with its
    # 32.8 KB cache), DeltaNet at 6.7 and 12.8 KB (its graded trend: 8 pairs lost at the small state), GLA at
    # 8.2 KB (solves 8 pairs at its largest state). About 20-30 minutes of one quiet core (DeltaNet is most of
    # it); cells in that order, cheapest first, so a stopped run leaves the cheap cells whole
    "state-claims": dict(
        RECALL_TASK,
        mixers=("attention", "deltanet", "gla"),
        mqar_widths=(64,),
        mqar_head_dims=(4, 16, 32),
        mqar_cells=(("attention", 16), ("deltanet", 4), ("deltanet", 16), ("gla", 32)),
        mqar_steps=800,
    ),
    # Long Range Arena at its lengths on a CPU budget: ListOps 500-2000 tokens and Pathfinder 32 x 32 (1024
    # tokens), a 2-layer width-64 LM per mixer (attention: the Transformer the paper reports), 60 steps of
    # batch 8 on 512 examples per task (one step takes 1-10 s on the shared 2-core CPU, so the preset runs
    # in about 20-40 minutes); accuracies near chance at this budget are expected and reported as such
    "lra": dict(only=("lra",)),
    # for a GPU: Zoology's MQAR sizes (widths 64-512, T=512, a mixture of 4-64 pairs, vocabulary 8192, the
    # learning-rate sweep of ZOOLOGY_LRS, 3 seeds); the step budget is ours, not Zoology's epochs
    "full": dict(
        lengths=(1024, 4096, 16384, 65536),
        repeats=3,
        mqar_widths=(64, 128, 256, 512),
        mqar_seq_len=512,
        mqar_kv_pairs=(4, 8, 16, 32, 64),
        mqar_vocab=8192,
        mqar_lr=1e-3,
        mqar_lrs=ZOOLOGY_LRS,
        mqar_seeds=3,
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
    """The sizes of preset ``preset`` (:data:`PRESETS`) with ``overrides`` (``CompareConfig`` fields).

    Example::

        >>> cfg = make_config("tiny", lengths=(64,))
        >>> cfg.lengths, cfg.repeats, cfg.only
        ((64,), 1, ('speed', 'recall', 'listops'))
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return replace(CompareConfig(preset=preset, **PRESETS[preset]), **overrides)


def pair_counts(cfg: CompareConfig) -> tuple[int, ...]:
    """The MQAR pair counts of a run as a tuple (one count or several, trained on their mixture)."""
    p = cfg.mqar_kv_pairs
    return (p,) if isinstance(p, int) else tuple(p)


def heads_for(dim: int, head_dim: int = 32) -> int:
    """Heads of a model of width ``dim`` at ``head_dim`` per head (at least one)."""
    return max(1, dim // head_dim)


def guard(fn: Callable[[], dict]) -> dict:
    """Run one measurement or training; any exception becomes an ``error`` entry with its ``traceback``
    (the run goes on: a failing mechanism is a result, not a crash)."""
    try:
        return fn()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a failing mechanism is a result, not a crash
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        return {"error": f"{type(e).__name__}: {msg}", "traceback": traceback.format_exc(limit=3)}


def _preset_values(key: str) -> str:
    """``quick 512,2048; tiny 64,128; ...``: a config field's value in each preset that sets it."""
    parts = []
    for name in ("quick", "tiny", "recall", "state", "state-claims", "full"):
        value = PRESETS[name].get(key, getattr(CompareConfig, key) if name == "quick" else None)
        if value is not None:
            shown = (
                ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
                if isinstance(value, tuple)
                else str(value)
            )
            parts.append(f"{name} {shown}")
    return "; ".join(parts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``effattn compare`` (a preset sets the sizes; each option overrides one of them)."""
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="quick",
        help=f"sizes of the run: tiny (seconds), quick ({DEMO_WALL_TIME}; MQAR at one learning rate and seed), "
        "recall and state (the recall section alone: 3 learning rates x 3 seeds per cell, several CPU-hours each), "
        "state-claims (4 cells of the state preset that carried its claims, same sweep: 36 trainings), "
        "lra (ListOps and Pathfinder at LRA's lengths on a CPU budget, 20-40 minutes), "
        "full (for a GPU: Zoology's MQAR sizes and learning-rate grid; hours) (default: %(default)s)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="same as --preset full, for a GPU: T up to 64k, LRA-length ListOps, MQAR at Zoology's sizes (widths "
        "64-512, T=512, 4-64 pairs, vocabulary 8192, learning rates 1e-4..1e-2, 3 seeds)",
    )
    p.add_argument(
        "--only",
        type=str,
        default=None,
        metavar="A,B",
        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all three; "
        "presets recall and state: recall)",
    )
    p.add_argument(
        "--lengths",
        type=str,
        default=None,
        metavar="T1,T2,...",
        help=f"comma-separated sequence lengths of the speed section (default: the preset's: "
        f"{_preset_values('lengths')})",
    )
    p.add_argument(
        "--mixers",
        type=str,
        default=None,
        metavar="A,B,...",
        help="comma-separated mixers to train for recall (and ListOps); the speed section also times each as one "
        "layer alone (family mixer: width 64, 2 heads) (default: every registered mixer but the "
        "token-by-token learned memories for recall, no mixer rows in speed; "
        "presets recall and state: their own set)",
    )
    p.add_argument(
        "--mixer-options",
        type=str,
        default=None,
        metavar="MIXER:KEY=VALUE,...",
        help="recall, ListOps and the speed section's mixer rows: keyword arguments for named mixers, e.g. "
        "'titans_mag:chunk_size=16,atlas:chunk_size=16;depth=1' (';' separates one mixer's options; values are "
        "Python literals) (default: none, the mixers' defaults)",
    )
    p.add_argument(
        "--device",
        type=str,
        default="cpu",
        help="torch device to run on, e.g. cpu, cuda, cuda:1 (default: %(default)s)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="N",
        help="timed runs per speed measurement after a warm-up; the median is reported (default: the preset's: "
        f"{_preset_values('repeats')})",
    )
    p.add_argument("--forward-only", action="store_true", help="skip the forward+backward timings")
    p.add_argument(
        "--out",
        type=str,
        default=None,
        metavar="DIR",
        help=f"report folder: report.md, results.json and PNG plots are written there (default: {CompareConfig.out}; "
        "with --rerender: the folder of RESULTS_JSON)",
    )
    p.add_argument(
        "--rerender",
        type=str,
        default=None,
        metavar="RESULTS_JSON",
        help="train nothing: write the report of a stored run (its results.json) again, the recall cells and "
        "verdicts recomputed from its stored runs by this version's rules; the other options are ignored "
        "(default: none, run the benchmark)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every training and input (default: %(default)s)")
    p.add_argument("--flex", action="store_true", help="also time compiled FlexAttention (slow to compile on a CPU)")
    p.add_argument(
        "--widths",
        type=str,
        default=None,
        metavar="D1,D2,...",
        help=f"recall: comma-separated model widths (default: the preset's: {_preset_values('mqar_widths')})",
    )
    p.add_argument(
        "--head-dims",
        type=str,
        default=None,
        metavar="D1,D2,...",
        help="recall: comma-separated head dims, heads = width / head dim (default: the preset's: "
        f"{_preset_values('mqar_head_dims')})",
    )
    p.add_argument(
        "--kv-pairs",
        type=str,
        default=None,
        metavar="N1,N2,...",
        help="recall: comma-separated MQAR pair counts; several train on their mixture and are tested one by one "
        f"(default: the preset's: {_preset_values('mqar_kv_pairs')})",
    )
    p.add_argument(
        "--lrs",
        type=str,
        default=None,
        metavar="LR1,LR2,...",
        help="recall: comma-separated learning rates; every cell trains at each and keeps the best (Zoology's sweep) "
        f"(default: the preset's: {_preset_values('mqar_lrs')}; others: lr {CompareConfig.mqar_lr:g} alone)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="recall: seeds per cell and learning rate (--seed, --seed + 100, ...); the report gives the median "
        f"and min-max over seeds (default: the preset's: {_preset_values('mqar_seeds')})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help=f"recall: the step budget of every MQAR training (default: the preset's: {_preset_values('mqar_steps')})",
    )
    p.add_argument(
        "--early-stop",
        type=float,
        default=None,
        metavar="ACC",
        help="recall: stop a training once its training accuracy held >= ACC over 20 steps; 0 turns it off "
        f"(default: {CompareConfig.mqar_early_stop})",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="recall: worker processes (one thread each) that share the trainings; 1 trains in this process "
        f"(default: {CompareConfig.mqar_jobs}; preset tiny: 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch.set_num_threads for the run (default: torch's own choice)",
    )


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    """The :class:`CompareConfig` of parsed options: the preset's sizes with the options given (bad values exit)."""
    preset = "full" if args.full else args.preset
    over: dict = {
        "device": args.device,
        "out": args.out or CompareConfig.out,
        "seed": args.seed,
        "backward": not args.forward_only,
    }
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
    if getattr(args, "mixer_options", None):
        from effattn.bench.compare.options import check_mixer_options, parse_mixer_options

        try:
            over["mixer_options"] = parse_mixer_options(args.mixer_options)
            check_mixer_options(over["mixer_options"])
        except ValueError as e:
            raise SystemExit(f"--{e}".replace("--mixer_options:", "--mixer-options:")) from None
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
    if args.lrs:
        try:
            lrs = tuple(float(x) for x in args.lrs.split(",") if x.strip())
        except ValueError:
            raise SystemExit(f"--lrs must be comma-separated numbers, got {args.lrs!r}") from None
        if not lrs or min(lrs) <= 0 or len(set(lrs)) != len(lrs) or not all(math.isfinite(x) for x in lrs):
            raise SystemExit(f"--lrs must be distinct positive numbers, got {args.lrs!r}")
        over["mqar_lrs"] = lrs
    for flag, key in (("seeds", "mqar_seeds"), ("jobs", "mqar_jobs"), ("steps", "mqar_steps")):
        value = getattr(args, flag, None)
        if value is not None:
            if value < 1:
                raise SystemExit(f"--{flag} must be a positive integer, got {value}")
            over[key] = value
    stop = getattr(args, "early_stop", None)
    if stop is not None:
        if not 0.0 <= stop <= 1.0:
            raise SystemExit(f"--early-stop must be in [0, 1] (0: off), got {stop}")
        over["mqar_early_stop"] = stop or None
    cfg = make_config(preset, **over)
    if isinstance(cfg.mqar_kv_pairs, tuple) and len(cfg.mqar_kv_pairs) == 1:
        cfg = replace(cfg, mqar_kv_pairs=cfg.mqar_kv_pairs[0])
    return cfg
