"""Contiguous per-layer KV cache that grows in place.

Keys and values live in preallocated buffers ``[B, capacity, H_kv, D]``; :meth:`KVCache.append`
writes the new tokens after the used prefix and returns views of the whole prefix. When the
capacity runs out it doubles (amortized O(1) copies per token, as ``std::vector``). The cache also
tracks left padding (:class:`~effattn.kv.base.KVCacheBase`): which cached tokens are real
(``valid``) and how many real tokens each row has seen, so that RoPE positions count only real
tokens and attention can hide padded keys.

Memory: ``nbytes = B * length * H_kv * (D + D_v) * element_size`` (spare capacity excluded; see
``allocated_nbytes``).
"""

from __future__ import annotations

import torch

from effattn._checks import check_int, check_tensor
from effattn.kv.base import AttentionPattern, KVCacheBase, check_index

_MIN_CAPACITY = 16


class KVCache(KVCacheBase):
    """Growing contiguous cache of keys ``[B, T, H_kv, D]`` and (optionally) values.

    ``v`` may be omitted on every append (a key-only cache, as MLA's latent cache). While
    autograd is recording and a new key/value requires grad, appends are out of place (``cat``) so
    gradients through several calls stay correct; under ``torch.no_grad()`` (inference) they write
    into the buffers in place.

    Example::

        >>> c = KVCache()
        >>> k, v = c.append(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))
        >>> k, v = c.append(torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4))
        >>> c.length, tuple(c.k.shape), c.nbytes
        (4, (2, 4, 1, 4), 256)
    """

    supports_key_only = True

    def __init__(self, capacity: int = 0):
        self._initial_capacity = check_int("capacity", capacity, minimum=0)
        self.reset()

    def reset(self) -> None:
        """Forget every token (buffers are released)."""
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._reset_padding()
        self.length = 0
        self.key_only = False

    # ------------------------------------------------------------------ views
    @property
    def k(self) -> torch.Tensor | None:
        """Keys ``[B, length, H_kv, D]`` (a view of the buffer), ``None`` when empty."""
        return None if self._k is None else self._k[:, : self.length]

    @property
    def v(self) -> torch.Tensor | None:
        """Values ``[B, length, H_kv, D_v]``, ``None`` when empty or key-only."""
        return None if self._v is None else self._v[:, : self.length]

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[1]

    @property
    def batch_size(self) -> int | None:
        return None if self._k is None else self._k.shape[0]

    @property
    def kv_heads(self) -> int | None:
        return None if self._k is None else self._k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values in use (``length`` tokens; the spare capacity is not counted)."""
        n = 0
        for buf in (self._k, self._v):
            if buf is not None:
                n += buf[:, : self.length].numel() * buf.element_size()
        return n

    @property
    def allocated_nbytes(self) -> int:
        """Bytes held by the key/value buffers including spare capacity."""
        return sum(b.numel() * b.element_size() for b in (self._k, self._v) if b is not None)

    # ------------------------------------------------------------------ writes
    def _grow(self, buf: torch.Tensor, need: int) -> torch.Tensor:
        cap = max(need, 2 * buf.shape[1], _MIN_CAPACITY)
        new = buf.new_empty((buf.shape[0], cap, *buf.shape[2:]))
        new[:, : self.length] = buf[:, : self.length]
        return new

    def _write(self, buf: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        end = self.length + T
        if buf is None:
            cap = max(end, self._initial_capacity)
            if cap == T or (torch.is_grad_enabled() and x.requires_grad):
                return x  # adopt the first block without a copy; the next append reallocates
            buf = x.new_empty((B, cap, *x.shape[2:]))
        elif torch.is_grad_enabled() and (x.requires_grad or buf.requires_grad):
            return torch.cat([buf[:, : self.length], x], dim=1)
        elif buf.shape[1] < end:
            buf = self._grow(buf, end)
        buf[:, self.length : end] = x
        return buf

    def append(
        self, k: torch.Tensor, v: torch.Tensor | None = None, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append ``k [B, T, H_kv, D]`` and ``v [B, T, H_kv, D_v]`` (or no ``v``: key-only cache);
        ``valid`` bool ``[B, T]`` marks real tokens (False at padding). Returns ``(k, v)`` views of
        the whole cache ``[B, length, ...]``."""
        check_tensor("k", k, 4, "[batch, seq, heads_kv, head_dim]")
        B, T = k.shape[:2]
        if v is not None:
            check_tensor("v", v, 4, "[batch, seq, heads_kv, head_dim_v]")
            if tuple(v.shape[:3]) != tuple(k.shape[:3]):
                raise ValueError(f"v must match k in [batch, seq, heads_kv]: k {tuple(k.shape)}, v {tuple(v.shape)}")
        if self._k is not None:
            if (B, *k.shape[2:]) != (self._k.shape[0], *self._k.shape[2:]):
                raise ValueError(
                    f"k has shape {tuple(k.shape)}, the cache holds [batch, seq, heads_kv, head_dim] = "
                    f"[{self._k.shape[0]}, {self.length}, {self._k.shape[2]}, {self._k.shape[3]}]"
                )
            if (v is None) != self.key_only:
                raise ValueError("this cache is key-only" if self.key_only else "this cache holds values: pass v")
            if k.dtype != self._k.dtype:
                raise TypeError(f"k has dtype {k.dtype}, the cache holds {self._k.dtype}")
        self._track_padding(B, T, valid, k.device)
        self.key_only = v is None
        self._k = self._write(self._k, k)
        self._v = None if v is None else self._write(self._v, v)
        self.length += T
        return self.k, self.v

    # ------------------------------------------------------------------ protocol extras
    def check_pattern(self, pattern: AttentionPattern) -> None:
        """A key-only layer (MLA) needs a key-only cache and a key/value layer one with values."""
        if self.length and pattern.key_only and not self.key_only:
            raise TypeError("state must be an MLA cache (key-only [c_kv | k_pe]); got an Attention KVCache")
        if self.length and self.key_only and not pattern.key_only:
            raise ValueError("state is a key-only cache (an MLA latent cache); this layer caches keys and values")

    def reorder(self, index) -> None:
        """Keep rows ``index`` (long ``[B']``, repeats allowed) in that order (beam search)."""
        index = check_index(index, self.batch_size)
        if self._k is None:
            return
        index = index.to(self._k.device)
        self._k = self._k[:, : self.length].index_select(0, index)
        self._v = None if self._v is None else self._v[:, : self.length].index_select(0, index)
        self._reorder_padding(index)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` slots of every row (padding included), dropping the newest."""
        length = self._check_crop(length)
        if length >= self.length:
            return
        self._crop_padding(length)
        # slices: the next append reallocates instead of writing into a buffer it may not own
        self._k = self._k[:, :length]
        self._v = None if self._v is None else self._v[:, :length]
        self.length = length

    def __repr__(self) -> str:
        shape = None if self._k is None else (self._k.shape[0], self.length, *self._k.shape[2:])
        return f"KVCache(shape={shape}, capacity={self.capacity}, padded={self._valid is not None})"
