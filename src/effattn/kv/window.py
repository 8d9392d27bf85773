"""A KV cache for causal sliding-window attention that keeps only what a later query can still see.

Used by :class:`effattn.nn.Attention` and :class:`effattn.nn.MLA` with a causal ``window``: their
state stops growing with the context (Longformer / Mistral-style rolling cache, with positions kept
absolute for RoPE).
"""

from __future__ import annotations

import torch

from effattn._checks import check_int, check_positive_int
from effattn.kv.base import AttentionPattern
from effattn.kv.contiguous import KVCache


class WindowKVCache(KVCache):
    """A :class:`~effattn.kv.KVCache` for causal sliding-window attention: keeps what a later query
    can still see.

    A query at position ``p`` with ``window=w`` sees the keys ``p - w + 1 .. p``, so once a call is
    done only the last ``keep = w - 1`` real tokens of every row are needed. :meth:`trim` (called by
    :class:`Attention` after each call) drops the older ones once ``keep + slack`` tokens are held;
    the ``slack`` (default ``max(1, keep // 4)``) makes the shift an amortized ``keep / slack`` token
    copies per decoding step. Between calls the cache so holds at most ``keep + slack - 1`` tokens
    per row (more only where padding sits among a row's last ``keep`` slots: a row never loses one of
    its last ``keep`` real tokens). Positions stay absolute: ``dropped`` counts the removed slots, and
    :meth:`next_positions` / :meth:`key_positions` include them.

    Example::

        >>> from effattn.nn import Attention
        >>> layer = Attention(32, 4, window=8)
        >>> x = torch.randn(1, 100, 32)
        >>> y, cache = layer(x)
        >>> type(cache).__name__, cache.length, cache.dropped
        ('WindowKVCache', 7, 93)
        >>> y1, cache = layer(torch.randn(1, 1, 32), cache)   # continues at position 100
    """

    def __init__(self, keep: int, slack: int | None = None):
        self.keep = check_int("keep", keep, minimum=0)
        self.slack = check_positive_int("slack", max(1, keep // 4) if slack is None else slack)
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self.dropped = 0

    @property
    def max_length(self) -> int:
        """The most tokens held per row between calls (without padding): ``keep + slack - 1``."""
        return self.keep + self.slack - 1

    @property
    def first_position(self) -> int:
        return self.dropped

    def check_pattern(self, pattern: AttentionPattern) -> None:
        """The layer must be a causal window (no mods) that needs at most ``keep`` earlier keys."""
        super().check_pattern(pattern)
        keep = pattern.keep
        if keep is None or self.keep < keep:
            need = "a causal window without mask/score mods" if keep is None else f"keep >= {keep}"
            raise ValueError(f"state is a WindowKVCache keeping {self.keep} tokens; this layer needs {need}")

    def crop(self, length: int) -> None:
        """Keep the first ``length`` slots seen (dropped ones included); only while the slots held
        still cover the window of the next query (dropped tokens cannot come back)."""
        length = self._check_crop(length)
        if length >= self.dropped + self.length:
            return
        if self.dropped and (self.padded or length - self.dropped < self.keep):
            raise ValueError(
                f"cannot crop a WindowKVCache to {length} tokens: it dropped the first {self.dropped}, and "
                f"the next query needs the {self.keep} before it{' (with padding: every row)' if self.padded else ''}"
            )
        super().crop(length - self.dropped)

    def key_positions(self) -> torch.Tensor | None:
        if not self.padded:
            return None
        valid = self.valid.long()
        return (self._seen[:, None] - valid.flip(1).cumsum(1).flip(1)).clamp(min=0)

    def trim(self) -> None:
        """Drop the oldest slots once ``keep + slack`` are held, keeping every row's last ``keep`` real tokens."""
        if self.length < self.keep + self.slack:
            return
        cut = self.length - self.keep
        if self.padded:
            valid = self.valid
            later = valid.flip(1).long().cumsum(1).flip(1)  # real tokens at index >= j
            needed = valid & (later <= self.keep)
            first = torch.where(needed.any(1), needed.long().argmax(1), self.length)
            cut = min(cut, int(first.min()))
        if cut <= 0:
            return
        n = self.length - cut
        for name in ("_k", "_v"):
            buf = getattr(self, name)
            if buf is None:
                continue
            kept = buf[:, cut : self.length]
            if torch.is_grad_enabled() and kept.requires_grad:
                setattr(self, name, kept)  # out of place: the graph holds the old buffer anyway
            else:
                new = buf.new_empty((buf.shape[0], n + self.slack, *buf.shape[2:]))
                new[:, :n] = kept
                setattr(self, name, new)
        if self._valid is not None:
            self._valid = self._valid[:, cut : self.length].clone()
        self.dropped += cut
        self.length = n

    def __repr__(self) -> str:
        return f"WindowKVCache(keep={self.keep}, slack={self.slack}, length={self.length}, dropped={self.dropped})"
