"""effattn.train: training memory and the training entry point (``python -m effattn train``).

- :func:`chunked_cross_entropy`: the loss of a linear head without ``[T, vocab]`` logits (Liger /
  Mini-Sequence), exact.
- The memory options of :class:`effattn.nn.LMConfig` (``checkpoint``, ``reversible``,
  ``chunked_mlp``, ``chunked_loss``, ``mesa``); their mechanisms live in
  ``effattn.nn.memory_saving`` and are re-exported here (:class:`Int8SavedActivations`, ...).

- :func:`train` and :class:`TrainConfig`: the loop (DDP / FSDP2 / sequence parallel under torchrun),
  checkpoints that resume bit for bit (:func:`save_checkpoint`, :func:`load_checkpoint`; FSDP2 runs write
  and read the same format through :func:`save_sharded_checkpoint`, :func:`load_sharded_checkpoint`).

Example::

    >>> import torch
    >>> from effattn.train import chunked_cross_entropy
    >>> h, w, t = torch.randn(6, 8), torch.randn(11, 8), torch.arange(6)
    >>> float(chunked_cross_entropy(h, w, t, chunk=4)) > 0
    True
"""

from effattn.nn import CHECKPOINT_MODES, Int8SavedActivations, chunked_apply, reversible_stack
from effattn.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_sharded_checkpoint,
    read_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from effattn.train.loop import LossModel, TrainConfig, evaluate, load_tokens, plot_history, train
from effattn.train.loss import chunked_cross_entropy

__all__ = [
    "CHECKPOINT_MODES",
    "CheckpointError",
    "Int8SavedActivations",
    "LossModel",
    "TrainConfig",
    "chunked_apply",
    "chunked_cross_entropy",
    "evaluate",
    "latest_checkpoint",
    "load_checkpoint",
    "load_sharded_checkpoint",
    "load_tokens",
    "plot_history",
    "read_checkpoint",
    "reversible_stack",
    "save_checkpoint",
    "save_sharded_checkpoint",
    "train",
]
