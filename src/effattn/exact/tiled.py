"""Tiled exact attention in pure PyTorch: online softmax over the tiles a BlockMask lists.

FlashAttention-2's algorithm (Dao 2023, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning") written with batched PyTorch matmuls:

forward, per query block i and its listed key blocks j (in chunks):
    S = Q_i K_j^T * scale ; S = score_mod(S) ; S[masked] = -inf
    m' = max(m, rowmax S) ; P = exp(S - m') ; l = l e^{m-m'} + rowsum P ; A = A e^{m-m'} + P V_j
    O_i = A / l ;  lse_i = m + log l        (learned sinks start the row at m = sink, l = 1)
backward (recomputing the tiles from the saved O and lse; Delta = rowsum(dO * O)):
    P = exp(S - lse) ; dV_j += P^T dO_i ; dP = dO_i V_j^T ; dS = P * (dP - Delta)
    dQ_i += dS K_j * scale ; dK_j += dS^T Q_i * scale
    d sink_h = -sum_rows exp(sink_h - lse) * Delta

A sparse selection's probability tiles are few: when they hold at most ``KEPT_PROBS_PER_Q_ELEMENT`` (16)
entries per element of q, the forward keeps them (each relative to its step's running max, ``P = P~ *
exp(m - lse)``) and the backward uses them instead of recomputing ``S``, its exp and its mask.

Extra memory is O(T) whatever the mask (the accumulators, one chunk of tiles, and kept probability tiles
of at most 16 x the size of q). To keep Python
overhead small, one step processes many query blocks and many key blocks at once: the listed key
blocks are gathered into one ``[rows, cols]`` score tile per query block, all heads batched, and the
tile budget (``TILE_ELEMENTS``) bounds its size. A per-batch or per-head block mask (the sparse
selectors') gives every (batch, head, query block) its own key list; those are scheduled as items
sorted by list length, with each list's full tiles before its partial ones, so a step pads little
and its masked tiles share a few trailing slots. Everything is computed in ``compute_dtype(q.dtype)``
(:func:`effattn.exact.reference.compute_dtype`): float32 for float16, bfloat16 and float32 inputs, float64
for float64 inputs, forward and backward; the returned log-sum-exp has that dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from effattn.exact.block_mask import BlockMask
from effattn.exact.reference import compute_dtype

TILE_ELEMENTS = 2**21  # score elements per step (8 MB in float32, 16 MB in float64)
# exp() of inputs below about -87 (underflow, -inf) takes a slow path on the CPU, several times slower than
# in range; in tiles with masked entries, scores minus the row max are clamped first (e^-80 ~ 2e-35 next to
# the row max's 1 is nothing) and the masked entries are zeroed after the exp, so they stay exactly zero
EXP_FLOOR = -80.0
MASKED_SCORE = -1e30  # what a masked score becomes before the row max (finite: adding it is a fast pass)
ROWS_PER_STEP = 256  # query rows a step aims for: a taller, narrower score tile for the same budget
# the forward keeps its probability tiles for the backward when they hold at most this many entries per
# element of q (a sparse selection of at most 16 * head_dim keys per query): extra memory <= 16 * |q| floats,
# linear in T; above it (dense attention, long sequences) the backward recomputes them. 0 disables.
KEPT_PROBS_PER_Q_ELEMENT = 16


@dataclass
class ScoreCount:
    """Score entries of the tiled engine's forward passes while :func:`count_scores` is active.

    ``computed``: every entry of every score tile (what the matmuls and the softmax pay for, masked or
    not, padding included); ``visible``: the entries no mask removed (the pairs the softmax is over).
    """

    computed: int = 0
    visible: int = 0


_COUNTERS: list[ScoreCount] = []


@contextlib.contextmanager
def count_scores():
    """Count the score entries of the tiled engine's forward passes inside the block (benchmarks: how many
    entries a method computes per query, and how many of them its selection keeps)::

        with count_scores() as n:
            attention(q, k, v, block_mask=bm, backend="tiled")
        n.computed, n.visible
    """
    counter = ScoreCount()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


class _Layout:
    """How heads and query blocks map onto the batched tile computation.

    With a head-independent block mask, the ``G = H_q / H_kv`` query heads that share a key head
    are stacked as extra rows of one tile (GQA without copying K/V): ``W = H_kv`` work heads and
    ``R = G * q_block`` rows per query block. With a per-head block mask, ``W = H_q`` and ``R = q_block``.
    """

    def __init__(self, q, k, v, bm: BlockMask):
        B, Tq, Hq, D = q.shape
        _, Tk, Hkv, _ = k.shape
        self.B, self.Tq, self.Tk, self.Hq, self.Hkv, self.D, self.Dv = B, Tq, Tk, Hq, Hkv, D, v.shape[-1]
        self.G = Hq // Hkv
        per_head = bm.kv_indices.shape[1] > 1
        self.Geff = 1 if per_head else self.G
        self.W = Hq // self.Geff
        self.BQ, self.BK = bm.q_block, bm.kv_block
        self.nq, self.nk = bm.num_q_blocks, bm.num_kv_blocks
        self.R = self.Geff * self.BQ
        self.device = q.device
        self.dtype = compute_dtype(q.dtype)  # every float buffer of the forward and backward
        dev = q.device
        r = torch.arange(self.R, device=dev)
        # index tensors broadcastable against a score tile [B, W, g, R, cols]
        self.b_idx = torch.arange(B, device=dev).view(B, 1, 1, 1, 1)
        # head of every row [W, R]; handed to mods with a row axis only when GQA rows stack heads
        self.row_heads = torch.arange(self.W, device=dev).view(self.W, 1) * self.Geff + r // self.BQ
        self.h_idx = (
            self.row_heads.view(1, self.W, 1, self.R, 1)
            if self.Geff > 1
            else torch.arange(self.W, device=dev).view(1, self.W, 1, 1, 1)
        )
        self.row_pos = r % self.BQ
        self.base = (torch.arange(B, device=dev).view(B, 1) * self.W + torch.arange(self.W, device=dev)).view(
            B, self.W, 1, 1
        ) * self.nk
        self.bk_range = torch.arange(self.BK, device=dev)

    def rows_view(self, x: torch.Tensor) -> torch.Tensor:
        """A ``[B, W, nq, Geff, BQ, E]`` view of a ``[B, nq*BQ, Hq, E]`` tensor (row ``r = g*BQ + t``)."""
        return x.view(self.B, self.nq, self.BQ, self.W, self.Geff, x.shape[-1]).permute(0, 3, 1, 4, 2, 5)

    def from_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, W, nq, R, E] -> [B, Tq, Hq, E]`` (inverse of :meth:`q_rows`), in one copy."""
        out = torch.empty(self.B, self.nq * self.BQ, self.Hq, x.shape[-1], device=self.device, dtype=self.dtype)
        self.rows_view(out).copy_(x.view(self.B, self.W, self.nq, self.Geff, self.BQ, x.shape[-1]))
        return out[:, : self.Tq]

    def q_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, Tq, Hq, E] -> [B, W, nq, R, E]`` in the compute dtype, zero-padded, in one copy."""
        E = x.shape[-1]
        dest = torch.zeros(self.B, self.W, self.nq, self.Geff, self.BQ, E, device=self.device, dtype=self.dtype)
        _copy_padded(dest.permute(0, 2, 4, 1, 3, 5), x.reshape(self.B, self.Tq, self.W, self.Geff, E), self.BQ)
        return dest.view(self.B, self.W, self.nq, self.R, E)

    def row_stat_back(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, W, nq, R] -> [B, Hq, Tq]``."""
        x = x.view(self.B, self.W, self.nq, self.Geff, self.BQ).permute(0, 1, 3, 2, 4)
        return x.reshape(self.B, self.Hq, self.nq * self.BQ)[..., : self.Tq]

    def row_stat(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, Hq, Tq] -> [B, W, nq, R]``."""
        x = torch.nn.functional.pad(x, (0, self.nq * self.BQ - self.Tq))
        x = x.view(self.B, self.W, self.Geff, self.nq, self.BQ).permute(0, 1, 3, 2, 4)
        return x.reshape(self.B, self.W, self.nq, self.R)

    def kv_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, Tk, Hkv, E] -> [B * W * nk, BK, E]`` in the compute dtype, zero-padded, in one copy (key heads
        repeated for a per-head mask)."""
        E = x.shape[-1]
        dest = torch.zeros(
            self.B, self.Hkv, self.W // self.Hkv, self.nk * self.BK, E, device=self.device, dtype=self.dtype
        )
        src = x.permute(0, 2, 1, 3).unsqueeze(2).expand(self.B, self.Hkv, self.W // self.Hkv, self.Tk, E)
        dest[:, :, :, : self.Tk].copy_(src)
        return dest.view(self.B * self.W * self.nk, self.BK, E)

    def kv_blocks_back(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`kv_blocks` (summing repeated key heads): ``-> [B, Tk, Hkv, E]``."""
        E = x.shape[-1]
        x = x.view(self.B, self.W, self.nk * self.BK, E).transpose(1, 2)[:, : self.Tk]
        if self.W != self.Hkv:
            x = x.reshape(x.shape[0], x.shape[1], self.Hkv, self.G, E).sum(3)
        return x


class _Workspace:
    """Flat buffers reused by every step of one forward or backward call.

    Each step's score tiles and gathered keys/values would otherwise be fresh allocations: large
    ones come from ``mmap`` and cost a page fault per 4 KiB on first touch, which on the CPU is a
    sizeable fraction of the matmul time.
    """

    def __init__(self, device, dtype: torch.dtype):
        self.device, self.dtype, self.buffers = device, dtype, {}

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = self.buffers[name] = torch.empty(n, device=self.device, dtype=self.dtype)
        return buf[:n].view(shape)


def _copy_padded(dest_blocks: torch.Tensor, src: torch.Tensor, block: int) -> None:
    """Copy ``src [B, T, ...]`` into ``dest_blocks [B, n_blocks, block, ...]`` (the tail stays zero)."""
    T = src.shape[1]
    full = T // block
    if full:
        dest_blocks[:, :full].copy_(src[:, : full * block].unflatten(1, (full, block)))
    if T % block:
        dest_blocks[:, full, : T % block].copy_(src[:, full * block :])


class _Plan:
    """Everything the tile loop needs besides the tensors."""

    def __init__(
        self, bm: BlockMask, lay: _Layout, scale: float, score_mod, tile_elements: int, needs_grad: bool = False
    ):
        self.bm, self.lay, self.scale, self.score_mod = bm, lay, scale, score_mod
        # the block mask's own [Bm, Hm, ...] tensors; Hm > 1 only for a per-head mask (then W = H_q)
        self.idx_raw = bm.kv_indices.to(lay.device)
        self.counts_raw = bm.kv_counts.to(lay.device)
        self.partial_raw = bm.kv_partial.to(lay.device) if bm.mask_mod is not None else None
        max_k = max(1, int(self.counts_raw.max()))
        per_block = lay.B * lay.W * lay.R * lay.BK  # elements of one (query block, key block) pair
        # query blocks per step first (rows of the matmuls), then as many key blocks as the budget allows;
        # if that leaves too few key blocks, give rows back
        self.group = max(1, min(lay.nq, ROWS_PER_STEP // lay.R))
        self.chunk = max(1, min(max_k, tile_elements // (per_block * self.group)))  # key blocks per step
        if self.chunk < min(max_k, 8):
            self.chunk = min(max_k, 8)
            self.group = max(1, min(lay.nq, tile_elements // (per_block * self.chunk)))
        self.ragged = self._ragged_pays()
        if self.ragged:
            self._sort_items()
        # whether the forward keeps its probability tiles for the backward (a score_mod's gradient needs S)
        q_elements = lay.B * lay.Tq * lay.Hq * lay.D
        self.keep_probs = (
            needs_grad and score_mod is None and self.score_entries() <= KEPT_PROBS_PER_Q_ELEMENT * q_elements
        )

    def _ragged_pays(self) -> bool:
        """Whether to schedule (batch, work head, query block) items sorted by key-list length (see _Items):
        for a per-batch or per-head mask whose block ranges would pad their lists by more than 5%."""
        if self.idx_raw.shape[0] * self.idx_raw.shape[1] == 1:
            return False
        lay = self.lay
        counts = self.counts_raw.expand(lay.B, lay.W, lay.nq)
        pad = torch.nn.functional.pad(counts, (0, -lay.nq % self.group)).unflatten(-1, (-1, self.group))
        padded = pad.amax((0, 1, 3)).sum() * lay.B * lay.W * self.group
        return bool(padded > 1.05 * counts.sum())

    def groups(self):
        """The query-row groups, in order: block ranges, or (ragged) item lists sorted by key-list length."""
        lay = self.lay
        if not self.ragged:
            for i0 in range(0, lay.nq, self.group):
                yield _BlockRange(self, i0, min(i0 + self.group, lay.nq))
            return
        for items in self.items.split(lay.B * lay.W * self.group):
            yield _Items(self, items)

    def _sort_items(self) -> None:
        """Flatten the key lists to one row per (batch, work head, query block) item, full tiles before partial
        ones in each row, and order the items by list length (then by full tiles), longest first: a group of
        items then pads little, and its partial tiles fall in the same trailing key-list slots."""
        lay = self.lay
        n_items, k = lay.B * lay.W * lay.nq, self.idx_raw.shape[-1]
        idx = self.idx_raw.expand(lay.B, lay.W, lay.nq, k).reshape(n_items, k)
        counts = self.counts_raw.expand(lay.B, lay.W, lay.nq).reshape(n_items)
        key = counts * (k + 1)
        if self.partial_raw is not None:
            partial = self.partial_raw.expand(lay.B, lay.W, lay.nq, k).reshape(n_items, k)
            real = torch.arange(k, device=lay.device) < counts[:, None]
            order = (partial.long() + 2 * (~real).long()).argsort(dim=-1, stable=True)
            idx, partial = idx.gather(-1, order), partial.gather(-1, order)
            key = key + (real & ~partial).sum(-1)
            self.partial_items = partial
        self.idx_items, self.counts_items = idx, counts
        self.items = key.argsort(descending=True, stable=True)

    def score_entries(self) -> int:
        """Score entries of the listed tiles (the padding of a step's shorter key lists not counted)."""
        lay = self.lay
        return int(self.counts_raw.expand(lay.B, lay.W, lay.nq).sum()) * lay.R * lay.BK

    def steps(self):
        """Yield ``(group, c0, c1, first, last)`` over query-row groups and key-block chunks."""
        for grp in self.groups():
            if grp.n == 0:
                continue
            for c0 in range(0, grp.n, self.chunk):
                c1 = min(c0 + self.chunk, grp.n)
                yield grp, c0, c1, c0 == 0, c1 == grp.n


class _BlockRange:
    """Query blocks ``[i0, i1)`` of every (batch, work head): a step's scores are ``[B, W, g, R, cols]``.

    ``sel``/``counts``/``partial`` are the block mask's own ``[Bm, Hm, g, ...]`` rows; ``mod_b``/``mod_h``
    index the mask mod at that shape, ``b_idx``/``h_idx``/``q_pos`` index score mods at the scores' shape.
    """

    def __init__(self, plan: _Plan, i0: int, i1: int):
        lay = plan.lay
        self.i0, self.i1 = i0, i1
        self.shape = (lay.B, lay.W, i1 - i0)
        self.sel = plan.idx_raw[:, :, i0:i1]
        self.counts = plan.counts_raw[:, :, i0:i1]
        self.partial = None if plan.partial_raw is None else plan.partial_raw[:, :, i0:i1]
        self.n = int(self.counts.max())
        self.base, self.b_idx, self.h_idx = lay.base, lay.b_idx, lay.h_idx
        pos = torch.arange(i0, i1, device=lay.device).view(1, 1, -1, 1, 1) * lay.BQ + lay.row_pos.view(1, 1, 1, -1, 1)
        self.q_pos = pos.clamp(max=lay.Tq - 1)  # padded rows are dropped later
        self.real_rows = (pos < lay.Tq).squeeze(-1)
        self.mod_b = lay.b_idx[: self.sel.shape[0]]
        self.mod_h = lay.h_idx if (self.sel.shape[1] > 1 or lay.Geff > 1) else lay.h_idx[:, :1]  # [1, 1, ...] head-free

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The group's rows of a ``[B, W, nq, ...]`` tensor: ``[B, W, g, ...]`` (a view)."""
        return x[:, :, self.i0 : self.i1]

    def put(self, dst: torch.Tensor, val: torch.Tensor) -> None:
        dst[:, :, self.i0 : self.i1] = val

    def add(self, dst: torch.Tensor, val: torch.Tensor) -> None:
        dst[:, :, self.i0 : self.i1] += val


class _Items:
    """A list of ``N`` (batch, work head, query block) items, each with its own key list: scores are
    ``[1, N, 1, R, cols]`` (the items take the place of the work heads)."""

    def __init__(self, plan: _Plan, items: torch.Tensor):
        lay = plan.lay
        N = items.numel()
        self.items = items
        self.shape = (1, N, 1)
        self.sel = plan.idx_items[items].view(1, N, 1, -1)
        self.counts = plan.counts_items[items].view(1, N, 1)
        self.partial = None if plan.partial_raw is None else plan.partial_items[items].view(1, N, 1, -1)
        self.n = int(self.counts.max())
        b, w, i = items // (lay.W * lay.nq), items // lay.nq % lay.W, items % lay.nq
        self.base = ((b * lay.W + w) * lay.nk).view(1, N, 1, 1)
        self.b_idx = b.view(1, N, 1, 1, 1)
        self.h_idx = lay.row_heads[w].view(1, N, 1, lay.R, 1) if lay.Geff > 1 else w.view(1, N, 1, 1, 1)
        pos = i.view(1, N, 1, 1, 1) * lay.BQ + lay.row_pos.view(1, 1, 1, -1, 1)
        self.q_pos = pos.clamp(max=lay.Tq - 1)
        self.real_rows = (pos < lay.Tq).squeeze(-1)
        self.mod_b, self.mod_h = self.b_idx, self.h_idx

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The items' rows of a contiguous ``[B, W, nq, ...]`` tensor: ``[1, N, 1, ...]`` (a copy)."""
        rest = x.shape[3:]
        return x.reshape(-1, *rest).index_select(0, self.items).view(*self.shape, *rest)

    def put(self, dst: torch.Tensor, val: torch.Tensor) -> None:
        rest = dst.shape[3:]
        dst.view(-1, *rest).index_copy_(0, self.items, val.reshape(-1, *rest))

    def add(self, dst: torch.Tensor, val: torch.Tensor) -> None:
        rest = dst.shape[3:]
        dst.view(-1, *rest).index_add_(0, self.items, val.reshape(-1, *rest))


class _Step:
    """One step: a group's query rows against entries ``[c0, c1)`` of their key-block lists.

    When every row of a block range lists the same consecutive key blocks (causal, document, prefix and
    dense masks), the keys are a *slice* of K shared by the whole group: no gather, and one matmul
    per head takes all ``g * R`` query rows. Otherwise the listed blocks are gathered per query
    block. Scores are ``[*group.shape, R, cols]`` either way.
    """

    def __init__(self, plan: _Plan, grp, c0: int, c1: int, masked: bool = True):
        lay = self.lay = plan.lay
        self.plan, self.grp = plan, grp
        self.sel = sel = grp.sel[..., c0:c1]  # [Bm, Hm, g, c] (items: [1, N, 1, c])
        self.c = sel.shape[3]
        self.cols = self.c * lay.BK
        start = int(sel.flatten()[0])
        if not plan.ragged and bool((sel == start + torch.arange(self.c, device=lay.device)).all()):
            self.lo, self.flat = start * lay.BK, None
        else:
            self.lo, self.flat = None, (sel.expand(*grp.shape, self.c) + grp.base).reshape(-1)
        self.mask = self._masking(c0, c1) if masked else None  # a kept probability tile is masked already

    def kv_pos(self) -> torch.Tensor:
        """Key positions of the step's columns (clamped into range), broadcastable to the scores."""
        lay = self.lay
        if self.flat is None:
            pos = torch.arange(self.lo, self.lo + self.cols, device=lay.device)
        else:
            pos = (self.sel[..., None] * lay.BK + lay.bk_range).flatten(-2).unsqueeze(-2)
        return pos.clamp(max=lay.Tk - 1)

    def keys(self, x_flat: torch.Tensor, ws: _Workspace, name: str) -> torch.Tensor:
        """The step's keys (or values): ``[B*W, cols, E]`` (slice) or ``[B*W*g, cols, E]`` (gathered
        into the workspace buffer ``name``)."""
        lay = self.lay
        E = x_flat.shape[-1]
        if self.flat is None:
            return x_flat.view(lay.B * lay.W, lay.nk * lay.BK, E)[:, self.lo : self.lo + self.cols]
        out = ws.get(name, (self.flat.numel(), lay.BK, E))
        return torch.index_select(x_flat, 0, self.flat, out=out).view(-1, self.cols, E)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Query-side rows ``[B, W, g, R, E]`` as the matmul operand that matches :meth:`keys`."""
        lay = self.lay
        if self.flat is None:
            return x.reshape(lay.B * lay.W, self.grp.shape[2] * lay.R, x.shape[-1])
        return x.reshape(-1, lay.R, x.shape[-1])

    def unrows(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rows`: ``-> [*group.shape, R, E]``."""
        return x.view(*self.grp.shape, self.lay.R, x.shape[-1])

    def add_to_keys(self, acc_flat: torch.Tensor, grad: torch.Tensor) -> None:
        """Accumulate a key-side gradient (shaped like :meth:`keys`) into ``acc_flat [B*W*nk, BK, E]``."""
        lay = self.lay
        E = acc_flat.shape[-1]
        if self.flat is None:
            acc_flat.view(lay.B * lay.W, lay.nk * lay.BK, E)[:, self.lo : self.lo + self.cols] += grad
        else:
            acc_flat.index_add_(0, self.flat, grad.reshape(-1, lay.BK, E))

    def scores(self, q_rows: torch.Tensor, ks: torch.Tensor, ws: _Workspace, name: str = "s") -> torch.Tensor:
        """Scores ``[B, W, g, R, cols]`` from pre-scaled query rows (before score_mod and masking),
        written into the workspace buffer ``name``."""
        return self.matmul_rows(self.rows(q_rows), ks.transpose(1, 2), ws, name)

    def matmul_rows(self, a: torch.Tensor, b: torch.Tensor, ws: _Workspace, name: str) -> torch.Tensor:
        """``a @ b`` for row-shaped ``a``, into a workspace buffer, returned as ``[B, W, g, R, cols]``."""
        out = ws.get(name, (a.shape[0], a.shape[1], b.shape[2]))
        return self.unrows(torch.bmm(a, b, out=out))

    def score_mod(self, s: torch.Tensor) -> torch.Tensor:
        grp = self.grp
        return self.plan.score_mod(s, grp.b_idx, grp.h_idx, grp.q_pos, self.kv_pos())

    def _masking(self, c0: int, c1: int) -> _TileMask | None:
        """The step's :class:`_TileMask`, or None when nothing is masked.

        Only the key-block slots that need it (padding of ragged rows, the last key block's tail,
        partial tiles) are touched; the mask mod is evaluated on those slots alone and on the block
        mask's own batch/head shape (usually 1 x 1), not on every head.
        """
        plan, lay, sel, c, grp = self.plan, self.lay, self.sel, self.c, self.grp
        real = torch.arange(c0, c1, device=lay.device) < grp.counts[..., None]
        need = ~real
        if lay.Tk % lay.BK:
            need = need | (sel == lay.nk - 1)
        part = None
        if grp.partial is not None:
            part = grp.partial[..., c0:c1] & real
            need = need | part
        slots = need.flatten(0, 2).any(0).nonzero().flatten()
        if slots.numel() == 0:
            return None
        kv_pos = (sel[..., slots, None] * lay.BK + lay.bk_range).flatten(-2).unsqueeze(-2)  # [Bm, Hm, g, 1, n*BK]
        drop = (~real[..., slots]).repeat_interleave(lay.BK, -1).unsqueeze(-2) | (kv_pos >= lay.Tk)  # small
        keep = _as_float(~drop)  # small: [Bm, Hm, g, 1, n*BK]
        if part is not None:
            bm = plan.bm
            args = (grp.mod_b, grp.mod_h, grp.q_pos, kv_pos.clamp(max=lay.Tk - 1))
            rule = bm.keep_mod(*args).float() if bm.keep_mod is not None else _as_float(bm.mask_mod(*args))
            part_cols = part[..., slots]
            if not bool(part_cols.all()):  # slots that are not partial for every row: the rule does not apply
                rule = torch.maximum(rule, _as_float(~part_cols).repeat_interleave(lay.BK, -1).unsqueeze(-2))
            keep = rule * keep if bool(drop.any()) else rule
        return _TileMask(keep, slots, c, lay.BK)


class _TileMask:
    """The masked entries of one step's score tile, applied by arithmetic on the masked key-block slots.

    ``masked_fill_`` with a boolean mask runs at a small fraction of the speed of an elementwise multiply on
    the CPU, so the mask is a float ``keep`` (0 where masked, else 1): ``(keep - 1) * 1e30`` is added to the
    scores before the row max, and ``exp(S - m)`` is multiplied by ``keep`` so that masked entries are
    exactly zero. Only the ``slots`` (key blocks) that hold a masked entry are touched: a view when they
    are consecutive, a gather/scatter otherwise.
    """

    def __init__(self, keep: torch.Tensor, slots: torch.Tensor, c: int, block: int):
        self.keep = keep
        self.c, self.block, self.slots = c, block, slots
        first, n = int(slots[0]), slots.numel()
        self.first = first if int(slots[-1]) - first == n - 1 else None  # consecutive slots: a view

    def _apply(self, s: torch.Tensor, fn, operand: torch.Tensor) -> None:
        n = self.slots.numel()
        if n == self.c:
            fn(s, operand)
            return
        s6 = s.view(*s.shape[:4], self.c, self.block)
        operand = operand.unflatten(-1, (n, self.block))
        if self.first is not None:
            fn(s6.narrow(4, self.first, n), operand)
            return
        sub = s6.index_select(4, self.slots)
        fn(sub, operand)
        s6.index_copy_(4, self.slots, sub)

    def lower(self, s: torch.Tensor) -> None:
        """Masked scores become ``MASKED_SCORE`` (below any real score), in place: before the row max."""
        self._apply(s, torch.Tensor.add_, self.keep.sub(1.0).mul_(-MASKED_SCORE))  # 0 kept, MASKED_SCORE masked

    def zero(self, p: torch.Tensor) -> None:
        """Masked entries of ``p`` become exactly 0, in place."""
        self._apply(p, torch.Tensor.mul_, self.keep)

    def hidden(self, shape: tuple[int, ...]) -> torch.Tensor:
        """How many entries of each row of a score tile of ``shape`` ``[B, W, g, R, cols]`` are masked."""
        return torch.broadcast_to(1.0 - self.keep, (*shape[:4], self.keep.shape[-1])).sum(-1)


def _count(shape: tuple[int, ...], st: _Step) -> None:
    """Add a step's score entries to the active :func:`count_scores` counters (visible: of real query rows)."""
    visible = torch.full(shape[:4], float(shape[-1]), device=st.lay.device)
    if st.mask is not None:
        visible = visible - st.mask.hidden(shape)
    visible = int((visible * st.grp.real_rows).sum())
    for counter in _COUNTERS:
        counter.computed += shape.numel()
        counter.visible += visible


def _as_float(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as float 0/1 (through ``uint8``: bool -> float directly is ~10x slower on the CPU)."""
    return mask.view(torch.uint8).float()


def _masked_exp(x: torch.Tensor, mask: _TileMask | None) -> torch.Tensor:
    """``exp(x)`` in place with the step's masked entries exactly zero. With a mask, ``x`` is clamped
    into ``[EXP_FLOOR, -EXP_FLOOR]`` first: ``exp`` stays on its fast path and a masked entry, whatever
    its score, is finite before it is multiplied by zero (a visible entry is at most 0 here)."""
    if mask is None:
        return x.exp_()
    x = x.clamp_(EXP_FLOOR, -EXP_FLOOR).exp_()
    mask.zero(x)
    return x


def _sink_rows(sinks: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """Learned sink logit per row: ``[1, W, 1, R]``."""
    return sinks.to(lay.dtype)[lay.row_heads].view(1, lay.W, 1, lay.R)


def tiled_forward(q, k, v, plan: _Plan, sinks=None, kept: list | None = None):
    """Returns ``(o [B, Tq, Hq, Dv], lse [B, Hq, Tq])`` in the compute dtype; see the module docstring.

    With a list ``kept``, each step appends ``(P~, m)``: its probability tile relative to the running row
    max ``m`` (``P = P~ * exp(m - lse)``), for :func:`tiled_backward` to use instead of recomputing it."""
    lay = plan.lay
    q_r = lay.q_rows(q).mul_(plan.scale)  # the scale folded into q: one pass over q, not over every tile
    k_flat, v_flat = lay.kv_blocks(k), lay.kv_blocks(v)
    o_r = torch.zeros(lay.B, lay.W, lay.nq, lay.R, lay.Dv, device=lay.device, dtype=lay.dtype)
    lse_r = torch.full((lay.B, lay.W, lay.nq, lay.R), float("-inf"), device=lay.device, dtype=lay.dtype)
    if sinks is not None:
        lse_r.copy_(_sink_rows(sinks, lay).expand_as(lse_r))
    m = l = acc = None
    ws = _Workspace(lay.device, lay.dtype)
    for grp, c0, c1, first, last in plan.steps():
        st = _Step(plan, grp, c0, c1)
        # a kept tile needs its own buffer (the workspace's is reused by the next step)
        s = st.scores(
            grp.take(q_r), st.keys(k_flat, ws, "k"), ws if kept is None else _Workspace(lay.device, lay.dtype)
        )
        if plan.score_mod is not None:
            s = st.score_mod(s)
        if st.mask is not None:
            st.mask.lower(s)
        if first:
            m = grp.take(lse_r).clone()  # the sink logit of each row, or -inf
            l = torch.zeros_like(m) if sinks is None else torch.ones_like(m)
            acc = torch.zeros(*m.shape, lay.Dv, device=lay.device, dtype=lay.dtype)
        m_new = torch.maximum(m, s.amax(-1))
        m_use = m_new.masked_fill(m_new == float("-inf"), 0.0)
        alpha = torch.exp(m - m_use)
        p = _masked_exp(s.sub_(m_use[..., None]), st.mask)
        l = l * alpha + p.sum(-1)
        pv = st.unrows(torch.bmm(st.rows(p), st.keys(v_flat, ws, "v")))
        acc = acc.mul_(alpha[..., None]).add_(pv)
        m = m_new
        if kept is not None:
            kept.append((p, m_use))
        if _COUNTERS:
            _count(s.shape, st)
        if last:
            # empty rows: every entry masked (m = MASKED_SCORE) or -inf from a score_mod; the clamp in
            # _masked_exp gave their -inf entries a tiny weight, so they are set to o = 0, lse = -inf here
            empty = m < MASKED_SCORE / 2
            o = acc.div_(l.clamp_min(torch.finfo(l.dtype).tiny)[..., None]).masked_fill_(empty[..., None], 0.0)
            grp.put(o_r, o)
            grp.put(lse_r, (m + torch.log(l)).masked_fill_(empty, float("-inf")))
    return lay.from_rows(o_r), lay.row_stat_back(lse_r)


def tiled_backward(q, k, v, o, lse, do, plan: _Plan, sinks=None, mod_tensors=(), dlse=None, kept=None):
    """Gradients ``(dq, dk, dv, dsinks, d mod_tensors)`` by recomputing tiles (FlashAttention-2), or from the
    forward's ``kept`` probability tiles (then no score matmul, exp or mask per step).

    A gradient ``dlse`` on the returned log-sum-exp enters as ``dS = P * (dP - (Delta - dlse))``,
    since ``d lse_i / d S_ij = P_ij``.
    """
    lay = plan.lay
    q_r, do_r = lay.q_rows(q).mul_(plan.scale), lay.q_rows(do)
    k_flat, v_flat = lay.kv_blocks(k), lay.kv_blocks(v)
    cd = lay.dtype
    delta = (do.to(cd) * o.to(cd)).sum(-1).transpose(1, 2)  # [B, Hq, Tq]
    if dlse is not None:
        delta = delta - dlse.to(cd).nan_to_num(0.0, 0.0, 0.0)  # empty rows (lse = -inf) have P = 0 anyway
    delta_r = lay.row_stat(delta)  # [B, W, nq, R]
    lse_r = lay.row_stat(lse.to(cd))
    empty_r = lse_r == float("-inf")
    lse_r = lse_r.masked_fill(empty_r, float("inf"))  # empty rows: P = 0 (zeroed again after a clamp)
    # a row is empty when every entry is masked (then the mask zeroes its P) or a score_mod gave -inf to
    # every visible entry: only then can the clamp in _masked_exp lift an entry of an empty row above 0
    any_empty = plan.score_mod is not None and bool(empty_r.any())
    dq_r = torch.zeros(lay.B, lay.W, lay.nq, lay.R, lay.D, device=lay.device, dtype=cd)
    dk_flat, dv_flat = torch.zeros_like(k_flat), torch.zeros_like(v_flat)
    d_mod = [torch.zeros_like(t, dtype=cd) for t in mod_tensors]
    ws = _Workspace(lay.device, lay.dtype)
    for i, (grp, c0, c1, _, _) in enumerate(plan.steps()):
        st = _Step(plan, grp, c0, c1, masked=kept is None)
        q_g, do_g = grp.take(q_r), grp.take(do_r)
        ks, vs = st.keys(k_flat, ws, "k"), st.keys(v_flat, ws, "v")
        if kept is not None:
            p_rel, m_use = kept[i]
            p = torch.mul(p_rel, torch.exp(m_use - grp.take(lse_r))[..., None], out=ws.get("s", p_rel.shape))
        else:
            s_raw = st.scores(q_g, ks, ws)
            if plan.score_mod is not None:
                s_raw.requires_grad_(True)
                with torch.enable_grad():
                    s_mod = st.score_mod(s_raw)
                s = s_mod.detach().clone()
            else:
                s = s_raw
            p = _masked_exp(s.sub_(grp.take(lse_r)[..., None]), st.mask)  # [B, W, g, R, cols]
            if st.mask is not None and any_empty:
                p.masked_fill_(grp.take(empty_r)[..., None], 0.0)
        p_rows, do_rows = st.rows(p), st.rows(do_g)
        st.add_to_keys(dv_flat, torch.bmm(p_rows.transpose(1, 2), do_rows))
        dp = st.matmul_rows(do_rows, vs.transpose(1, 2), ws, "dp")
        ds = p.mul_(dp.sub_(grp.take(delta_r)[..., None]))  # P * (dP - Delta), in place of P
        if plan.score_mod is not None:
            grads = torch.autograd.grad(s_mod, (s_raw, *mod_tensors), ds, allow_unused=True)
            ds = grads[0]
            for acc, gr in zip(d_mod, grads[1:]):
                if gr is not None:
                    acc.add_(gr.to(cd))
        ds_rows = st.rows(ds)
        grp.add(dq_r, st.unrows(torch.bmm(ds_rows, ks)))
        st.add_to_keys(dk_flat, torch.bmm(ds_rows.transpose(1, 2), st.rows(q_g)))
    dsinks = None
    if sinks is not None:
        p_sink = torch.exp(_sink_rows(sinks, lay) - lse_r)  # [B, W, nq, R]; padded rows have delta 0
        per_row = -(p_sink * delta_r).sum((0, 2))  # [W, R]
        dsinks = torch.zeros(lay.Hq, device=lay.device, dtype=cd).index_add_(
            0, lay.row_heads.reshape(-1), per_row.reshape(-1)
        )
    dq = lay.from_rows(dq_r).mul_(plan.scale)  # the scale of S = (q * scale) k^T, applied once
    return dq, lay.kv_blocks_back(dk_flat), lay.kv_blocks_back(dv_flat), dsinks, d_mod


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, plan, *mod_tensors):
        ctx.kept = [] if plan.keep_probs else None
        o, lse = tiled_forward(q, k, v, plan, sinks, ctx.kept)
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse, sinks, *mod_tensors)
        ctx.plan = plan
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, sinks, *mod_tensors = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv, dsinks, d_mod = tiled_backward(q, k, v, o, lse, do, ctx.plan, sinks, mod_tensors, dlse, ctx.kept)
        dsinks = None if dsinks is None else dsinks.to(sinks.dtype)
        d_mod = [d.to(t.dtype) for d, t in zip(d_mod, mod_tensors)]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks, None, *d_mod


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    *,
    scale: float,
    score_mod=None,
    sinks: torch.Tensor | None = None,
    mod_tensors: tuple[torch.Tensor, ...] = (),
    tile_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled engine on validated input: ``(o [B, T_q, H_q, D_v], lse [B, H_q, T_q])``.

    ``mod_tensors`` are tensors read by ``score_mod`` whose gradients the backward returns;
    ``tile_elements`` bounds the score elements of one step (default ``TILE_ELEMENTS``).
    Prefer :func:`effattn.attention`, which validates, builds the block mask and dispatches.
    """
    lay = _Layout(q, k, v, block_mask)
    # decided here: inside the autograd Function's forward grad mode is off (and needs_input_grad ignores no_grad)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    plan = _Plan(block_mask, lay, scale, score_mod, tile_elements or TILE_ELEMENTS, needs_grad)
    return _TiledAttention.apply(q, k, v, sinks, plan, *mod_tensors)
