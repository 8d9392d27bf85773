"""Token-level bucket machinery shared by the content-routed selectors (routing, LSH, HyperAttention).

A *round* sorts the queries and the keys of every (batch, head) by ``(bucket, position)`` (a stable
sort of the bucket ids), runs the tiled engine in that sorted order and un-sorts the result.
Which sorted key slots a sorted query slot sees is an interval of the key order (cyclic):
``visible(i, j)  <=>  (slot_k(j) - lo_i) mod T < len_i``. Two layouts give the interval:

- *chunk* (non-causal): the sorted order is cut into chunks of ``chunk`` slots; query chunk ``c``
  sees key chunk ``c`` (and ``c - 1``, cyclically, with ``look_back``: Reformer's "attend within
  the chunk and the previous one");
- *window* (causal): query ``i`` of bucket ``b`` sees the ``window`` most recent keys of bucket ``b``
  at positions ``<= i``. The set of bucket-``b`` keys at positions ``<= i`` depends on positions
  ``<= i`` only, so the selection never looks ahead. (Cutting the sorted order into chunks would
  not: the chunk boundaries move when a later token lands in a lower bucket.)

The engine gets a per-head :class:`~effattn.exact.block_mask.BlockMask` over the sorted order and a
``mask_mod`` that reads tables indexed by sorted slots (original positions, the interval, and the
intervals of earlier rounds for de-duplication), so causality is checked on original positions.

Methods that combine several attention results by their log-sum-exps use the engine's ``lse``,
which is differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from effattn.exact import BlockMask, attention, merge_attention_states, poison_rows

NEG_INF = float("-inf")


def engine_block(size: int) -> int:
    """The engine's key tile for a layout whose units are ``size`` slots: a divisor of ``size``, at most 64."""
    return math.gcd(size, 64)


def chunk_query_block(chunk: int) -> int:
    """Query tile of a chunk layout: a divisor of ``chunk`` (one chunk per tile row block), at most 256.

    Tall query tiles make the engine gather every key block once per 256 queries instead of once per 64
    (the key ranges of neighbouring query blocks differ, so the engine gathers rather than slices).
    """
    return chunk if chunk <= 256 else math.gcd(chunk, 256)


def window_block(T: int) -> tuple[int, int]:
    """``(query tile, key tile)`` of window layouts (any size works; small sequences get small tiles).

    Short query tiles: a window layout's key span per query block is the window plus the tile height, and
    the engine schedules per-head key lists by length, so tall tiles would only add masked work."""
    if T >= 2048:
        return 64, 64
    return (64, 32) if T >= 256 else (16, 16)


def expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[B, T, H_kv, E] -> [B, T, H_kv * group, E]`` (each key head serves ``group`` query heads)."""
    return x.repeat_interleave(group, dim=2) if group > 1 else x


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-head token gather, differentiable: ``x [B, T, H, E]``, ``idx [B|1, H, N] -> [B, N, H, E]``."""
    B, T, H, E = x.shape
    idx = idx.expand(B, H, idx.shape[-1])
    N = idx.shape[-1]
    b = torch.arange(B, device=x.device).view(B, 1, 1)
    h = torch.arange(H, device=x.device).view(1, 1, H)
    flat = (b * T + idx.transpose(1, 2)) * H + h  # [B, N, H]: row of x.reshape(B * T * H, E)
    return x.reshape(B * T * H, E).index_select(0, flat.reshape(-1)).view(B, N, H, E)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return gather_tokens(x, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return gather_tokens(grad.contiguous(), inverse), None, None


def permute_tokens(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """:func:`gather_tokens` for a permutation ``order [B|1, H, T]`` of the tokens, given its ``inverse``:
    the gradient is the inverse gather (a scatter-add, the generic backward, is several times slower)."""
    return _Permute.apply(x, order, inverse)


def sort_by_bucket(bucket: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, slot)`` for ``bucket [B, H, T]``: ``order[s]`` is the original position in sorted slot
    ``s`` (buckets ascending, positions ascending inside a bucket), ``slot`` its inverse."""
    order = torch.sort(bucket, dim=-1, stable=True).indices
    ranks = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    slot = torch.empty_like(order).scatter_(-1, order, ranks)
    return order, slot


def visible(k_slot: torch.Tensor, lo: torch.Tensor, length: torch.Tensor, T: int, cyclic: bool = True) -> torch.Tensor:
    """``(k_slot - lo) mod T < length`` (broadcasting; int32 tables keep score-sized temporaries small).

    Written without the (slow) integer remainder: ``0 <= d < length`` or, for an interval that wraps
    past the end (``cyclic``), ``d < length - T`` with ``d = k_slot - lo``. Not cyclic, it is the one-sided
    test ``|2 k_slot - (2 lo + length - 1)| < length`` (three passes over the score-sized tensor, not four).
    """
    if not cyclic:
        return (2 * k_slot - (2 * lo + length - 1)).abs_() < length
    d = k_slot - lo
    return ((d >= 0) & (d < length)) | (d < (length - T))


def visible_float(k_slot: torch.Tensor, lo: torch.Tensor, length: torch.Tensor, T: int, cyclic: bool = True):
    """:func:`visible` as float 0/1 (the engine's ``keep_mod`` form): on the CPU a comparison that makes a
    bool tensor is several times slower than a float pass, so the test is written as arithmetic on whole
    numbers held exactly in float32 (``T < 2^22``). Not cyclic: ``clamp(length - |2 k_slot - (2 lo + length
    - 1)|, 0, 1)``, which is 1 exactly inside the interval; cyclic, also ``clamp(length - T - d, 0, 1)``
    for the part that wraps past the end (``d = k_slot - lo``)."""
    if T >= 2**22:  # beyond float32's exact whole numbers (with the factor 2): the bool test
        return visible(k_slot, lo, length, T, cyclic).float()
    k, lo, length = k_slot.float(), lo.float(), length.float()
    if not cyclic:
        t = (2 * k) - (2 * lo + length - 1)
        return torch.sub(length, t.abs_(), out=t).clamp_(0.0, 1.0)
    d = k - lo
    inside = torch.minimum(d + 1, length - d)
    return torch.maximum(inside, (length - T) - d).clamp_(0.0, 1.0)


def rowless(h: torch.Tensor) -> torch.Tensor:
    """The head index without its row axis when it does not vary along rows.

    The engine passes ``h`` as ``[1, W, 1, R, 1]``; for a per-head block mask it is constant along the
    rows, and dropping that axis keeps key-side table look-ups at ``cols`` instead of ``rows x cols``.
    """
    if h.dim() >= 2 and h.shape[-2] > 1 and bool((h.amax(-2) == h.amin(-2)).all()):
        return h.narrow(-2, 0, 1)
    return h


@dataclass
class Round:
    """One sorted round of ``T`` queries and ``T`` keys per (batch, head).

    Tables indexed by *sorted slot*: ``q_order``/``k_order`` (the original positions), ``lo``/``length``
    (the visible key interval of each query slot). Indexed by *original position*: ``q_slot``,
    ``k_slot``, ``lo_by_query``/``length_by_query``.
    """

    T: int
    causal: bool
    q_order: torch.Tensor
    k_order: torch.Tensor
    q_slot: torch.Tensor
    k_slot: torch.Tensor
    lo: torch.Tensor
    length: torch.Tensor
    q_block: int
    kv_block: int
    chunk: int | None = None  # chunk layout: slots per chunk
    look_back: bool = False
    lo_by_query: torch.Tensor = field(init=False)
    length_by_query: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.lo_by_query = self.lo.gather(-1, self.q_slot)
        self.length_by_query = self.length.gather(-1, self.q_slot)

    @property
    def cyclic(self) -> bool:
        """Whether an interval can wrap past the end of the sorted order (chunk 0's look-back)."""
        return self.chunk is not None and self.look_back and self.T > self.chunk

    def dense_visible(self) -> torch.Tensor:
        """``[B, H, T, T]`` bool in original positions (tests and small sizes only)."""
        lo, ln = self.lo_by_query[..., :, None], self.length_by_query[..., :, None]
        return visible(self.k_slot[..., None, :], lo, ln, self.T, self.cyclic)

    def block_mask(self, keep_mod=None, *, all_partial: bool = False, self_pairs: bool = False) -> BlockMask:
        """The tiles of the sorted order that hold visible pairs (per head when there is a mask).

        Tiles wholly inside every row's interval are *full* (no mask evaluated) unless ``all_partial``
        (a de-duplication mask may drop any pair); with ``self_pairs`` (shared-QK self rule) the tiles
        holding a query's own key are partial too.
        """
        B, H, T = self.q_order.shape
        bq, bk = self.q_block, self.kv_block
        dev = self.q_order.device
        nq, nk = -(-T // bq), -(-T // bk)
        q_lo = torch.arange(nq, device=dev).view(1, 1, nq, 1) * bq  # first query slot of each query block
        if self.chunk is not None:
            per = self.chunk // bk  # key blocks per chunk
            nc = T // self.chunk
            chunk_of = torch.arange(nq, device=dev) * bq // self.chunk
            starts = [chunk_of]
            if self.look_back and nc > 1:
                starts.insert(0, torch.remainder(chunk_of - 1, nc))
            idx = torch.cat([(c * per)[:, None] + torch.arange(per, device=dev) for c in starts], -1)[None, None]
            counts = None
            partial = None
            if keep_mod is not None:
                idx = idx.expand(B, H, *idx.shape[2:])
                k_lo = idx * bk
                diag = (k_lo < q_lo + bq) & (k_lo + bk > q_lo)  # the tiles holding a query's own slot
                partial = torch.full_like(idx, all_partial, dtype=torch.bool) | (diag & self_pairs)
        else:
            pad = nq * bq - T
            lo = torch.nn.functional.pad(self.lo.long(), (0, pad), value=0).view(B, H, nq, bq)
            ln = torch.nn.functional.pad(self.length.long(), (0, pad), value=0).view(B, H, nq, bq)
            hi = lo + ln - 1
            nonempty = ln > 0
            first = torch.where(nonempty, lo, torch.full_like(lo, T)).amin(-1) // bk
            last = torch.where(nonempty, hi, torch.full_like(hi, -1)).amax(-1) // bk
            counts = (last - first + 1).clamp(min=0)
            maxc = max(1, int(counts.max()))
            idx = (first.clamp(max=nk - 1)[..., None] + torch.arange(maxc, device=dev)).clamp(max=nk - 1)
            # full tile: every row of the query block sees every key slot of the tile
            real = torch.ones(B, H, nq, bq, dtype=torch.bool, device=dev)
            if pad:
                real[..., -1, bq - pad :] = False
            all_rows = (nonempty | ~real).all(-1)
            max_lo = torch.where(real, lo, torch.zeros_like(lo)).amax(-1)
            min_hi = torch.where(real, hi, torch.full_like(hi, T)).amin(-1)
            k_lo, k_hi = idx * bk, idx * bk + bk - 1
            full = all_rows[..., None] & (k_lo >= max_lo[..., None]) & (k_hi <= min_hi[..., None]) & (k_hi < T)
            diag = (k_lo < q_lo + bq) & (k_hi >= q_lo)
            partial = ~full | all_partial | (diag & self_pairs)
        return BlockMask.from_kv_indices(
            idx, T, T, q_block=bq, kv_block=bk, kv_counts=counts, keep_mod=keep_mod, kv_partial=partial
        )


def chunk_round(bq: torch.Tensor, bk: torch.Tensor, chunk: int, *, look_back: bool) -> Round:
    """Non-causal chunk layout (``chunk`` divides ``T``; see the module docstring)."""
    T = bq.shape[-1]
    q_order, q_slot = sort_by_bucket(bq)
    k_order, k_slot = (q_order, q_slot) if bk is bq else sort_by_bucket(bk)
    nc = T // chunk
    c = torch.arange(T, device=bq.device) // chunk
    back = 1 if (look_back and nc > 1) else 0
    lo = (torch.remainder(c - back, nc) * chunk).to(torch.int32).expand_as(q_order).contiguous()
    length = torch.full_like(lo, (1 + back) * chunk)
    return Round(
        T,
        False,
        q_order,
        k_order,
        q_slot,
        k_slot,
        lo,
        length,
        chunk_query_block(chunk),
        engine_block(chunk),
        chunk,
        look_back,
    )


def window_round(bq: torch.Tensor, bk: torch.Tensor, window: int) -> Round:
    """Causal window layout: the ``window`` most recent keys of the query's bucket at positions ``<= i``."""
    T = bq.shape[-1]
    q_order, q_slot = sort_by_bucket(bq)
    shared = bk is bq
    k_order, k_slot = (q_order, q_slot) if shared else sort_by_bucket(bk)
    if shared:  # a token's own key is the last visible one
        hi = torch.arange(T, device=bq.device).expand_as(q_order)
        start = torch.searchsorted(bk.gather(-1, k_order).contiguous(), bq.gather(-1, q_order).contiguous())
    else:
        k_keys = (bk.gather(-1, k_order) * T + k_order).contiguous()
        q_bucket = bq.gather(-1, q_order)
        hi = torch.searchsorted(k_keys, (q_bucket * T + q_order).contiguous(), right=True) - 1
        start = torch.searchsorted(k_keys, (q_bucket * T).contiguous())
    lo = torch.maximum(start, hi - window + 1)
    length = (hi - lo + 1).clamp(min=0)
    lo = torch.where(length > 0, lo, torch.zeros_like(lo))
    bq, bk = window_block(T)
    return Round(T, True, q_order, k_order, q_slot, k_slot, lo.to(torch.int32), length.to(torch.int32), bq, bk)


def round_mask(rnd: Round, earlier: list[Round] = (), self_rule: torch.Tensor | None = None) -> BlockMask:
    """The round's :class:`BlockMask` in its sorted order, with the ``mask_mod`` it needs (if any).

    - window rounds: the interval and ``position(key) <= position(query)`` on original positions;
    - ``earlier`` rounds (de-duplication): a pair visible in an earlier round is dropped, so every key
      counts once over the rounds (the softmax is over the union of the rounds' key sets);
    - ``self_rule [B, H, T]`` (by original query position; shared-QK): True where the query has some
      other key, then its own key is masked (Reformer: attend to yourself only when nothing else).
    """
    T = rnd.T
    tables_q: list[torch.Tensor] = []
    tables_k: list[torch.Tensor] = []
    cyclic: list[bool] = []
    for e in earlier:  # earlier rounds' intervals, read in this round's sorted order
        tables_q.append(torch.stack([e.lo_by_query.gather(-1, rnd.q_order), e.length_by_query.gather(-1, rnd.q_order)]))
        tables_k.append(e.k_slot.gather(-1, rnd.k_order).to(torch.int32))
        cyclic.append(e.cyclic)
    causal = rnd.causal
    if not causal and not earlier and self_rule is None:
        return rnd.block_mask(None)
    qpos, kpos = rnd.q_order.to(torch.int32), rnd.k_order.to(torch.int32)
    other = None if self_rule is None else self_rule.gather(-1, rnd.q_order)
    lo, length = rnd.lo, rnd.length

    def keep(b, h, q, kv):  # float 0/1 (BlockMask.keep_mod)
        hk = rowless(h)
        ok = None
        if causal:  # the interval holds only same-bucket keys at positions <= the query's (window_round)
            ok = visible_float(kv, lo[b, h, q], length[b, h, q], T, cyclic=False)
        for tq, tk, cyc in zip(tables_q, tables_k, cyclic):
            unseen = visible_float(tk[b, hk, kv], tq[0][b, h, q], tq[1][b, h, q], T, cyc).neg_().add_(1.0)
            ok = unseen if ok is None else ok.mul_(unseen)
        if other is not None:  # |k_pos - q_pos| >= 1 off the self pair; + 1 where the query has no other key
            apart = (kpos[b, hk, kv] - qpos[b, h, q]).abs_().float().add_((~other[b, h, q]).float())
            keep_self = apart.clamp_(0.0, 1.0)
            ok = keep_self if ok is None else ok.mul_(keep_self)
        return ok

    return rnd.block_mask(keep, all_partial=bool(earlier), self_pairs=self_rule is not None)


def attention_lse(q, k, v, block_mask: BlockMask, scale: float):
    """``(o, lse)`` from the tiled engine on ``block_mask``; both are differentiable (the engine's backward
    takes ``d lse`` as ``dS = P (dP - Delta + d lse)``)."""
    return attention(q, k, v, block_mask=block_mask, scale=scale, return_lse=True, backend="tiled")


def sorted_attention(q, k, v, rnd: Round, bm: BlockMask, scale: float):
    """Attention of one round: sort, run the engine on ``bm`` (from :func:`round_mask`), un-sort.
    ``-> (o [B, T, H, Dv], lse [B, H, T])``."""
    qs = permute_tokens(q, rnd.q_order, rnd.q_slot)
    ks = permute_tokens(k, rnd.k_order, rnd.k_slot)
    vs = permute_tokens(v, rnd.k_order, rnd.k_slot)
    o, lse = attention_lse(qs, ks, vs, bm, scale)
    o = permute_tokens(o, rnd.q_slot, rnd.q_order)
    lse = lse.gather(-1, rnd.q_slot)
    return o, lse


def merge_states(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`effattn.merge_attention_states` with finite gradients for rows empty in every part.

    (``torch.logsumexp`` over all ``-inf`` back-propagates NaN; the empty parts are floored at a
    finite ``-1e30`` for the merge, which changes nothing else, and the merged lse is ``-inf`` again.)
    """
    if len(outs) == 1:
        return outs[0], lses[0]
    lse_stack = torch.stack(lses)
    empty = torch.isneginf(lse_stack).all(0)
    o, lse = merge_attention_states(torch.stack(outs), lse_stack.clamp_min(-1e30))
    return o, lse.masked_fill(empty, NEG_INF)


def merge_occurrences(o: torch.Tensor, lse: torch.Tensor, dest: torch.Tensor, T: int):
    """Combine per-occurrence results ``o [B, N, H, Dv]``, ``lse [B, H, N]`` of queries ``dest [B, H, N]``
    by their log-sum-exps into ``[B, T, H, Dv]``, ``[B, H, T]``; a query with no occurrence gets zeros."""
    B, N, H, Dv = o.shape
    # an occurrence that saw a non-finite key is NaN (effattn.exact.nonfinite): its query's row is NaN,
    # and constant, so no NaN weight meets a zero gradient on the way back
    bad = torch.isnan(lse)
    poisoned = None
    if bool(bad.any()):
        poisoned = (
            torch.zeros(B, H, T, dtype=torch.uint8, device=o.device)
            .scatter_reduce(-1, dest, bad.to(torch.uint8), "amax")
            .bool()
        )
        lse = lse.masked_fill(bad, NEG_INF)
        o = o.masked_fill(bad.transpose(1, 2)[..., None], 0.0)
    with torch.no_grad():
        m = torch.full((B, H, T), NEG_INF, device=o.device).scatter_reduce(-1, dest, lse.detach(), "amax")
        m = m.masked_fill(torch.isneginf(m), 0.0)
    lse_safe = lse.clamp_min(-1e30)  # finite gradients for empty occurrences
    wgt = torch.exp(lse_safe - m.gather(-1, dest))  # [B, H, N]
    den = torch.zeros(B, H, T, device=o.device).scatter_add(-1, dest, wgt)
    num = torch.zeros(B, H, T, Dv, device=o.device).scatter_add(
        2, dest[..., None].expand(B, H, N, Dv), wgt[..., None] * o.float().transpose(1, 2)
    )
    empty = den == 0
    out = (num / den.masked_fill(empty, 1.0)[..., None]).transpose(1, 2).to(o.dtype)
    lse_out = (torch.log(den.masked_fill(empty, 1.0)) + m).masked_fill(empty, NEG_INF)
    if poisoned is not None:
        out, lse_out = poison_rows(out, lse_out, poisoned.transpose(1, 2))
    return out, lse_out


# ------------------------------------------------------------------------------- the op
