"""The recall section of ``effattn compare``: MQAR (Zoology, Arora et al. 2023) per mixer, width and head dim.

A 2-layer :class:`effattn.nn.LM` per mixer and shape is trained on generated MQAR data
(:func:`effattn.bench.train.train_mqar`) at every learning rate of the grid and every seed
(:mod:`effattn.bench.compare.sweep`: Zoology's protocol); accuracy at the query positions of a held-out
set, best over learning rates, median and spread over seeds, is reported against the model's state size
(the KV cache for attention, the recurrent state otherwise).
"""

from __future__ import annotations

from collections.abc import Callable

from effattn.bench.compare.config import TOKEN_BY_TOKEN_MIXERS, CompareConfig, pair_counts
from effattn.bench.compare.sweep import aggregate_runs, execute, sweep_runs, train_kwargs
from effattn.bench.table import Progress, format_value
from effattn.bench.train import train_mqar
from effattn.nn import list_mixers


def mixer_names(cfg: CompareConfig) -> list[str]:
    """The mixers of the recall section: ``cfg.mixers``, or every registered mixer but the slow
    token-by-token memories of :data:`TOKEN_BY_TOKEN_MIXERS` (name them with ``--mixers`` to train them)."""
    if cfg.mixers:
        return list(cfg.mixers)
    return [n for n in list_mixers() if n not in TOKEN_BY_TOKEN_MIXERS]


def run_recall_sweep(
    cfg: CompareConfig,
    on_update: Callable[[list[dict], list[dict]], None] | None = None,
    trainer: Callable[..., dict] = train_mqar,
) -> tuple[list[dict], list[dict]]:
    """Every (mixer, width, head dim) x learning rate x seed; returns ``(cell rows, stored runs)``.

    ``on_update(cell rows, runs so far)`` after each training (partial reports). ``trainer`` takes
    ``(mixer, dim, **train_mqar's keywords)`` and returns ``train_mqar``'s dict (tests pass a fake one; with
    ``cfg.mqar_jobs > 1`` it must be a module-level function)."""
    runs = sweep_runs(cfg, mixer_names(cfg))
    pairs = pair_counts(cfg)
    bar = Progress("recall (MQAR)", len(runs))
    done: list[dict] = []

    def on_done(rec: dict) -> None:
        done.append(rec)
        acc = format_value(rec.get("accuracy")) if "error" not in rec else "error"
        bar.advance(
            f"{rec['mixer']} dim={rec['dim']} head_dim={rec['head_dim']} lr={rec['lr']:g} seed={rec['seed']}: acc {acc}"
        )
        if on_update is not None:
            on_update(aggregate_runs(done, pairs), list(done))

    stored = execute(runs, lambda r: train_kwargs(cfg, r), trainer, cfg.mqar_jobs, on_done)
    bar.close()
    return aggregate_runs(stored, pairs), stored


def run_recall(cfg: CompareConfig, on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """The cell rows of :func:`run_recall_sweep` (one per mixer, width and head dim); ``on_row(rows so far)``
    after each training."""
    rows, _ = run_recall_sweep(cfg, None if on_row is None else lambda rows, runs: on_row(rows))
    return rows
