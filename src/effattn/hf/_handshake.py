"""The handshake between :class:`~effattn.hf.CompressedCache` and effattn's attention function.

Transformers hands the attention function the tensors ``Cache.update`` returned, never the cache.
A policy cache needs the new queries, which only the attention function sees. So the two meet
through one explicit object:

1. ``CompressedCache.update(k, v, layer_idx)`` records the new keys/values and posts a
   :class:`PendingUpdate` to :data:`HANDSHAKE` (one slot per thread);
2. the attention call whose ``key`` is that very tensor takes it (:meth:`Handshake.take`) and calls
   :meth:`PendingUpdate.resolve` with the queries: the cache runs its policy and answers with
   :class:`CompressedInputs`, what the queries attend to;
3. an update nobody consumed (SDPA/eager attention) is found by the cache at its next access
   (:meth:`Handshake.discard`), which raises instead of letting the new tokens be attended alone.

Everything crossing between :mod:`effattn.hf.cache` and :mod:`effattn.hf.attention` is here, public.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["HANDSHAKE", "CompressedInputs", "Handshake", "PendingUpdate", "WindowInputs"]


@dataclass(frozen=True, eq=False)  # eq would compare tensors elementwise
class CompressedInputs:
    """What the new queries of one layer attend to over a :class:`~effattn.hf.CompressedCache`.

    ``k``/``v [B, T, H_kv, D]``: the kept tokens (left-padded per head) followed by the new ones in
    the last slots (for one new token a StreamingLLM ring gives its slots in ring order: one query
    sees them all); ``key_mask`` bool ``[B, H_kv, T]`` (False at padding; ``None``: none);
    ``positions`` long ``[B, H_kv, T]`` (original position of every slot, -1 at padding) and
    ``query_positions`` long ``[t]``, given only when a user mask/score mod needs them.
    """

    k: torch.Tensor
    v: torch.Tensor
    key_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)  # eq would compare tensors elementwise
class WindowInputs:
    """A sliding-window layer's answer over a :class:`~effattn.hf.CompressedCache`: that layer keeps
    HF's sliding cache (no policy), and ``key``/``value [B, H_kv, T, D]`` (HF's layout) are what the
    layer's ``DynamicSlidingWindowLayer.update`` returned; the attention call goes on with them and the
    model's windowed mask, as it does over a ``DynamicCache``."""

    key: torch.Tensor
    value: torch.Tensor


@dataclass(frozen=True, eq=False)
class PendingUpdate:
    """The keys/values a ``CompressedCache.update`` returned, waiting for the attention call that
    consumes them. ``resolve(q, attention_mask, module, scaling, need_positions)`` runs the policy
    update with the queries ``q [B, t, H_q, D]`` and returns the :class:`CompressedInputs` (a
    sliding-window layer: :class:`WindowInputs`)."""

    layer_idx: int
    key: torch.Tensor
    value: torch.Tensor
    resolve: Callable[..., CompressedInputs | WindowInputs]


class Handshake:
    """One pending update per thread (HF runs a forward pass on one thread)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def post(self, update: PendingUpdate) -> None:
        """Leave ``update`` for the next attention call (replacing an older one)."""
        self._local.item = update

    def take(self, key: torch.Tensor) -> PendingUpdate | None:
        """The pending update whose keys are ``key`` (the same tensor object), removed from the slot;
        ``None`` when the attention call is not over a compressed cache's fresh keys."""
        item = getattr(self._local, "item", None)
        if item is None or item.key is not key:
            return None
        self._local.item = None
        return item

    def discard(self, update: PendingUpdate | None = None) -> None:
        """Empty the slot (only if it holds ``update``, when given)."""
        if update is None or getattr(self._local, "item", None) is update:
            self._local.item = None


HANDSHAKE = Handshake()
