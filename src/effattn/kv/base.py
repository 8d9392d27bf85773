"""The one protocol every per-layer KV cache implements, so that any of them can be the ``state`` of
:class:`effattn.nn.Attention` / :class:`effattn.nn.MLA` (and so of :meth:`effattn.nn.LM.generate`) and
of the Hugging Face integration.

:class:`LayerCache` (contiguous :class:`~effattn.kv.KVCache`, :class:`~effattn.kv.WindowKVCache`,
KIVI :class:`~effattn.kv.QuantizedKVCache`, :class:`~effattn.kv.PagedLayerCache` over a block pool,
and the policy-compressed :class:`~effattn.kv.CompressedLayerCache`) answers, for one layer and a
batch of ``B`` rows:

- ``next_positions(batch, seq, valid, device)``: the positions of ``seq`` new tokens (call before
  ``update``), counting real tokens only;
- ``update(k, v, valid=..., q=...) -> CachedKV``: add the new keys ``[B, T, H_kv, D]`` and values
  and return what the new queries attend to (a policy cache also takes the queries ``q``);
- ``lengths()`` (tokens held per row and kv head), ``nbytes``, ``batch_size``, ``reset()``;
- ``check_pattern(pattern)``: whether a layer computing :class:`AttentionPattern` can attend over
  this cache (a policy cache needs plain causal attention, a window cache a window it covers);
- ``reindexes_positions``: whether RoPE positions are slots inside the cache (StreamingLLM), so a
  layer hands it unrotated keys and rotates what ``update`` returns;
- ``trim()`` (drop what no later query can see; a no-op for most caches), ``reorder(index)`` (beam
  search) and ``crop(length)`` (roll back to ``length`` tokens), each raising a ``TypeError`` or
  ``ValueError`` that says why where a cache cannot.

:class:`KVCacheBase` is the dense caches' base: it keeps the left-padding bookkeeping they share
(which cached tokens are real, ``valid``; how many real tokens each row has seen), so that RoPE
positions count real tokens only and attention can hide padded keys.

Example::

    >>> import torch
    >>> from effattn.kv import KVCache, LayerCache
    >>> cache = KVCache()
    >>> isinstance(cache, LayerCache), cache.next_positions(2, 3).tolist()
    (True, [0, 1, 2])
    >>> kv = cache.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))
    >>> tuple(kv.k.shape), cache.lengths().tolist(), cache.nbytes
    ((2, 3, 1, 4), [[3], [3]], 192)
    >>> cache.reorder(torch.tensor([1, 1])); cache.crop(2); cache.length
    2
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from effattn._checks import check_int
from effattn.exact import window_bounds

__all__ = ["AttentionPattern", "CachedKV", "KVCacheBase", "LayerCache"]


@dataclass(frozen=True)
class AttentionPattern:
    """What a layer computes over its cache, so that a cache can say whether it can be that layer's state.

    ``causal``/``window`` as :func:`effattn.attention`; ``mods``: a mask/score mod over absolute cache
    indices (or per-head gates with their own mask); ``key_only``: the layer caches keys only (MLA's
    latent ``[c_kv | k_pe]`` rows).

    >>> AttentionPattern(window=8).keep, AttentionPattern(window=8, mods=True).keep
    (7, None)
    """

    causal: bool = True
    window: int | tuple[int, int] | None = None
    mods: bool = False
    key_only: bool = False

    @property
    def keep(self) -> int | None:
        """Keys a later query can still see (``window - 1``) where the cache may be bounded: causal,
        windowed, no mods (mods see absolute cache indices, which dropping old keys would shift)."""
        if not self.causal or self.window is None or self.mods:
            return None
        return window_bounds(self.window, True)[0]

    @property
    def plain_causal(self) -> bool:
        """Causal attention over every cached key: no window, no mods."""
        return self.causal and self.window is None and not self.mods


@dataclass(eq=False)  # eq would compare tensors elementwise
class CachedKV:
    """What :meth:`LayerCache.update` returns: the keys and values the new queries attend to.

    ``k [B, L, H_kv, D]``, ``v [B, L, H_kv, D_v]`` (``None`` for a key-only cache); the new tokens
    are the last ``T`` slots of every row, so causal attention aligned bottom-right is right.
    ``valid`` bool ``[B, L]``: False at padded slots (``None``: all real). ``key_positions`` long
    ``[B, L]``: position of each slot counting real tokens (``None``: slot ``j`` is at
    ``offset + j``). ``head_mask`` bool ``[B, H_kv, L]``: False where a kv head holds no token (a
    policy cache keeps a different number per head, left-padded; ``None``: every head is full).
    """

    k: torch.Tensor
    v: torch.Tensor | None
    valid: torch.Tensor | None = None
    key_positions: torch.Tensor | None = None
    offset: int = 0
    head_mask: torch.Tensor | None = None


def check_index(index, batch: int | None) -> torch.Tensor:
    """``index``: long ``[B']`` row indices into a cache of ``batch`` rows (for :meth:`LayerCache.reorder`)."""
    index = torch.as_tensor(index)
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"index must be a 1-D integer tensor of row indices, got {index.dtype} {tuple(index.shape)}")
    if batch is not None and index.numel() and (int(index.min()) < 0 or int(index.max()) >= batch):
        raise ValueError(f"index must lie in [0, {batch}) (the cache holds {batch} rows), got {index.tolist()}")
    return index.long()


