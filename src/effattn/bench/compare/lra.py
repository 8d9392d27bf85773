"""The LRA section of ``effattn compare`` (``--preset lra``): ListOps and Pathfinder at Long Range Arena's
lengths (Tay et al. 2021, "Long Range Arena: A Benchmark for Efficient Transformers"), per mixer, with
the paper's Transformer accuracies beside ours.

ListOps: :func:`effattn.bench.train.train_listops` at LRA's expression lengths (500-2000 tokens, depth
10, up to 10 arguments; padded to 2000). Pathfinder: the 32 x 32 generator of
:mod:`effattn.bench.tasks.pathfinder` (1024 pixel tokens), read by a causal LM whose class is taken at
the last pixel (:func:`train_pathfinder`). The budget (model size, steps, examples) is the preset's and
far below LRA's (which trains for tens of thousands of steps on accelerators): the accuracies measure
what this budget reaches on a CPU, not the architectures' ceilings, and the report says so.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from effattn.bench.compare.config import CompareConfig, guard, heads_for
from effattn.bench.table import Progress, format_value
from effattn.bench.tasks.pathfinder import NUM_CLASSES as PF_CLASSES
from effattn.bench.tasks.pathfinder import VOCAB_SIZE as PF_VOCAB
from effattn.bench.tasks.pathfinder import make_pathfinder
from effattn.bench.train import build_lm, lr_at, train_listops

__all__ = ["LRA_PAPER_TRANSFORMER", "append_lra_section", "lra_markdown", "run_lra", "train_pathfinder"]

# Tay et al. 2021, Table 1, the vanilla Transformer row (test accuracy, %); Path-X: FAIL (chance)
LRA_PAPER_TRANSFORMER = {
    "ListOps": 36.37,
    "Text": 64.27,
    "Retrieval": 57.46,
    "Image": 42.44,
    "Pathfinder": 71.40,
    "Path-X": None,
    "Avg": 54.39,  # over the five tasks, Path-X left out
}


def train_pathfinder(
    mixer: str,
    dim: int,
    *,
    heads: int = 1,
    layers: int = 2,
    difficulty: str = "hard",
    num_train: int = 1000,
    num_test: int = 200,
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Train a ``layers``-layer LM with mixer ``mixer`` on Pathfinder (32 x 32 = 1024 tokens); the class
    (connected or not) is read at the last pixel from two output rows no input uses (ids 256, 257).
    Returns ``accuracy`` on ``num_test`` held-out images (seed + 10000), ``majority`` (0.5 by
    construction), ``params``, ``final_loss``, ``train_s``, ``steps``.

    Example::

        >>> r = train_pathfinder("attention", 16, difficulty="easy", num_train=8, num_test=4, steps=1, batch_size=4)
        >>> 0.0 <= r["accuracy"] <= 1.0
        True
    """
    torch.manual_seed(seed)
    x_tr, y_tr = make_pathfinder(num_train, difficulty=difficulty, seed=seed)
    x_te, y_te = make_pathfinder(num_test, difficulty=difficulty, seed=seed + 10_000)
    T = x_tr.shape[1]
    model = build_lm(mixer, dim, heads, PF_VOCAB + PF_CLASSES, layers, max_seq_len=T).to(device)

    def class_logits(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        return logits[:, -1, PF_VOCAB : PF_VOCAB + PF_CLASSES].float()

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        idx = torch.randint(0, num_train, (batch_size,), generator=g)
        loss = F.cross_entropy(class_logits(x_tr[idx].to(device)), y_tr[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for a in range(0, num_test, batch_size):
            xb, yb = x_te[a : a + batch_size].to(device), y_te[a : a + batch_size].to(device)
            correct += int((class_logits(xb).argmax(-1) == yb).sum())
    return {
        "accuracy": correct / num_test,
        "majority": float(torch.bincount(y_te, minlength=PF_CLASSES).max()) / num_test,
        "params": sum(p.numel() for p in model.parameters()),
        "final_loss": float(loss.detach()),
        "train_s": train_s,
        "steps": steps,
    }


def run_lra(cfg: CompareConfig) -> list[dict]:
    """ListOps and Pathfinder per mixer of ``cfg.lra_mixers`` (``cfg.mixers`` when given); writes
    ``lra.md`` and ``lra.json`` in ``cfg.out``; returns the rows."""
    names = list(cfg.mixers) if cfg.mixers else list(cfg.lra_mixers)
    heads = heads_for(cfg.lra_dim)
    load0 = os.getloadavg()
    rows: list[dict] = []
    bar = Progress("LRA (ListOps, Pathfinder)", 2 * len(names))
    for name in names:
        r = guard(
            lambda name=name: train_listops(
                name,
                cfg.lra_dim,
                heads=heads,
                min_len=cfg.lra_listops_min_len,
                max_len=cfg.lra_listops_max_len,
                max_depth=10,
                max_args=10,
                num_train=cfg.lra_train,
                num_test=cfg.lra_test,
                steps=cfg.lra_steps,
                batch_size=cfg.lra_batch,
                lr=cfg.lra_lr,
                seed=cfg.seed,
                device=cfg.device,
            )
        )
        rows.append({"task": "ListOps", "mixer": name, "tokens": cfg.lra_listops_max_len, **r})
        bar.advance(f"ListOps {name}: acc {format_value(r.get('accuracy'))}")
        r = guard(
            lambda name=name: train_pathfinder(
                name,
                cfg.lra_dim,
                heads=heads,
                difficulty=cfg.lra_pathfinder_difficulty,
                num_train=cfg.lra_train,
                num_test=cfg.lra_test,
                steps=cfg.lra_steps,
                batch_size=cfg.lra_batch,
                lr=cfg.lra_lr,
                seed=cfg.seed,
                device=cfg.device,
            )
        )
        rows.append({"task": "Pathfinder", "mixer": name, "tokens": 1024, **r})
        bar.advance(f"Pathfinder {name}: acc {format_value(r.get('accuracy'))}")
    bar.close()
    load1 = os.getloadavg()
    for r in rows:
        r["paper_transformer"] = LRA_PAPER_TRANSFORMER[r["task"]] / 100
        r.pop("traceback", None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"loadavg_before": load0, "loadavg_after": load1, "cpus": os.cpu_count()}
    (out / "lra.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    (out / "lra.md").write_text(lra_markdown(cfg, rows, meta))
    return rows


def lra_markdown(cfg: CompareConfig, rows: list[dict], meta: dict) -> str:
    """The LRA section: budget, table (ours beside the paper's Transformer), what it does not show."""
    lines = [
        "## Long Range Arena: ListOps and Pathfinder at LRA's lengths",
        "",
        f"Budget (preset `{cfg.preset}`): {len(rows) // 2 or 0} mixer(s), a 2-layer LM of width {cfg.lra_dim} "
        f"({heads_for(cfg.lra_dim)} heads), {cfg.lra_steps} steps of batch {cfg.lra_batch} (lr {cfg.lra_lr:g}, "
        f"AdamW), {cfg.lra_train} training and {cfg.lra_test} held-out examples per task, one seed ({cfg.seed}). "
        f"ListOps: {cfg.lra_listops_min_len}-{cfg.lra_listops_max_len} tokens (padded to "
        f"{cfg.lra_listops_max_len}), depth 10, up to 10 arguments. Pathfinder: 32 x 32 = 1024 pixel tokens, "
        f"difficulty `{cfg.lra_pathfinder_difficulty}` (effattn's generator, not LRA's images). "
        f"Load average before {meta['loadavg_before'][0]:.1f}, after {meta['loadavg_after'][0]:.1f} on "
        f"{meta['cpus']} CPUs.",
        "",
        "| task | tokens | mixer | accuracy | majority | LRA paper, Transformer | final loss | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = r.get("accuracy")
        lines.append(
            f"| {r['task']} | {r['tokens']} | {r['mixer']} | "
            f"{'error: ' + r['error'] if 'error' in r else f'{acc:.3f}'} | {format_value(r.get('majority'))} | "
            f"{r['paper_transformer']:.4f} | {format_value(r.get('final_loss'))} | {format_value(r.get('train_s'))} |"
        )
    lines += [
        "",
        "The paper's column: Tay et al. 2021, Table 1, vanilla Transformer (ListOps 36.37, Text 64.27, "
        "Retrieval 57.46, Image 42.44, Pathfinder 71.40, Path-X FAIL; average 54.39), trained on accelerators "
        "for far longer and, for Pathfinder, on Linsley et al.'s images. A row at the majority share has not "
        "learned the task in this budget; it says nothing about the mixer's ceiling.",
        "",
    ]
    return "\n".join(lines)


def append_lra_section(report: Path, cfg: CompareConfig) -> None:
    """Append ``lra.md`` (written by :func:`run_lra` into ``cfg.out``) to the run's ``report.md``."""
    section = Path(cfg.out) / "lra.md"
    if section.exists():
        report = Path(report)
        report.write_text(report.read_text().rstrip("\n") + "\n\n" + section.read_text())
