"""The reasoning section of ``effattn compare``: ListOps (Long Range Arena, Tay et al. 2021) per mixer.

A 2-layer :class:`effattn.nn.LM` classifies generated ListOps expressions
(:func:`effattn.bench.train.train_listops`) at a CPU-sized length (the LRA length 500-2000 with ``--full``).
"""

from __future__ import annotations

from effattn.bench.compare.config import CompareConfig, guard, heads_for
from effattn.bench.table import Progress, format_value
from effattn.bench.train import train_listops
from effattn.nn import list_mixers

DEFAULT_LISTOPS_MIXERS = ("attention", "gated_deltanet", "mamba2", "gla")


def run_listops(cfg: CompareConfig) -> list[dict]:
    """One ListOps training per mixer (``cfg.listops_mixers``, else ``cfg.mixers``, else a small default set)."""
    if cfg.listops_mixers:
        names = list(cfg.listops_mixers)
    elif cfg.mixers:
        names = list(cfg.mixers)
    else:
        have = set(list_mixers())
        names = [n for n in DEFAULT_LISTOPS_MIXERS if n in have] or sorted(have)[:3]
    rows = []
    bar = Progress("reasoning (ListOps)", len(names))
    for name in names:
        r = guard(
            lambda name=name: train_listops(
                name,
                cfg.listops_dim,
                heads=heads_for(cfg.listops_dim),
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
                mixer_kw=cfg.mixer_options.get(name),
            )
        )
        rows.append({"mixer": name, "dim": cfg.listops_dim, **r})
        bar.advance(f"{name}: acc {format_value(r.get('accuracy'))}")
    bar.close()
    return rows
