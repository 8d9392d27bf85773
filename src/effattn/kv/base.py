"""The interface every per-layer KV cache offers, so that any of them can be the ``state`` of
:class:`effattn.nn.Attention` (and so of :meth:`effattn.nn.LM.generate`).

A cache holds keys ``[B, length, H_kv, D]`` and values ``[B, length, H_kv, D_v]`` of ``B`` rows.
:meth:`KVCacheBase.append` adds ``T`` new tokens and returns the whole context as dense tensors
(views, or a dequantized copy for a compressed cache). The base keeps the left-padding
bookkeeping shared by all caches: which cached tokens are real (``valid``) and how many real
tokens each row has seen, so that RoPE positions count real tokens only and attention can hide
padded keys.
"""

from __future__ import annotations

import torch


class KVCacheBase:
    """Base of the per-layer caches in :mod:`effattn.kv` (contiguous, quantized, ...).

    Subclasses implement :meth:`append`, :meth:`reset`, :attr:`batch_size` and :attr:`nbytes`, keep
    ``self.length`` (tokens cached per row) and call :meth:`_track_padding` in :meth:`append`
    before they advance ``length``.
    """

    length: int = 0
    key_only: bool = False  # True for a cache of keys only (MLA's latent cache)
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
        """Rows held (``None`` while empty)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of cached keys and values in use."""
        raise NotImplementedError

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
            self._seen = torch.full((batch,), self.length, dtype=torch.long, device=device)
        new_valid = valid if valid is not None else torch.ones(batch, seq, dtype=torch.bool, device=device)
        self._valid = torch.cat([self._valid[:, : self.length], new_valid], dim=1)
        self._seen = self._seen + new_valid.long().sum(1)

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

    def next_positions(self, batch: int, seq: int, valid: torch.Tensor | None, device) -> torch.Tensor:
        """Positions of ``seq`` new tokens (call before :meth:`append`): ``[seq]`` when no padding is
        involved, else ``[batch, seq]`` counting only the real tokens of each row."""
        if valid is None and not self.padded:
            return torch.arange(self.length, self.length + seq, device=device)
        seen = self._seen if self._seen is not None else torch.full((batch,), self.length, device=device)
        if valid is None:
            return seen[:, None] + torch.arange(seq, device=device)
        return (seen[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)
