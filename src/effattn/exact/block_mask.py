"""Block-sparse attention structure shared by the exact and sparse families.

A :class:`BlockMask` lists, for every query block (per batch and head, or broadcast over them),
the key blocks it attends to, and marks each listed tile *full* (every pair allowed: no mask is
evaluated) or *partial* (the ``mask_mod`` is evaluated inside the tile). Tiles not listed are
skipped. This is FlexAttention's block mask in list form; the sparse family builds one from its
content-based selections (:meth:`BlockMask.from_kv_indices`), the mask library through
:func:`create_block_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effattn._checks import check_positive_int
from effattn.exact.masks import MaskMod

DEFAULT_BLOCK = 64


def _num_blocks(n: int, block: int) -> int:
    return max(1, -(-n // block))


def _bool_of(keep_mod):
    """The bool mask mod of a float ``keep_mod``."""
    return lambda b, h, q, kv: keep_mod(b, h, q, kv) > 0.5


@dataclass
class BlockMask:
    """Per query block, the key blocks to compute.

    Attributes:
        kv_indices: ``[Bm, Hm, n_q_blocks, max_k]`` int64 key-block indices (ascending within a row;
            entries past ``kv_counts`` are padding); ``Bm`` is 1 or batch, ``Hm`` is 1 or heads_q.
        kv_counts: ``[Bm, Hm, n_q_blocks]`` how many entries of each row are real.
        kv_partial: ``[Bm, Hm, n_q_blocks, max_k]`` True where ``mask_mod`` must be evaluated.
        q_len, kv_len, q_block, kv_block: sequence lengths and tile sizes.
        mask_mod: rule applied inside partial tiles (``None``: listed tiles are fully visible).
        keep_mod: optional float form of the same rule (``1.0`` = attend, ``0.0`` = masked), which the
            tiled engine uses instead of ``mask_mod`` when set: on the CPU, comparisons that produce
            booleans run several times slower than float arithmetic, so rules written as arithmetic
            (the sparse selectors' interval tests) save most of the cost of a partial tile's mask.
    """

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    kv_partial: torch.Tensor
    q_len: int
    kv_len: int
    q_block: int = DEFAULT_BLOCK
    kv_block: int = DEFAULT_BLOCK
    mask_mod: object | None = None
    keep_mod: object | None = None

    @property
    def num_q_blocks(self) -> int:
        return _num_blocks(self.q_len, self.q_block)

    @property
    def num_kv_blocks(self) -> int:
        return _num_blocks(self.kv_len, self.kv_block)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (*self.kv_indices.shape[:2], self.num_q_blocks, self.num_kv_blocks)

    def density(self) -> float:
        """Fraction of tiles computed (1.0 = dense)."""
        Bm, Hm, nq, nk = self.shape
        return self.kv_counts.sum().item() / (Bm * Hm * nq * nk)

    def to_dense(self) -> torch.Tensor:
        """The allowed pairs as a dense bool ``[Bm, Hm, q_len, kv_len]`` (tests and small sizes only)."""
        Bm, Hm, nq, nk = self.shape
        dev = self.kv_indices.device
        zeros = torch.zeros(Bm, Hm, nq, nk, dtype=torch.int32, device=dev)
        valid = torch.arange(self.kv_indices.shape[-1], device=dev) < self.kv_counts[..., None]
        tiles = zeros.scatter_add(-1, self.kv_indices, valid.int()) > 0
        partial = zeros.scatter_add(-1, self.kv_indices, (valid & self.kv_partial).int()) > 0
        dense = tiles.repeat_interleave(self.q_block, 2).repeat_interleave(self.kv_block, 3)
        dense = dense[..., : self.q_len, : self.kv_len]
        if self.mask_mod is not None:
            part = partial.repeat_interleave(self.q_block, 2).repeat_interleave(self.kv_block, 3)
            part = part[..., : self.q_len, : self.kv_len]
            b = torch.arange(Bm, device=dev).view(-1, 1, 1, 1)
            h = torch.arange(Hm, device=dev).view(1, -1, 1, 1)
            qi = torch.arange(self.q_len, device=dev).view(1, 1, -1, 1)
            ki = torch.arange(self.kv_len, device=dev).view(1, 1, 1, -1)
            allowed = self.mask_mod(b, h, qi, ki)
            dense = dense & (~part | allowed)
        return dense

    @classmethod
    def from_kv_indices(
        cls,
        kv_indices: torch.Tensor,
        q_len: int,
        kv_len: int,
        *,
        q_block: int = DEFAULT_BLOCK,
        kv_block: int = DEFAULT_BLOCK,
        kv_counts: torch.Tensor | None = None,
        mask_mod=None,
        kv_partial: torch.Tensor | None = None,
        keep_mod=None,
    ) -> BlockMask:
        """A block mask from explicit per-query-block key-block lists ``[Bm, Hm, n_q_blocks, k]``.

        Rows are sorted; ``kv_counts`` (default: all ``k`` entries real) marks padding. With a
        ``mask_mod``, every listed tile is partial unless ``kv_partial`` says otherwise. A ``keep_mod``
        (float, 1.0 = attend) may be given instead of or with ``mask_mod``; alone, the bool ``mask_mod``
        is derived from it (``keep_mod(...) > 0.5``).
        """
        if keep_mod is not None and mask_mod is None:
            mask_mod = _bool_of(keep_mod)
        if not isinstance(kv_indices, torch.Tensor) or kv_indices.dim() != 4 or kv_indices.dtype.is_floating_point:
            raise ValueError(
                f"kv_indices must be an integer tensor [batch|1, heads|1, n_q_blocks, k], got "
                f"{getattr(kv_indices, 'shape', kv_indices)!r}"
            )
        for name, v in (("q_block", q_block), ("kv_block", kv_block), ("q_len", q_len), ("kv_len", kv_len)):
            check_positive_int(name, v)
        nq, nk = _num_blocks(q_len, q_block), _num_blocks(kv_len, kv_block)
        if kv_indices.shape[2] != nq:
            raise ValueError(
                f"kv_indices has {kv_indices.shape[2]} query blocks but q_len={q_len}, q_block={q_block} needs {nq}"
            )
        k = kv_indices.shape[3]
        if kv_counts is None:
            kv_counts = torch.full(kv_indices.shape[:3], k, dtype=torch.long, device=kv_indices.device)
        if tuple(kv_counts.shape) != tuple(kv_indices.shape[:3]):
            raise ValueError(f"kv_counts must have shape {tuple(kv_indices.shape[:3])}, got {tuple(kv_counts.shape)}")
        if (kv_counts < 0).any() or (kv_counts > k).any():
            raise ValueError(f"kv_counts must lie in [0, {k}]")
        valid = torch.arange(k, device=kv_indices.device) < kv_counts[..., None]
        idx = kv_indices.long()
        if ((idx < 0) | (idx >= nk))[valid].any():
            raise ValueError(f"kv_indices must lie in [0, {nk}) (kv_len={kv_len}, kv_block={kv_block})")
        # sort real entries ascending, padding last
        key = torch.where(valid, idx, torch.full_like(idx, nk))
        key, order = key.sort(dim=-1)
        if ((key[..., 1:] == key[..., :-1]) & (key[..., 1:] < nk)).any():
            raise ValueError("kv_indices lists a key block twice for one query block")
        idx = torch.where(key < nk, key, torch.zeros_like(key))
        if kv_partial is None:
            partial = torch.full_like(idx, mask_mod is not None, dtype=torch.bool)
        else:
            partial = kv_partial.to(torch.bool).expand_as(kv_indices).gather(-1, order)
        return cls(idx, kv_counts.long(), partial, q_len, kv_len, q_block, kv_block, mask_mod, keep_mod)


def _classify_exact(mask_mod, B: int, H: int, q_len: int, kv_len: int, q_block: int, kv_block: int, device):
    """Evaluate ``mask_mod`` one query block at a time (memory ``O(q_block * kv_len)``)."""
    nq, nk = _num_blocks(q_len, q_block), _num_blocks(kv_len, kv_block)
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    kv = torch.arange(kv_len, device=device).view(1, 1, 1, kv_len)
    pad = nk * kv_block - kv_len
    any_rows, all_rows = [], []
    for i in range(nq):
        q = torch.arange(i * q_block, min((i + 1) * q_block, q_len), device=device).view(1, 1, -1, 1)
        m = torch.as_tensor(mask_mod(b, h, q, kv), device=device)
        if m.dtype != torch.bool:
            raise TypeError(f"mask_mod must return a bool tensor, got {m.dtype}")
        m = m.expand(*m.shape[:2], q.shape[2], kv_len) if m.dim() == 4 else m.expand(1, 1, q.shape[2], kv_len)
        any_m = torch.nn.functional.pad(m, (0, pad), value=False).unflatten(-1, (nk, kv_block))
        all_m = torch.nn.functional.pad(m, (0, pad), value=True).unflatten(-1, (nk, kv_block))
        any_rows.append(any_m.any(-1).any(-2))
        all_rows.append(all_m.all(-1).all(-2))
    shape = torch.broadcast_shapes(*(a.shape for a in any_rows))
    return (
        torch.stack([a.expand(shape) for a in any_rows], 2),
        torch.stack([a.expand(shape) for a in all_rows], 2),
    )


def _classify_analytic(mask_mod: MaskMod, q_len, kv_len, q_block, kv_block, device):
    nq, nk = _num_blocks(q_len, q_block), _num_blocks(kv_len, kv_block)
    ql = torch.arange(nq, device=device).view(nq, 1) * q_block
    qh = (ql + q_block).clamp(max=q_len) - 1
    kl = torch.arange(nk, device=device).view(1, nk) * kv_block
    kh = (kl + kv_block).clamp(max=kv_len) - 1
    any_, all_ = mask_mod.blocks(ql, qh, kl, kh)
    any_ = any_.expand(nq, nk)
    return any_.view(1, 1, nq, nk), (all_.expand(nq, nk) & any_).view(1, 1, nq, nk)


def create_block_mask(
    mask_mod,
    B: int,
    H: int,
    q_len: int,
    kv_len: int,
    *,
    q_block: int = DEFAULT_BLOCK,
    kv_block: int = DEFAULT_BLOCK,
    device: torch.device | str = "cpu",
) -> BlockMask:
    """Classify every ``q_block x kv_block`` tile of ``mask_mod`` as empty, full or partial.

    Built-in :class:`MaskMod` rules (causal, window, document, ...) classify tiles from their index
    ranges in ``O((T / block)^2)``; any other function is evaluated one query block at a time
    (``O(T^2)`` work, ``O(block * T)`` memory). ``mask_mod=None`` gives the dense mask.
    """
    if mask_mod is None:
        nq, nk = _num_blocks(q_len, q_block), _num_blocks(kv_len, kv_block)
        any_ = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device)
        all_ = any_
    elif isinstance(mask_mod, MaskMod) and mask_mod.blocks is not None:
        any_, all_ = _classify_analytic(mask_mod, q_len, kv_len, q_block, kv_block, device)
    else:
        any_, all_ = _classify_exact(mask_mod, B, H, q_len, kv_len, q_block, kv_block, device)
    counts = any_.sum(-1)
    max_k = max(1, int(counts.max()))
    # stable sort puts the listed blocks first, in ascending order
    order = torch.sort((~any_).to(torch.int8), dim=-1, stable=True).indices[..., :max_k]
    partial = ~all_.gather(-1, order)
    return BlockMask(order, counts, partial, q_len, kv_len, q_block, kv_block, mask_mod)
