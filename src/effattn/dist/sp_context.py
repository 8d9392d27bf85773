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
- short causal convolutions (Mamba, Mamba-2, DeltaNet, Gated DeltaNet, MoM, Based): the
  ``kernel - 1`` inputs before the shard from the previous rank(s)
  (:meth:`SequenceParallel.previous_tokens`, the halo exchange), then the convolution locally;
- everything per token (embeddings, norms, MLPs, the head, the loss) stays local.

Activation checkpointing (:func:`checkpoint_contexts`, used by ``LMConfig(checkpoint="block" |
"mixer")``): the recompute of a checkpointed layer runs inside the same sequence-parallel
configuration (the backward usually runs after the ``with`` block has closed), and ring / TokenRing
layers do not run their ring again: the forward keeps each call's ``(o, lse)`` and the recompute
returns it (LightSeq's rematerialization-aware checkpointing: attention is never recomputed, its
output costs ``B T/P H D`` per layer). Ulysses layers recompute their all-to-alls and local attention,
halo and LASP layers their exchange and op (both are linear in the shard length).

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

from effattn.dist._blocks import apply_sinks
from effattn.dist.halo import halo_attention, previous_tokens
from effattn.dist.lasp import lasp2
from effattn.dist.layout import check_layout, group_rank_and_size, shard_positions
from effattn.dist.ring import ring_attention
from effattn.dist.token_ring import token_ring_attention
from effattn.dist.ulysses import ulysses_attention

__all__ = [
    "ATTENTION_METHODS",
    "SequenceParallel",
    "checkpoint_contexts",
    "current_sequence_parallel",
    "sequence_parallel",
]

ATTENTION_METHODS = ("ring", "token_ring", "ulysses")

_CURRENT: contextvars.ContextVar[SequenceParallel | None] = contextvars.ContextVar("effattn_sp", default=None)
# inside a checkpointed region: ("record" | "replay", list of (o, lse) of its ring calls, in call order)
_STASH: contextvars.ContextVar[tuple[str, list] | None] = contextvars.ContextVar("effattn_sp_stash", default=None)


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
                raise ValueError(
                    f"sequence-parallel windowed attention is causal with an int window, got "
                    f"causal={causal}, window={window!r}"
                )
            self._need_contiguous("sliding-window attention")
            return halo_attention(
                q, k, v, window=window, group=self.group, scale=scale, softcap=softcap, sinks=sinks, backend=backend
            )
        if self.attention == "ulysses":
            return ulysses_attention(
                q,
                k,
                v,
                group=self.group,
                layout=self.layout,
                causal=causal,
                scale=scale,
                softcap=softcap,
                sinks=sinks,
                backend=backend,
            )
        fn = ring_attention if self.attention == "ring" else token_ring_attention
        stash = _STASH.get()
        precomputed = None
        if stash is not None and stash[0] == "replay":
            # a second recompute of the region (backward with retain_graph) finds nothing kept: it runs the
            # ring again, on every rank alike
            precomputed = stash[1].pop(0) if stash[1] else None
        o, lse = fn(
            q,
            k,
            v,
            causal=causal,
            group=self.group,
            layout=self.layout,
            scale=scale,
            softcap=softcap,
            backend=backend,
            return_lse=True,
            precomputed=precomputed,
        )
        if stash is not None and stash[0] == "record":
            stash[1].append((o.detach(), lse.detach()))
        if sinks is not None:
            o, _ = apply_sinks(o, lse, sinks)
        return o

    def previous_tokens(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The ``n`` inputs before this rank's shard ``x [B, T/P, C]`` (zeros before the sequence's start),
        for a causal convolution of ``n + 1`` taps: :func:`effattn.dist.previous_tokens`."""
        self._need_contiguous("a causal convolution")
        return previous_tokens(x, n, group=self.group)

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


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``(forward, recompute)`` context managers for one activation-checkpointed region, the
    ``context_fn`` of :func:`torch.utils.checkpoint.checkpoint` (non-reentrant).

    Outside :func:`sequence_parallel` both do nothing. Inside, the forward keeps the ``(o, lse)`` of every
    ring / TokenRing call of the region and the recompute re-enters the same sequence-parallel
    configuration (the backward may run after the ``with`` block closed) and hands each ring call its
    kept result (``precomputed=``), so attention is not run a second time and no K/V travel in the
    recompute. Every rank checkpoints the same regions, so the collectives that are recomputed (halo,
    LASP, Ulysses) still meet.

    >>> fwd, rec = checkpoint_contexts()    # no sequence parallelism here: two no-op contexts
    >>> with fwd, rec:
    ...     pass
    """
    sp = _CURRENT.get()
    if sp is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    kept: list = []
    return _Region(sp, "record", kept), _Region(sp, "replay", kept)


class _Region:
    """Enter ``sp`` with the checkpoint ``mode`` and the region's kept results; re-enterable (a region
    may be recomputed more than once)."""

    def __init__(self, sp: SequenceParallel, mode: str, kept: list):
        self.sp, self.mode, self.kept = sp, mode, kept
        self._tokens: list = []

    def __enter__(self) -> None:
        self._tokens.append((_CURRENT.set(self.sp), _STASH.set((self.mode, self.kept))))

    def __exit__(self, *exc) -> None:
        current, stash = self._tokens.pop()
        _STASH.reset(stash)
        _CURRENT.reset(current)
