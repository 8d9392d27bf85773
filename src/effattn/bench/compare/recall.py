"""The recall section of ``effattn compare``: MQAR (Zoology, Arora et al. 2023) per mixer, width and head dim.

A 2-layer :class:`effattn.nn.LM` per mixer and shape is trained on generated MQAR data
(:func:`effattn.bench.train.train_mqar`); accuracy at the query positions of a held-out set is
reported against the model's state size (the KV cache for attention, the recurrent state otherwise).
"""

from __future__ import annotations

from collections.abc import Callable

from effattn.bench.compare.config import TOKEN_BY_TOKEN_MIXERS, CompareConfig, guard, heads_for
from effattn.bench.table import Progress, format_value
from effattn.bench.train import train_mqar
from effattn.nn import list_mixers


def mixer_names(cfg: CompareConfig) -> list[str]:
    """The mixers of the recall section: ``cfg.mixers``, or every registered mixer but the slow
    token-by-token memories of :data:`TOKEN_BY_TOKEN_MIXERS` (name them with ``--mixers`` to train them)."""
    if cfg.mixers:
        return list(cfg.mixers)
    return [n for n in list_mixers() if n not in TOKEN_BY_TOKEN_MIXERS]


def run_recall(cfg: CompareConfig, on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """One MQAR training per (mixer, width, head dim); ``on_row(rows so far)`` after each (partial reports)."""
    names = mixer_names(cfg)
    rows = []
    shapes = [(dim, hd) for dim in cfg.mqar_widths for hd in cfg.mqar_head_dims]
    bar = Progress("recall (MQAR)", len(names) * len(shapes))
    for name in names:
        for dim, hd in shapes:
            heads = heads_for(dim, hd)
            r = guard(
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
            bar.advance(f"{name} dim={dim} head_dim={dim // heads}: acc {format_value(r.get('accuracy'))}")
            if on_row is not None:
                on_row(rows)
    bar.close()
    return rows
