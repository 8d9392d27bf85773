"""The training loop behind ``python -m effattn train``: one readable function, :func:`train`.

One optimizer step: ``grad_accum`` micro-batches of ``batch_size`` windows of ``seq_len + 1`` tokens
(the *global* batch; under data parallelism each rank takes its contiguous share of the rows), loss
= mean next-token cross-entropy (+ the MoE auxiliary losses when the model has MoE layers), AdamW
with linear warm-up and cosine decay, gradient clipping. The windows of step ``s`` come from a
generator seeded by ``(seed, s)``, so a resumed run draws exactly the batches the uninterrupted run
would have drawn.

Runs unchanged under ``torchrun`` (or inside :func:`effattn.dist.spawn`): with a process group,
``parallel="ddp"`` wraps the model in ``DistributedDataParallel``, ``parallel="fsdp"`` shards it with
FSDP2 (``torch.distributed.fsdp.fully_shard``), ``sequence_parallel="ring" | "ulysses" | ...`` runs
every rank on its shard of the sequence inside :func:`effattn.dist.sequence_parallel` and all-reduces
the gradients (the world is then one sequence-parallel group).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from effattn._checks import check_float, check_int
from effattn.data import byte_corpus
from effattn.dist import ATTENTION_METHODS, sequence_parallel, shard_sequence
from effattn.moe import reset_lbl_stats, update_bias
from effattn.nn import LM, LMConfig
from effattn.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_sharded_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from effattn.train.loss import chunked_cross_entropy

__all__ = ["LossModel", "TrainConfig", "load_tokens", "train"]

PARALLEL = ("none", "ddp", "fsdp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Options of :func:`train` (each one a flag of ``python -m effattn train``).

    ``data``: ``"stdlib"`` (:func:`effattn.data.byte_corpus`), a list of text files (bytes are tokens),
    or one ``.bin`` file of token ids (``bin_dtype``; the last ``val_fraction`` is validation).
    ``batch_size`` is the global number of sequences per micro-step. ``stop_after``: end the run
    after that step as a killed run would (no final checkpoint; the schedule still spans ``steps``).
    MoE layers: their global load-balancing counts are reset before each step's first micro-batch, and
    sigmoid routers take the bias step ``b_i += moe_bias_rate * sign(mean load - load_i)`` after each
    optimizer step (DeepSeek-V3's auxiliary-loss-free balancing; 0 turns it off).
    """

    data: str | list[str] = "stdlib"
    bin_dtype: str = "uint16"
    max_bytes: int | None = None
    val_fraction: float = 0.1
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    dtype: str = "float32"
    eval_every: int = 0
    eval_batches: int = 4
    save_every: int = 0
    out_dir: str | None = None
    resume: bool = False
    seed: int = 0
    parallel: str = "none"
    sequence_parallel: str | None = None
    log_every: int = 10
    progress: bool = True
    plot: bool = True
    device: str | None = None
    stop_after: int | None = None
    moe_bias_rate: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "log_every"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup", "eval_every", "save_every", "seed"):
            check_int(name, getattr(self, name), minimum=0)
        check_int("max_bytes", self.max_bytes, minimum=2, allow_none=True)
        check_int("stop_after", self.stop_after, minimum=1, allow_none=True)
        check_float("lr", self.lr, 0.0, math.inf, lo_open=True)
        check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_float("weight_decay", self.weight_decay, 0.0, math.inf)
        check_float("grad_clip", self.grad_clip, 0.0, math.inf)
        check_float("val_fraction", self.val_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        check_float("label_smoothing", self.label_smoothing, 0.0, 1.0)
        check_float("z_loss", self.z_loss, 0.0, math.inf)
        check_float("moe_bias_rate", self.moe_bias_rate, 0.0, math.inf)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.sequence_parallel is not None:
            if self.sequence_parallel not in ATTENTION_METHODS:
                raise ValueError(
                    f"sequence_parallel must be one of {ATTENTION_METHODS} (or None), got {self.sequence_parallel!r}"
                )
            if self.parallel != "none":
                raise ValueError("sequence_parallel uses the whole world as one group: use it with parallel='none'")
        if self.save_every and not self.out_dir:
            raise ValueError("save_every needs out_dir (where the checkpoints go)")
        if self.resume and not self.out_dir:
            raise ValueError("resume needs out_dir (the run to continue)")
        if self.bin_dtype not in ("uint8", "uint16", "int32", "int64"):
            raise ValueError(f"bin_dtype must be uint8, uint16, int32 or int64, got {self.bin_dtype!r}")


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def load_tokens(cfg: TrainConfig, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, validation)`` 1-D token tensors for ``cfg.data`` (see :class:`TrainConfig`).

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); p = os.path.join(d, "a.txt"); _ = open(p, "w").write("hello world " * 20)
    >>> tr, va = load_tokens(TrainConfig(data=[p], seq_len=8), 256)
    >>> tr.numel() + va.numel()
    240
    """
    need = cfg.seq_len + 1
    if cfg.data == "stdlib":
        train = byte_corpus("train", max_bytes=cfg.max_bytes)
        val = byte_corpus("validation", max_bytes=None if cfg.max_bytes is None else max(need, cfg.max_bytes // 10))
    else:
        paths = [cfg.data] if isinstance(cfg.data, str) else list(cfg.data)
        if not paths:
            raise ValueError("data: no file given")
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(
                    f"data: {p!r} is not a file (give 'stdlib', text files or one .bin of token ids)"
                )
        if any(p.endswith(".bin") for p in paths):
            if len(paths) != 1:
                raise ValueError(f"data: give one .bin file of token ids (not mixed with others), got {paths}")
            import numpy as np

            arr = np.fromfile(paths[0], dtype=np.dtype(cfg.bin_dtype))
            tokens = torch.from_numpy(arr.astype(np.int64))
        else:
            raw = b"\n\n".join(Path(p).read_bytes() for p in paths)
            tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
        if cfg.max_bytes is not None:
            tokens = tokens[: cfg.max_bytes]
        n_val = max(need, int(tokens.numel() * cfg.val_fraction))
        train, val = tokens[: tokens.numel() - n_val], tokens[tokens.numel() - n_val :]
    for name, t in (("training", train), ("validation", val)):
        if t.numel() < need:
            raise ValueError(
                f"data: the {name} split has {t.numel()} tokens, fewer than seq_len + 1 = {need}; "
                "give more text or a shorter --seq-len"
            )
    hi = int(max(train.max(), val.max()))
    if int(min(train.min(), val.min())) < 0 or hi >= vocab_size:
        raise ValueError(f"data: token ids must lie in [0, vocab_size={vocab_size}), the data holds ids up to {hi}")
    return train, val


def _windows(data: torch.Tensor, rows: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, data.numel() - seq_len, (rows,), generator=g)
    win = data[start[:, None] + torch.arange(seq_len + 1)].long()
    return win[:, :-1], win[:, 1:]


def _batch_seed(seed: int, step: int, micro: int) -> int:
    return (seed * 1_000_003 + step * 1009 + micro) % (2**63)


# ------------------------------------------------------------------------------------------------
# model wrapper: the loss inside forward, so DDP / FSDP hooks see it
# ------------------------------------------------------------------------------------------------


class LossModel(nn.Module):
    """``forward(ids, targets, denom) -> loss``: summed next-token cross-entropy of ``lm`` divided by
    ``denom`` (plus the MoE auxiliary losses). With ``lm.config.chunked_loss`` the loss is
    :func:`chunked_cross_entropy` on the head's input (no ``[B, T, vocab]`` logits)."""

    def __init__(self, lm: LM, label_smoothing: float = 0.0, z_loss: float = 0.0):
        super().__init__()
        self.lm = lm
        self.label_smoothing, self.z_loss = label_smoothing, z_loss

    def forward(self, ids: torch.Tensor, targets: torch.Tensor, denom: float) -> torch.Tensor:
        h, _ = self.lm.features(ids)
        chunk = self.lm.config.chunked_loss or self.lm.config.streambp  # StreamBP forms the loss per chunk too
        if chunk:
            w = self.lm.head.weight
            loss = chunked_cross_entropy(
                h.to(w.dtype) if not torch.is_autocast_enabled(h.device.type) else h,
                w,
                targets,
                chunk=chunk,
                label_smoothing=self.label_smoothing,
                z_loss=self.z_loss,
                reduction="sum",
            )
        else:
            logits = self.lm.head(h).float().flatten(0, 1)
            loss = F.cross_entropy(logits, targets.flatten(), reduction="sum", label_smoothing=self.label_smoothing)
            if self.z_loss:
                loss = loss + self.z_loss * logits.logsumexp(-1).square().sum()
        loss = loss.float() / denom
        aux = getattr(self.lm, "aux_loss", None)
        if callable(aux):
            loss = loss + aux()
        return loss


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _memory(device: torch.device) -> float:
    """Peak memory in MiB: CUDA allocator peak, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # pragma: no cover
        return float("nan")


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------


def _setup_dist(cfg: TrainConfig) -> tuple[int, int, bool]:
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    if cfg.parallel != "none" or cfg.sequence_parallel:
        raise ValueError(
            f"parallel={cfg.parallel!r} / sequence_parallel={cfg.sequence_parallel!r} need a process group: "
            "run under torchrun (torchrun --nproc-per-node 2 -m effattn train ...)"
        )
    return 0, 1, False


def train(model_config: LMConfig, cfg: TrainConfig, model: LM | None = None) -> dict:
    """Train an :class:`effattn.nn.LM` of ``model_config`` (or the given ``model``) with ``cfg``.

    Returns the history: ``{"step": [...], "loss": [...], "val": [(step, loss), ...], "tokens_per_s",
    "peak_mib", "params", "model"}`` (``model``: the trained LM, unwrapped). Writes checkpoints,
    ``history.json`` and ``loss.png`` in ``cfg.out_dir`` when it is set (rank 0).

    Example::

        >>> from effattn.nn import LMConfig
        >>> h = train(LMConfig(vocab_size=256, dim=16, n_layers=1, heads=2),
        ...           TrainConfig(steps=2, batch_size=2, seq_len=16, max_bytes=4000, progress=False, plot=False))
        >>> len(h["loss"])
        2
    """
    if not isinstance(model_config, LMConfig):
        raise TypeError(f"model_config must be an LMConfig, got {type(model_config).__name__}")
    rank, world, distributed = _setup_dist(cfg)
    if cfg.device is not None:
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
    else:
        device = torch.device("cpu")
    dp = world if cfg.parallel != "none" else 1
    if cfg.batch_size % dp:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the data-parallel world size ({dp})")
    sp = world if cfg.sequence_parallel else 1
    if cfg.seq_len % sp:
        raise ValueError(f"seq_len ({cfg.seq_len}) must be divisible by the sequence-parallel world size ({sp})")
    if distributed and world > 1 and cfg.parallel == "none" and not cfg.sequence_parallel:
        raise ValueError("a process group of several ranks needs parallel='ddp' or 'fsdp', or sequence_parallel")
    train_tokens, val_tokens = load_tokens(cfg, model_config.vocab_size)

    torch.manual_seed(cfg.seed)
    lm = model if model is not None else LM(model_config)
    lm = lm.to(device)
    wrapped = LossModel(lm, cfg.label_smoothing, cfg.z_loss)
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    runner: nn.Module = wrapped
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    elif cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        mc = model_config
        if mc.checkpoint in ("none", "block") and not mc.reversible and not mc.chunked_mlp:
            for block in lm.blocks:  # per-block shards when Block.forward runs (hooks fire)
                fully_shard(block)
        fully_shard(wrapped)
    params = [p for p in runner.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    name_of = {id(p): n for n, p in wrapped.named_parameters()}
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        foreach=False,
    )
    opt_names = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]
    del names

    start = 0
    history: dict = {"step": [], "loss": [], "val": [], "lr": []}
    meta_cfg = {"model_config": model_config.to_dict(), "train_config": _jsonable(cfg)}
    if cfg.resume:
        meta = _load(cfg, wrapped, opt, opt_names, model_config, distributed)
        start = meta["step"]
        history = meta.get("history", history)
        if start >= cfg.steps:
            raise CheckpointError(f"the checkpoint is at step {start}, not before --steps {cfg.steps}: nothing to do")

    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if DTYPES[cfg.dtype] == torch.bfloat16
        else contextlib.nullcontext()
    )
    rows = cfg.batch_size // dp
    row0 = (rank * rows) if dp > 1 else 0
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    progress = _Progress(cfg, start, enabled=cfg.progress and rank == 0)
    t0 = time.perf_counter()
    timed_tokens = 0
    try:
        for step in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, step)
            total = torch.zeros((), device=device)
            reset_lbl_stats(lm)  # MoE global-batch load balancing: a new global batch starts
            for micro in range(cfg.grad_accum):
                x, y = _windows(train_tokens, cfg.batch_size, cfg.seq_len, _batch_seed(cfg.seed, step, micro))
                x, y = x[row0 : row0 + rows].to(device), y[row0 : row0 + rows].to(device)
                sync = contextlib.nullcontext()
                if cfg.parallel == "ddp" and micro < cfg.grad_accum - 1:
                    sync = runner.no_sync()
                with sync:
                    loss = _micro_loss(runner, x, y, cfg, amp) / cfg.grad_accum
                    loss.backward()
                total += loss.detach()
            if cfg.sequence_parallel:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                dist.all_reduce(total)
            elif cfg.parallel != "none":
                dist.all_reduce(total)
                total /= world
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if cfg.moe_bias_rate:  # MoE sigmoid routers: DeepSeek-V3's aux-loss-free bias step (all ranks)
                update_bias(lm, cfg.moe_bias_rate)
            opt.zero_grad(set_to_none=True)
            timed_tokens += tokens_per_step
            history["step"].append(step + 1)
            history["loss"].append(float(total))
            history["lr"].append(_lr(cfg, step))
            val = None
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                val = evaluate(runner, val_tokens, cfg, device, amp, world, rank)
                history["val"].append((step + 1, val))
            elapsed = time.perf_counter() - t0
            progress.update(step + 1, float(total), val, timed_tokens / max(elapsed, 1e-9), _memory(device))
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                _save(cfg, wrapped, opt, opt_names, step + 1, meta_cfg, history, rank, cfg.parallel)
            if cfg.stop_after is not None and step + 1 >= cfg.stop_after:
                break
    finally:
        progress.close()
    elapsed = time.perf_counter() - t0
    history["tokens_per_s"] = timed_tokens / max(elapsed, 1e-9)
    history["peak_mib"] = _memory(device)
    history["params"] = lm.num_parameters() if cfg.parallel != "fsdp" else None
    if cfg.save_every and cfg.out_dir and (cfg.stop_after is None or cfg.stop_after >= cfg.steps):
        _save(cfg, wrapped, opt, opt_names, cfg.steps, meta_cfg, history, rank, cfg.parallel)
    if cfg.out_dir and rank == 0:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "history.json").write_text(json.dumps({k: v for k, v in history.items()}, indent=1))
        if cfg.plot:
            plot_history(history, out / "loss.png", title=",".join(dict.fromkeys(model_config.mixers)))
    history["model"] = lm
    return history


def _micro_loss(runner, x, y, cfg: TrainConfig, amp) -> torch.Tensor:
    if cfg.sequence_parallel:
        denom = y.numel()  # the whole (unsharded) batch: each rank's loss is its share of the global mean
        with sequence_parallel(attention=cfg.sequence_parallel), amp:
            return runner(shard_sequence(x), shard_sequence(y), denom)
    with amp:
        return runner(x, y, y.numel())


@torch.no_grad()
def evaluate(runner, val_tokens, cfg: TrainConfig, device, amp, world: int, rank: int) -> float:
    """Mean validation loss over ``cfg.eval_batches`` fixed batches (the same every call)."""
    dp = world if cfg.parallel != "none" else 1
    rows = cfg.batch_size // dp
    row0 = rank * rows if dp > 1 else 0
    total = torch.zeros((), device=device)
    for i in range(cfg.eval_batches):
        x, y = _windows(val_tokens, cfg.batch_size, cfg.seq_len, _batch_seed(cfg.seed + 7919, 0, i))
        total += _micro_loss(runner, x[row0 : row0 + rows].to(device), y[row0 : row0 + rows].to(device), cfg, amp)
    if cfg.sequence_parallel:
        dist.all_reduce(total)
    elif dp > 1:
        dist.all_reduce(total)
        total /= world
    return float(total) / cfg.eval_batches


def _jsonable(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    return json.loads(json.dumps(d, default=str))


# the train-config fields a resumed run must share with the saved one (others, e.g. steps, may change)
_RESUME_FIELDS = ("data", "seq_len", "batch_size", "grad_accum", "seed", "lr", "warmup", "min_lr_ratio", "dtype")


def _save(cfg, wrapped, opt, opt_names, step, meta_cfg, history, rank, parallel) -> None:
    meta = dict(meta_cfg, history=history)
    if parallel == "fsdp":  # a collective: every rank gathers its shards to rank 0, which writes
        save_sharded_checkpoint(cfg.out_dir, step, wrapped, opt, opt_names, meta)
        return
    if rank == 0:
        save_checkpoint(cfg.out_dir, step, wrapped.state_dict(), opt, opt_names, meta)
    if dist.is_initialized():
        dist.barrier()


def _load(cfg, wrapped, opt, opt_names, model_config, distributed) -> dict:
    now = _jsonable(cfg)

    def same_options(meta: dict) -> None:
        saved = meta.get("train_config", {})
        diff = [k for k in _RESUME_FIELDS if saved.get(k) != now.get(k)]
        if diff:
            raise CheckpointError(
                f"--resume: the run's options differ from the checkpoint's in {diff} "
                f"(saved {[saved.get(k) for k in diff]}, now {[now.get(k) for k in diff]})"
            )

    if cfg.parallel == "fsdp":  # rank 0 verifies and broadcasts; every rank keeps its shards
        return load_sharded_checkpoint(cfg.out_dir, wrapped, opt, opt_names, model_config.to_dict(), check=same_options)
    return load_checkpoint(cfg.out_dir, wrapped, opt, opt_names, model_config.to_dict(), check=same_options)


# ------------------------------------------------------------------------------------------------
# progress and the loss curve
# ------------------------------------------------------------------------------------------------


class _Progress:
    def __init__(self, cfg: TrainConfig, start: int, enabled: bool):
        self.cfg, self.enabled, self.bar = cfg, enabled, None
        if not enabled:
            return
        try:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
        except ImportError:
            return
        self.bar = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
        )
        self.task = self.bar.add_task("train", total=cfg.steps, completed=start, info="")
        self.bar.start()

    def update(self, step, loss, val, tps, mem) -> None:
        if not self.enabled:
            return
        info = f"loss {loss:.4f}" + (f" val {val:.4f} ppl {math.exp(min(val, 50)):.2f}" if val is not None else "")
        info += f" | {tps:,.0f} tok/s | {mem:,.0f} MiB"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif step % self.cfg.log_every == 0 or val is not None or step == self.cfg.steps:
            print(f"step {step}/{self.cfg.steps} {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def plot_history(history: dict, path: str | os.PathLike, title: str = "") -> Path | None:
    """Write the training (and validation) loss curve to ``path`` (PNG); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["step"], history["loss"], label="train loss", lw=1)
    if history.get("val"):
        s, v = zip(*history["val"])
        ax.plot(s, v, "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"effattn train {title}".strip())
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