class LayerCache(abc.ABC):
    """The protocol of a per-layer KV cache (see the module docstring).

    Subclasses implement :meth:`next_positions`, :meth:`update`, :meth:`lengths`, :meth:`reset`,
    :attr:`batch_size` and :attr:`nbytes`; they override :meth:`check_pattern`, :meth:`trim`,
    :meth:`reorder` and :meth:`crop` where they differ from the defaults (accept every pattern but
    key-only, keep every token, cannot reorder, cannot crop).
    """

    key_only: bool = False  # True while the cache holds keys only (MLA's latent cache)
    # True: the cache holds keys before RoPE, and a layer rotates the keys update() returns by their slot
    # (0 .. L-1) and its new queries by theirs (L-T .. L-1): StreamingLLM's positions inside the cache
    reindexes_positions: bool = False
    supports_key_only: bool = False  # whether it can hold keys without values

    # ------------------------------------------------------------------ to implement
    @abc.abstractmethod
    def next_positions(self, batch: int, seq: int, valid: torch.Tensor | None = None, device=None) -> torch.Tensor:
        """Positions of ``seq`` new tokens (call before :meth:`update`): ``[seq]`` when no padding is
        involved, else ``[batch, seq]`` counting only the real tokens of each row."""

    @abc.abstractmethod
    def update(
        self,
        k: torch.Tensor,
        v: torch.Tensor | None = None,
        *,
        valid: torch.Tensor | None = None,
        q: torch.Tensor | None = None,
    ) -> CachedKV:
        """Add ``k [B, T, H_kv, D]``, ``v [B, T, H_kv, D_v]`` (``valid`` bool ``[B, T]``, False at
        padding; ``q [B, T, H_q, D]`` the new queries, used by policy caches) and return what the
        new queries attend to."""

    @abc.abstractmethod
    def lengths(self) -> torch.Tensor:
        """long ``[B, H_kv]``: real tokens held by each row and kv head (``[0, 0]`` while empty)."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget every token."""

    @property
    @abc.abstractmethod
    def batch_size(self) -> int | None:
        """Rows held (``None`` while empty)."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes of cached keys and values in use."""

    # ------------------------------------------------------------------ defaults
    def check_pattern(self, pattern: AttentionPattern) -> None:
        """Raise ``ValueError``/``TypeError`` saying why a layer computing ``pattern`` cannot attend
        over this cache (the default accepts every pattern, keys-only ones where supported)."""
        if pattern.key_only and not self.supports_key_only:
            raise TypeError(
                f"{type(self).__name__} holds keys and values; this layer caches keys only (an MLA latent "
                "cache): use a KVCache"
            )

    def check_batch(self, batch: int) -> None:
        """Raise ``ValueError`` when the cache holds another number of rows than ``batch``."""
        if self.batch_size is not None and self.batch_size != batch:
            raise ValueError(f"state holds batch {self.batch_size}, x has batch {batch}")

    def trim(self) -> None:  # noqa: B027  (a hook: most caches keep every token)
        """Drop what no later query can see (called by a layer once it attended); keeps everything here."""

    def reorder(self, index) -> None:
        """Keep rows ``index`` (long ``[B']``, repeats allowed: beam search) in that order."""
        raise TypeError(f"{type(self).__name__} cannot reorder its rows")

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens of every row (drop the newest ones: assisted decoding)."""
        raise TypeError(f"{type(self).__name__} cannot be cropped")


class KVCacheBase(LayerCache):
    """Base of the dense per-layer caches in :mod:`effattn.kv` (contiguous, window, quantized).

    Subclasses implement :meth:`append`, :meth:`reset`, :attr:`batch_size`, :attr:`kv_heads` and
    :attr:`nbytes`, keep ``self.length`` (slots cached per row) and call :meth:`_track_padding` in
    :meth:`append` before they advance ``length``. :meth:`update` is :meth:`append` returning a
    :class:`CachedKV` with the padding bookkeeping.
    """

    length: int = 0
    _valid: torch.Tensor | None = None  # bool [B, length]; None while no padding was seen
    _seen: torch.Tensor | None = None  # long [B]: real tokens per row (with padding only)

    # ------------------------------------------------------------------ to implement
    def append(
        self, k: torch.Tensor, v: torch.Tensor | None = None, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append ``k [B, T, H_kv, D]``, ``v [B, T, H_kv, D_v]`` (``valid`` bool ``[B, T]``, False at
        padding); return the whole context ``(k, v)`` as ``[B, length, ...]`` tensors."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget every token."""
        raise NotImplementedError

    @property
    def batch_size(self) -> int | None:
        raise NotImplementedError

    @property
    def kv_heads(self) -> int | None:
        """``H_kv`` held (``None`` while empty)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ the protocol
    @property
    def first_position(self) -> int:
        """Position of slot 0 when no padding was seen (a window cache counts the slots it dropped)."""
        return 0

    def update(
        self,
        k: torch.Tensor,
        v: torch.Tensor | None = None,
        *,
        valid: torch.Tensor | None = None,
        q: torch.Tensor | None = None,
    ) -> CachedKV:
        """:meth:`append` (``q`` is not needed: nothing is evicted) returning a :class:`CachedKV`."""
        k_all, v_all = self.append(k, v, valid)
        return CachedKV(k_all, v_all, self.valid, self.key_positions(), self.first_position)

    def lengths(self) -> torch.Tensor:
        if self.batch_size is None:
            return torch.zeros(0, 0, dtype=torch.long)
        per_row = self.valid.long().sum(1) if self.padded else torch.full((self.batch_size,), self.length)
        return per_row[:, None].expand(-1, self.kv_heads).clone()

    # ------------------------------------------------------------------ padding bookkeeping
    def _reset_padding(self) -> None:
        self._valid = None
        self._seen = None

    def _track_padding(self, batch: int, seq: int, valid: torch.Tensor | None, device) -> None:
        """Record which of ``seq`` new tokens are real (call before ``length`` advances)."""
        if valid is not None:
            if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (batch, seq):
                raise ValueError(f"valid must be a bool tensor [batch, seq] = [{batch}, {seq}], got {valid!r:.80}")
            if bool(valid.all()) and self._valid is None:
                valid = None  # nothing padded: stay on the cheap path
        if valid is None and self._valid is None:
            return
        if self._valid is None:  # first padding seen: every earlier token was real
            self._valid = torch.ones(batch, self.length, dtype=torch.bool, device=device)
            self._seen = torch.full((batch,), self.length + self.first_position, dtype=torch.long, device=device)
        new_valid = valid if valid is not None else torch.ones(batch, seq, dtype=torch.bool, device=device)
        self._valid = torch.cat([self._valid[:, : self.length], new_valid], dim=1)
        self._seen = self._seen + new_valid.long().sum(1)

    def _reorder_padding(self, index: torch.Tensor) -> None:
        if self._valid is not None:
            self._valid = self._valid.index_select(0, index.to(self._valid.device))
            self._seen = self._seen.index_select(0, index.to(self._seen.device))

    def _crop_padding(self, length: int) -> None:
        """Forget the padding bookkeeping of slots ``length ..`` (call before ``length`` shrinks)."""
        if self._valid is not None:
            self._seen = self._seen - self._valid[:, length : self.length].long().sum(1)
            self._valid = self._valid[:, :length].clone()

    def _check_crop(self, length) -> int:
        return check_int("length", length, minimum=0)

    @property
    def valid(self) -> torch.Tensor | None:
        """bool ``[B, length]``: which cached tokens are real; ``None`` means all of them."""
        return None if self._valid is None else self._valid[:, : self.length]

    @property
    def padded(self) -> bool:
        """Whether any padding was seen (then :attr:`valid` is a tensor)."""
        return self._valid is not None

    def key_positions(self) -> torch.Tensor | None:
        """long ``[B, length]``: position of each cached token counting real tokens only
        (``None`` when no padding was seen: then position = index)."""
        if not self.padded:
            return None
        return (self.valid.long().cumsum(1) - 1).clamp(min=0)

    def next_positions(self, batch: int, seq: int, valid: torch.Tensor | None = None, device=None) -> torch.Tensor:
        """Positions of ``seq`` new tokens (call before :meth:`append`): ``[seq]`` when no padding is
        involved, else ``[batch, seq]`` counting only the real tokens of each row."""
        start = self.first_position + self.length
        if valid is None and not self.padded:
            return torch.arange(start, start + seq, device=device)
        seen = self._seen if self._seen is not None else torch.full((batch,), start, device=device)
        if valid is None:
            return seen[:, None] + torch.arange(seq, device=device)
        return (seen[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)
