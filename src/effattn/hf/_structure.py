"""Reading the structure of an HF mask function, and effattn block masks built from it.

Transformers composes every mask pattern from a handful of factories in ``masking_utils``
(``causal_mask_function``, ``sliding_window_overlay``, ``chunked_overlay``,
``packed_sequence_mask_function``, ``remap_positions_for_packed_sequence``, ``and_masks``, ...),
each a closure over a few numbers or ``[B, T]`` tensors. :func:`parse_mask_function` walks that
tree (by the factories' code objects and closure cells) into a :class:`Pattern`: causal or not,
window bounds, chunk size with its per-row left padding, packed sequence ids and position ids.
A function it does not know (an image-token overlay, a user's ``or_mask_function``) gives
``None``: the caller then materializes HF's dense mask.

:func:`structured_block_mask` turns the resulting :class:`~effattn.hf.HFMask` into an effattn
:class:`~effattn.exact.BlockMask` by interval reasoning per ``64 x 64`` tile (``O(B (T/64)^2)``
memory, never a ``T_q x T_k`` tensor); the elementwise rule runs only inside partial tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import masking_utils as mu

from effattn.exact import BlockMask

__all__ = ["Pattern", "parse_mask_function", "segment_ids", "structured_block_mask", "structured_mask_mod"]

_T = torch.zeros(1, 1, dtype=torch.long)


def _code_of(fn) -> object:
    return getattr(fn, "__code__", None)


# the code objects of the closures HF's factories return (same code for every closure of one factory)
_AND = _code_of(mu.and_masks(mu.causal_mask_function))
_OR = _code_of(mu.or_masks(mu.causal_mask_function))
_SLIDING = _code_of(mu.sliding_window_overlay(1))
_SLIDING_BI = _code_of(mu.sliding_window_bidirectional_overlay(1))
_CHUNK = _code_of(mu.chunked_overlay(1, _T))
_PACKED = _code_of(mu.packed_sequence_mask_function(_T))
_REMAP = _code_of(mu.remap_positions_for_packed_sequence(mu.causal_mask_function, _T))
_PADDING = _code_of(mu.padding_mask_function(_T))


def _cells(fn) -> dict:
    names = fn.__code__.co_freevars
    return {n: c.cell_contents for n, c in zip(names, fn.__closure__ or ())}


@dataclass
class Pattern:
    """An AND of structured terms, in HF's index space (query/key absolute positions).

    ``left``/``right``: ``q - kv <= left`` and ``kv - q <= right`` (None: unbounded); ``causal``:
    ``kv <= q``; ``chunk``: ``(size, left_padding [B])``, same chunk required; ``packed``:
    ``[B, T]`` sequence ids, same id required; ``positions``: ``[B, T]`` position ids the
    causal/window/chunk terms read instead of the index (packed sequences); ``padding``: extra
    ``[B, T]`` key validity.
    """

    causal: bool = False
    left: int | None = None
    right: int | None = None
    chunk: tuple[int, torch.Tensor] | None = None
    packed: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    padding: torch.Tensor | None = None

    def bound(self, left: int | None = None, right: int | None = None) -> None:
        if left is not None:
            self.left = left if self.left is None else min(self.left, left)
        if right is not None:
            self.right = right if self.right is None else min(self.right, right)


def parse_mask_function(fn: Callable | None) -> Pattern | None:
    """The :class:`Pattern` of an HF mask function, or ``None`` if some part has no known structure.

    Example::

        >>> from transformers.masking_utils import sliding_window_causal_mask_function
        >>> p = parse_mask_function(sliding_window_causal_mask_function(4))
        >>> p.causal, p.left, p.right
        (True, 3, None)
    """
    pat = Pattern()
    if fn is None:
        pat.causal = True
        return pat
    return pat if _walk(fn, pat, remapped=False) else None


def _walk(fn, pat: Pattern, remapped: bool) -> bool:
    if fn is mu.causal_mask_function:
        pat.causal = True
        return True
    if fn is mu.bidirectional_mask_function:
        return True
    code = _code_of(fn)
    if code is None or fn.__closure__ is None:
        return False
    cells = _cells(fn)
    if code is _AND:
        return all(_walk(f, pat, remapped) for f in cells["mask_functions"])
    if code is _SLIDING:  # kv > q - w  <=>  q - kv <= w - 1
        pat.bound(left=int(cells["sliding_window"]) - 1)
        return True
    if code is _SLIDING_BI:  # |q - kv| <= w
        w = int(cells["sliding_window"])
        pat.bound(left=w, right=w)
        return True
    if code is _CHUNK:
        if pat.chunk is not None:
            return False
        pat.chunk = (int(cells["chunk_size"]), cells["left_padding"])
        return True
    if code is _PACKED and not remapped:
        if pat.packed is not None:
            return False
        pat.packed = cells["packed_sequence_mask"]
        return True
    if code is _PADDING and not remapped:
        pm = cells["padding_mask"]
        pat.padding = pm if pat.padding is None else pat.padding & pm
        return True
    if code is _REMAP and not remapped:
        if pat.positions is not None:
            return False
        pat.positions = cells["position_ids"]
        return _walk(cells["mask_function"], pat, remapped=True)
    return False  # or_masks, blockwise overlays, user functions: no structure we can use


def segment_ids(pat: Pattern, batch_size: int, offset: int, length: int, device) -> torch.Tensor | None:
    """Long ``[B, length]`` ids of positions ``offset .. offset + length - 1``: a query sees a key only
    when their ids are equal (chunks and packed sequences combined); ``None`` when neither is present."""
    if pat.chunk is None and pat.packed is None:
        return None
    idx = torch.arange(offset, offset + length, device=device).expand(batch_size, length)
    ids = None
    if pat.chunk is not None:
        size, lp = pat.chunk
        pos = idx
        if pat.positions is not None:
            pos = pat.positions.to(device).expand(batch_size, -1)[:, offset : offset + length]
        lp = torch.as_tensor(lp, device=device).reshape(-1, 1).expand(batch_size, 1)
        ids = torch.div(pos - lp, size, rounding_mode="floor")
    if pat.packed is not None:
        docs = pat.packed.to(device).expand(batch_size, -1)[:, offset : offset + length].long()
        if ids is None:
            ids = docs
        else:  # one id for the pair (document, chunk)
            lo = ids.min()
            ids = docs * (int(ids.max() - lo) + 1) + (ids - lo)
    return ids


def _block_bounds(n: int, block: int, offset: int, device):
    lo = torch.arange(0, n, block, device=device)
    hi = (lo + block).clamp(max=n) - 1
    return lo + offset, hi + offset


def _block_min_max(ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, n = ids.shape
    pad = -n % block
    if pad:
        ids = torch.cat([ids, ids[:, -1:].expand(B, pad)], 1)  # edge value: changes no min/max
    blocks = ids.view(B, -1, block)
    return blocks.amin(-1), blocks.amax(-1)


def structured_mask_mod(m) -> Callable:
    """The elementwise rule of an :class:`~effattn.hf.HFMask` (local indices ``qi``/``kv``), for partial tiles."""
    qo, ko = m.q_offset, m.kv_offset
    causal, left, right = m.causal, m.window_left, m.window_right
    valid, qseg, kseg = m.key_valid, m.q_segment, m.kv_segment

    def rule(b, h, qi, kv):
        d = (qi + qo) - (kv + ko)
        ok = torch.ones((), dtype=torch.bool, device=d.device).expand(d.shape)
        if causal:
            ok = ok & (d >= 0)
        if left is not None:
            ok = ok & (d <= left)
        if right is not None:
            ok = ok & (d >= -right)
        if valid is not None:
            ok = ok & valid[b, kv]
        if qseg is not None:
            ok = ok & (qseg[b, qi] == kseg[b, kv])
        return ok

    return rule


def structured_block_mask(m, extra_mask_mod: Callable | None = None, block: int = 64) -> BlockMask:
    """An effattn :class:`~effattn.exact.BlockMask` for the :class:`~effattn.hf.HFMask` ``m``.

    Tiles are classified empty / full / partial from index ranges: causal and window bounds from
    the tile's position ranges, key padding from each key block's count of valid keys, segments
    (chunks, packed sequences) from each block's smallest and largest id. ``extra_mask_mod``
    (local indices) is ANDed in and makes every listed tile partial.
    """
    dev = m.key_valid.device if m.key_valid is not None else (m.q_segment.device if m.q_segment is not None else "cpu")
    Tq, Tk = m.q_length, m.kv_length
    ql, qh = _block_bounds(Tq, block, m.q_offset, dev)
    kl, kh = _block_bounds(Tk, block, m.kv_offset, dev)
    ql, qh, kl, kh = ql[:, None], qh[:, None], kl[None, :], kh[None, :]
    nq, nk = ql.shape[0], kl.shape[1]
    any_ = torch.ones(1, nq, nk, dtype=torch.bool, device=dev)
    all_ = any_.clone()
    dmin, dmax = ql - kh, qh - kl  # range of q - kv over a tile
    if m.causal:
        any_ &= dmax >= 0
        all_ &= dmin >= 0
    if m.window_left is not None:
        any_ &= dmin <= m.window_left
        all_ &= dmax <= m.window_left
    if m.window_right is not None:
        any_ &= dmax >= -m.window_right
        all_ &= dmin >= -m.window_right
    if m.key_valid is not None:
        pad = nk * block - Tk
        v = m.key_valid
        some = torch.nn.functional.pad(v, (0, pad), value=False).view(v.shape[0], nk, block).any(-1)
        every = torch.nn.functional.pad(v, (0, pad), value=True).view(v.shape[0], nk, block).all(-1)
        any_ = any_ & some[:, None, :]
        all_ = all_ & every[:, None, :]
    if m.q_segment is not None:
        qmin, qmax = _block_min_max(m.q_segment, block)
        kmin, kmax = _block_min_max(m.kv_segment, block)
        any_ = any_ & (qmin[:, :, None] <= kmax[:, None, :]) & (kmin[:, None, :] <= qmax[:, :, None])
        same_q, same_k = (qmin == qmax)[:, :, None], (kmin == kmax)[:, None, :]
        all_ = all_ & same_q & same_k & (qmin[:, :, None] == kmin[:, None, :])
    all_ = all_ & any_
    Bm = max(any_.shape[0], all_.shape[0])
    any_, all_ = any_.expand(Bm, nq, nk), all_.expand(Bm, nq, nk)
    counts = any_.sum(-1)
    max_k = max(1, int(counts.max()))
    order = torch.sort((~any_).to(torch.int8), dim=-1, stable=True).indices[..., :max_k]
    rule = structured_mask_mod(m)
    if extra_mask_mod is not None:
        base = rule

        def rule(b, h, qi, kv):
            return base(b, h, qi, kv) & extra_mask_mod(b, h, qi, kv)

        partial = torch.ones_like(order, dtype=torch.bool)
    else:
        partial = ~all_.gather(-1, order)
    return BlockMask(order[:, None], counts[:, None], partial[:, None], Tq, Tk, block, block, mask_mod=rule)
