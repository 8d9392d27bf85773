"""The passkey LM of ``effattn bench kv``: a small attention :class:`effattn.nn.LM` trained on passkey prompts.

2 layers, width 64, 2 heads, partial RoPE on a quarter of each head's channels, no sliding window,
trained on generated passkey prompts (:mod:`effattn.bench.tasks.passkey`) until it retrieves the key with
its full cache: the base ``stages`` on prompts of up to 2k tokens, then the ``extend`` stages on 1k-8k
prompts from the base weights. :func:`load_or_train` keeps the weights of both under a cache folder,
keyed by the training settings (:meth:`PasskeyModelConfig.key`), so a rerun skips training. Training is
deterministic given the seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from effattn.bench.tasks.passkey import DEFAULT_VOCAB_SIZE, IGNORE_INDEX, make_passkey
from effattn.bench.train import build_lm, lr_at

MAX_SEQ_LEN = 8192  # the longest context the kv suite measures (its default lengths end here)


@dataclass(frozen=True)
class PasskeyModelConfig:
    """The passkey LM and how it is trained (the cache key of the saved weights)."""

    dim: int = 64
    heads: int = 2
    layers: int = 2
    rope_fraction: float = 0.25
    vocab_size: int = DEFAULT_VOCAB_SIZE
    num_digits: int = 5
    # (steps, min_len, max_len, tokens per step): short prompts first (many examples per step: the
    # lookup is learned in a few hundred steps), then long ones (the model keeps the key's logit
    # above thousands of filler keys), then mixed lengths until every digit place is read reliably
    stages: tuple = ((300, 32, 128, 2560), (120, 256, 2048, 4096), (200, 64, 1024, 4096))
    lr: float = 3e-3
    weight_decay: float = 0.1
    seed: int = 0
    # length curriculum continued from the model of ``stages`` (its own AdamW, warm-up and decay at
    # ``extend_lr``): the base stages stop at 2k and the base model reads 3 keys in 8 at 8k, where the
    # key's logit must beat 8k filler keys (and RoPE angles it never saw); 1k-8k prompts teach that
    extend: tuple = ((300, 1024, 8192, 8192),)
    extend_lr: float = 1e-3

    def key(self) -> str:
        d = asdict(self)
        if not d["extend"]:  # a base model keeps the key it had before ``extend`` existed
            del d["extend"], d["extend_lr"]
        blob = json.dumps(d, sort_keys=True)
        return f"passkey-lm-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    @property
    def steps(self) -> int:
        return sum(s[0] for s in self.stages) + sum(s[0] for s in self.extend)

    def base(self) -> PasskeyModelConfig:
        """The config of the model ``extend`` continues from (``stages`` only)."""
        return replace(self, extend=())


QUICK_MODEL = PasskeyModelConfig(stages=((5, 32, 128, 512),), extend=())


def _stage_shape(step: int, stages: tuple, seed: int, draw: int | None = None) -> tuple[int, int]:
    """``(length, batch)`` of step ``step`` of ``stages``: the length log-uniform in the stage's
    ``[min_len, max_len]`` (fixed by the step number ``draw``, default ``step``: the ``extend`` stages
    pass the global step so they do not replay the base stages' draws), the batch
    ``tokens_per_step // length``."""
    draw = step if draw is None else draw
    stage, i = 0, step
    while stage < len(stages) - 1 and i >= stages[stage][0]:
        i -= stages[stage][0]
        stage += 1
    _, lo, hi, tokens = stages[stage]
    u = torch.rand(1, generator=torch.Generator().manual_seed(seed * 1_000_003 + draw + 7 * lo)).item()
    T = int(round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))))
    return T, max(1, tokens // T)


def _train_shape(step: int, cfg: PasskeyModelConfig) -> tuple[int, int]:
    """``(length, batch)`` of training step ``step`` of ``cfg.stages`` (see :func:`_stage_shape`)."""
    return _stage_shape(step, cfg.stages, cfg.seed)


def _fit(model, cfg: PasskeyModelConfig, stages: tuple, lr: float, first_step: int, device: str, log) -> float:
    """Train ``model`` through ``stages`` (one AdamW, warm-up and final decay over their steps); step
    ``i`` draws its shape and prompts from the global step number ``first_step + i``. Returns the last loss."""
    steps = sum(s[0] for s in stages)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    model.train()
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for i in range(steps):
        step = first_step + i
        T, bs = _stage_shape(i, stages, cfg.seed, draw=step)
        batch = make_passkey(bs, T, cfg.num_digits, cfg.vocab_size, seed=cfg.seed + 7919 * step)
        for g in opt.param_groups:
            g["lr"] = lr_at(i, steps, lr)
        logits = model(batch.inputs.to(device))[0]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), batch.labels.to(device).reshape(-1), ignore_index=IGNORE_INDEX
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log and (i % 50 == 0 or i == steps - 1):
            log(f"train step {step}/{cfg.steps} T={T} loss={loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return float(loss.detach())


def train_passkey_lm(cfg: PasskeyModelConfig, device: str = "cpu", log=print, base_model=None):
    """Train the passkey LM of ``cfg`` (deterministic given ``cfg.seed``): through ``cfg.stages``, each
    step one batch of ``tokens // T`` prompts at a length ``T`` drawn log-uniformly from the stage's
    ``[min_len, max_len]``, random depths, loss on the answer digits only (teacher forcing), AdamW with
    a warm-up and a final decay over all steps; then, if ``cfg.extend``, through those stages the same
    way with a fresh AdamW at ``cfg.extend_lr``, starting from ``base_model`` (the trained model of
    ``cfg.base()``; trained here when None). Returns ``(model, info)``."""
    t0 = time.perf_counter()
    base_steps = sum(s[0] for s in cfg.stages)
    if base_model is None:
        torch.manual_seed(cfg.seed)
        model = build_lm(
            "attention",
            cfg.dim,
            cfg.heads,
            cfg.vocab_size,
            cfg.layers,
            max_seq_len=MAX_SEQ_LEN,
            rope_fraction=cfg.rope_fraction,
        ).to(device)
        loss = _fit(model, cfg, cfg.stages, cfg.lr, 0, device, log)
    else:
        model = base_model.to(device)
    if cfg.extend:
        torch.manual_seed(cfg.seed + 1)
        loss = _fit(model, cfg, cfg.extend, cfg.extend_lr, base_steps, device, log)
    model.eval()
    return model, {"final_loss": loss, "train_s": time.perf_counter() - t0, "steps": cfg.steps}


def load_or_train(cfg: PasskeyModelConfig, cache_dir: str | os.PathLike | None, device: str = "cpu", log=print):
    """The trained LM of ``cfg`` from ``cache_dir/<cfg.key()>`` if saved there, else trained and saved
    (with ``cfg.extend``: the base model of ``cfg.base()`` loaded or trained and saved first, then
    continued). Returns ``(model, info)``; ``info["cached"]`` says which."""
    from effattn.nn import LM

    path = Path(cache_dir) / cfg.key() if cache_dir is not None else None
    if path is not None and (path / "train.json").exists():
        model = LM.load(path, map_location=device).eval()
        info = json.loads((path / "train.json").read_text())
        return model, {**info, "cached": True, "path": str(path)}
    base_info = None
    if cfg.extend and cache_dir is not None:
        base_model, base_info = load_or_train(cfg.base(), cache_dir, device, log)
        model, info = train_passkey_lm(cfg, device, log, base_model=base_model)
        info["base"] = {k: base_info.get(k) for k in ("train_s", "steps", "final_loss", "path", "cached")}
    else:
        model, info = train_passkey_lm(cfg, device, log)
    if path is not None:
        model.save(path)
        (path / "train.json").write_text(json.dumps({**info, "config": asdict(cfg)}, indent=2))
    return model, {**info, "cached": False, "path": None if path is None else str(path)}
