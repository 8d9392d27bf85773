"""The sequence-parallel context the ``effattn.nn`` layers consult.

Inside ``with sequence_parallel(group, attention="ring"):`` every rank of ``group`` runs the same
model on its shard of the sequence (``ids [B, T/P]``, laid out by ``layout``), and each layer does
its part with its method:

- softmax attention: ring attention, TokenRing or Ulysses over the shards (``attention=``), RoPE at
  the shard's global positions (:meth:`SequenceParallel.positions`);
- causal sliding-window attention: the halo exchange of ``window - 1`` keys/values
  (:func:`effattn.dist.halo_attention`);
- linear-attention / SSM mixers: LASP-2 (or LASP-1's sequential pass) through
  :meth:`SequenceParallel.linear`;
- everything per token (embeddings, norms, MLPs, the head, the loss) stays local.

The layers read the context with :func:`current_sequence_parallel` (``None`` outside it) and, where
they support it, switch to these calls; a model whose layers do not support it raises. Losses and
gradients then equal the single-process model's: sum the per-rank losses (each the rank's share of
the global mean) and all-reduce the parameter gradients, as data parallelism does.

The paper behind the combination (softmax layers by a ring or all-to-all, linear layers by one
all-gather of states): Sun et al., "LASP-2: Rethinking Sequence Parallelism for Linear Attention and
Its Hybrid", 2025 (LASP-2H).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from effattn.dist.halo import halo_attention
from effattn.dist.lasp import lasp2
from effattn.dist.layout import check_layout, group_rank_and_size, shard_positions
from effattn.dist.ring import ring_attention
from effattn.dist.token_ring import token_ring_attention
from effattn.dist.ulysses import ulysses_attention

__all__ = ["ATTENTION_METHODS", "SequenceParallel", "current_sequence_parallel", "sequence_parallel"]

ATTENTION_METHODS = ("ring", "token_ring", "ulysses")

_CURRENT: contextvars.ContextVar[SequenceParallel | None] = contextvars.ContextVar("effattn_sp", default=None)


@dataclass(frozen=True)
class SequenceParallel:
    """One sequence-parallel configuration: the process ``group``, the softmax ``attention`` method
    (``"ring"``, ``"token_ring"`` or ``"ulysses"``) and the shards' ``layout`` (``"contiguous"`` or
    ``"zigzag"``; sliding-window and linear layers need ``"contiguous"``)."""

    group: object = None
    attention: str = "ring"
    layout: str = "contiguous"

    @property
    def rank(self) -> int:
        return group_rank_and_size(self.group)[0]

    @property
    def world_size(self) -> int:
        return group_rank_and_size(self.group)[1]

    def positions(self, local_len: int, device=None) -> torch.Tensor:
        """Global positions ``int64 [local_len]`` of this rank's tokens (equal shards of ``P * local_len``)."""
        rank, world = group_rank_and_size(self.group)
        return shard_positions(local_len * world, rank, world, self.layout, device)

    def _need_contiguous(self, what: str) -> None:
        if self.layout != "contiguous":
            raise ValueError(
                f"{what} under sequence parallelism needs layout='contiguous' (its state or halo passes from "
                f"one shard to the next), got layout={self.layout!r}"
            )

    def attention_call(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = True,
        window: int | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> torch.Tensor:
        """Softmax attention of this rank's queries over the whole sharded sequence: the halo exchange
        for a causal int ``window``, else the configured method."""
        if window is not None:
            if not causal or not isinstance(window, int):
                raise ValueError(f"sequence-parallel windowed attention is causal with an int window, got "
                                 f"causal={causal}, window={window!r}")
            self._need_contiguous("sliding-window attention")
            return halo_attention(q, k, v, window=window, group=self.group, scale=scale, softcap=softcap,
                                  sinks=sinks, backend=backend)
        if self.attention == "ulysses":
            return ulysses_attention(q, k, v, group=self.group, layout=self.layout, causal=causal, scale=scale,
                                     softcap=softcap, sinks=sinks, backend=backend)
        if softcap is not None or sinks is not None:
            raise ValueError(f"attention={self.attention!r} supports neither softcap nor sinks; use 'ulysses'")
        fn = ring_attention if self.attention == "ring" else token_ring_attention
        return fn(q, k, v, causal=causal, group=self.group, layout=self.layout, scale=scale, backend=backend)

    def linear(self, op: str, *args, **kw):
        """A linear-family op (``effattn.linear`` registry name) on this rank's shard by
        :func:`effattn.dist.lasp2`; returns ``(o, final_state or None)``."""
        self._need_contiguous(f"linear op {op!r}")
        return lasp2(op, *args, group=self.group, **kw)


def current_sequence_parallel() -> SequenceParallel | None:
    """The active :class:`SequenceParallel` (``None`` outside :func:`sequence_parallel`).

    >>> current_sequence_parallel() is None
    True
    """
    return _CURRENT.get()


@contextlib.contextmanager
def sequence_parallel(group=None, attention: str = "ring", layout: str = "contiguous") -> Iterator[SequenceParallel]:
    """Run the ``effattn.nn`` layers inside on sequence shards across ``group`` (see the module
    docstring). ``attention``: ``"ring"``, ``"token_ring"`` or ``"ulysses"`` for softmax layers;
    ``layout``: how the sequence was sharded (:func:`effattn.dist.shard_sequence`).

    Example (on every rank, after ``init_process_group``)::

        ids_shard = effattn.dist.shard_sequence(ids)            # [B, T/P]
        with effattn.dist.sequence_parallel(attention="ring"):
            logits, _ = lm(ids_shard)
        loss = F.cross_entropy(logits.flatten(0, 1), targets_shard.flatten(), reduction="sum") / ids.numel()
        loss.backward()                                          # then all-reduce the gradients
    """
    if attention not in ATTENTION_METHODS:
        raise ValueError(f"attention must be one of {ATTENTION_METHODS}, got {attention!r}")
    check_layout(layout)
    group_rank_and_size(group)  # raises when torch.distributed is not initialized
    token = _CURRENT.set(SequenceParallel(group, attention, layout))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)
