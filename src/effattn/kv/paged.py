"""Paged KV cache: a pool of fixed-size blocks, a block table per sequence, prefix sharing.

Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention" (SOSP 2023; vLLM).

The pool holds keys ``[num_blocks, block_size, H_kv, D]`` and values ``[num_blocks, block_size,
H_kv, D_v]``. A sequence ``s`` owns a block table; its token ``i`` lives in slot ``i % block_size``
of physical block ``table_s[i // block_size]``. Blocks come from a free list and carry reference
counts: :meth:`PagedKVCache.fork` copies a table and shares every block (a common prompt is stored
once); a sequence about to write into a block that another sequence still references first copies
it (copy-on-write), so each sequence keeps its own view. :meth:`PagedKVCache.free` returns the
blocks whose count drops to zero.

Memory (:attr:`PagedKVCache.nbytes`): blocks in use, each counted once however many sequences share
it: ``used_blocks * block_size * H_kv * (D + D_v) * element_size``. A sequence of ``L`` tokens uses
``ceil(L / block_size)`` blocks, so at most ``block_size - 1`` slots per sequence are wasted (the
contiguous cache wastes its spare capacity instead).

Decode attention reads through the block tables: for the newest query of each sequence,

    o = softmax(q K_s^T * scale) V_s        (K_s, V_s: every cached token of sequence s)

computed partition by partition as in vLLM's PagedAttention V2 and Flash-Decoding: a partition is
``partition_blocks`` logical blocks of every sequence, gathered by physical block index (so only one
partition's keys are ever copied, never the whole context); each gives ``(o_p, lse_p)`` and
:func:`effattn.exact.decode.merge_attention_states` combines them. :func:`naive_paged_decode_attention`
is the reference (gather each sequence, plain softmax).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from effattn._checks import check_int, check_positive_int, check_scale, check_tensor
from effattn.exact import merge_attention_states, nonfinite_keys, poison_rows, zero_keys
from effattn.kv.base import CachedKV, LayerCache, check_index


class PoolExhaustedError(RuntimeError):
    """The block pool has fewer free blocks than an append or a copy-on-write needs."""


class PagedKVCache:
    """Block pool of keys and values shared by many sequences (see the module docstring).

    Args:
        num_blocks: blocks in the pool; block_size: tokens per block.
        kv_heads, head_dim: ``H_kv`` and ``D`` of the keys; head_dim_v: ``D_v`` (default ``D``).
        dtype, device: of the pool (allocated up front, as vLLM does).

    Sequences are named by int ids from :meth:`allocate` / :meth:`fork`. Writes happen in place
    without autograd (an inference cache).

    Example::

        >>> cache = PagedKVCache(num_blocks=8, block_size=4, kv_heads=2, head_dim=16)
        >>> a = cache.allocate()
        >>> cache.append(a, torch.randn(6, 2, 16), torch.randn(6, 2, 16))      # prompt: 2 blocks
        >>> b = cache.fork(a)                                                    # shares both
        >>> cache.append(b, torch.randn(1, 2, 16), torch.randn(1, 2, 16))      # copy-on-write
        >>> cache.seq_len(a), cache.seq_len(b), cache.num_used_blocks
        (6, 7, 3)
        >>> paged_decode_attention(torch.randn(2, 4, 16), cache, [a, b]).shape
        torch.Size([2, 4, 16])
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        head_dim_v: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        check_positive_int("num_blocks", num_blocks)
        check_positive_int("block_size", block_size)
        check_positive_int("kv_heads", kv_heads)
        check_positive_int("head_dim", head_dim)
        head_dim_v = head_dim if head_dim_v is None else check_positive_int("head_dim_v", head_dim_v)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_heads, self.head_dim, self.head_dim_v = kv_heads, head_dim, head_dim_v
        self.key_blocks = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
        self.value_blocks = torch.zeros(num_blocks, block_size, kv_heads, head_dim_v, dtype=dtype, device=device)
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first
        self._ref = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}
        self._next_id = 0

    # ------------------------------------------------------------------ bookkeeping
    @property
    def dtype(self) -> torch.dtype:
        return self.key_blocks.dtype

    @property
    def device(self) -> torch.device:
        return self.key_blocks.device

    @property
    def seq_ids(self) -> list[int]:
        """Ids of the live sequences."""
        return list(self._tables)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.kv_heads * (self.head_dim + self.head_dim_v) * self.key_blocks.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks in use (keys and values); a block shared by several sequences counts once."""
        return self.num_used_blocks * self.bytes_per_block

    @property
    def pool_nbytes(self) -> int:
        """Bytes of the whole preallocated pool."""
        return self.num_blocks * self.bytes_per_block

    def _check_seq(self, seq_id, name: str = "seq_id") -> int:
        if isinstance(seq_id, torch.Tensor) and seq_id.numel() == 1:
            seq_id = int(seq_id)
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id not in self._tables:
            raise ValueError(f"{name} {seq_id!r} is not a live sequence of this cache (live: {self.seq_ids})")
        return seq_id

    def seq_len(self, seq_id: int) -> int:
        """Tokens cached for ``seq_id``."""
        return self._lens[self._check_seq(seq_id)]

    def block_table(self, seq_id: int) -> list[int]:
        """Physical block of each logical block of ``seq_id`` (a copy)."""
        return list(self._tables[self._check_seq(seq_id)])

    def block_tables(self, seq_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tables, lens)``: long ``[B, max_blocks]`` block tables padded with -1, and long ``[B]`` lengths."""
        ids = [self._check_seq(s, "seq_ids") for s in seq_ids]
        width = max([len(self._tables[s]) for s in ids], default=0)
        tables = torch.full((len(ids), width), -1, dtype=torch.long)
        for i, s in enumerate(ids):
            tables[i, : len(self._tables[s])] = torch.tensor(self._tables[s], dtype=torch.long)
        lens = torch.tensor([self._lens[s] for s in ids], dtype=torch.long)
        return tables.to(self.device), lens.to(self.device)

    # ------------------------------------------------------------------ sequences
    def allocate(self) -> int:
        """Register a new, empty sequence and return its id (blocks are taken on append)."""
        sid = self._next_id
        self._next_id += 1
        self._tables[sid], self._lens[sid] = [], 0
        return sid

    def fork(self, seq_id: int) -> int:
        """A new sequence with ``seq_id``'s tokens, sharing its blocks (reference counts + 1)."""
        src = self._check_seq(seq_id)
        sid = self.allocate()
        self._tables[sid], self._lens[sid] = list(self._tables[src]), self._lens[src]
        for b in self._tables[sid]:
            self._ref[b] += 1
        return sid

    def free(self, seq_id: int) -> None:
        """Drop ``seq_id``; blocks no other sequence references go back to the free list."""
        sid = self._check_seq(seq_id)
        for b in reversed(self._tables.pop(sid)):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)
        del self._lens[sid]

    def _take(self) -> int:
        b = self._free.pop()
        self._ref[b] = 1
        return b

    @torch.no_grad()
    def append(self, seq_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``t`` tokens to ``seq_id``: ``k [t, H_kv, D]``, ``v [t, H_kv, D_v]``.

        Takes the blocks it needs from the free list, first copying the last block if it is shared
        and partly filled (copy-on-write). Raises :class:`PoolExhaustedError` (and changes nothing)
        when too few blocks are free.
        """
        sid = self._check_seq(seq_id)
        check_tensor("k", k, 3, "[tokens, heads_kv, head_dim]")
        check_tensor("v", v, 3, "[tokens, heads_kv, head_dim_v]")
        H, D, Dv = self.kv_heads, self.head_dim, self.head_dim_v
        t = k.shape[0]
        if tuple(k.shape[1:]) != (H, D) or tuple(v.shape) != (t, H, Dv):
            raise ValueError(
                f"k must be [tokens, heads_kv={H}, head_dim={D}] and v [tokens, heads_kv={H}, head_dim_v={Dv}], "
                f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise TypeError(f"k and v must have the pool's dtype {self.dtype}, got {k.dtype} and {v.dtype}")
        if t == 0:
            return
        table, L, bs = self._tables[sid], self._lens[sid], self.block_size
        cow = L % bs != 0 and self._ref[table[-1]] > 1
        need = -(-(L + t) // bs) - len(table) + int(cow)
        if need > len(self._free):
            raise PoolExhaustedError(
                f"KV block pool exhausted: sequence {sid} needs {need} more block(s) of {bs} tokens for {t} "
                f"new token(s), {len(self._free)} of {self.num_blocks} are free; free finished sequences or "
                f"build the cache with more num_blocks"
            )
        if cow:
            old, new = table[-1], self._take()
            self.key_blocks[new] = self.key_blocks[old]
            self.value_blocks[new] = self.value_blocks[old]
            self._ref[old] -= 1
            table[-1] = new
        while len(table) * bs < L + t:
            table.append(self._take())
        pos = torch.arange(L, L + t)
        slots = (torch.tensor(table, dtype=torch.long)[pos // bs] * bs + pos % bs).to(self.device)
        self.key_blocks.view(-1, H, D).index_copy_(0, slots, k.to(self.device))
        self.value_blocks.view(-1, H, Dv).index_copy_(0, slots, v.to(self.device))
        self._lens[sid] = L + t

    def blocks_needed(self, seq_id: int, tokens: int) -> int:
        """Free blocks an append of ``tokens`` to ``seq_id`` takes (new blocks + a copy-on-write)."""
        sid = self._check_seq(seq_id)
        L, table, bs = self._lens[sid], self._tables[sid], self.block_size
        cow = tokens > 0 and L % bs != 0 and self._ref[table[-1]] > 1
        return -(-(L + tokens) // bs) - len(table) + int(cow)

    def truncate(self, seq_id: int, length: int) -> None:
        """Keep the first ``length`` tokens of ``seq_id``; blocks past them are released (a shared,
        partly kept last block is copied on the next write)."""
        sid = self._check_seq(seq_id)
        length = check_int("length", length, minimum=0)
        if length >= self._lens[sid]:
            return
        table = self._tables[sid]
        n = -(-length // self.block_size)
        for b in reversed(table[n:]):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)
        del table[n:]
        self._lens[sid] = length

    def layer(self, seq_ids: Sequence[int]) -> PagedLayerCache:
        """The sequences ``seq_ids`` as the rows of one layer's state (:class:`PagedLayerCache`)."""
        return PagedLayerCache(self, seq_ids)

    def append_batch(self, seq_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``T`` tokens to each of ``B`` sequences: ``k [B, T, H_kv, D]``, ``v [B, T, H_kv, D_v]``
        (a decode step is ``T = 1``). Checks the pool has room for all of them before writing."""
        check_tensor("k", k, 4, "[batch, seq, heads_kv, head_dim]")
        check_tensor("v", v, 4, "[batch, seq, heads_kv, head_dim_v]")
        ids = [self._check_seq(s, "seq_ids") for s in seq_ids]
        if len(ids) != k.shape[0] or len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids must name {k.shape[0]} distinct sequences (k's batch), got {list(seq_ids)}")
        bs, T = self.block_size, k.shape[1]
        need = sum(self.blocks_needed(s, T) for s in ids)
        if need > len(self._free):
            raise PoolExhaustedError(
                f"KV block pool exhausted: {len(ids)} sequences need {need} more block(s) of {bs} tokens, "
                f"{len(self._free)} of {self.num_blocks} are free"
            )
        for i, s in enumerate(ids):
            self.append(s, k[i], v[i])

    def gather(self, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous copies ``(k [L, H_kv, D], v [L, H_kv, D_v])`` of ``seq_id``'s tokens (for prefill
        and tests; decoding reads the blocks through :func:`paged_decode_attention`)."""
        sid = self._check_seq(seq_id)
        L, table = self._lens[sid], torch.tensor(self._tables[sid], dtype=torch.long, device=self.device)
        k = self.key_blocks[table].flatten(0, 1)[:L]
        v = self.value_blocks[table].flatten(0, 1)[:L]
        return k, v

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(num_blocks={self.num_blocks}, block_size={self.block_size}, kv_heads={self.kv_heads}, "
            f"head_dim={self.head_dim}, sequences={len(self._tables)}, used_blocks={self.num_used_blocks})"
        )


class PagedLayerCache(LayerCache):
    """Sequences of a :class:`PagedKVCache` as the ``B`` rows of one layer's state (the
    :class:`~effattn.kv.LayerCache` protocol), so that :class:`effattn.nn.Attention` can run on a
    block pool.

    Only real tokens enter the pool: :meth:`update` appends each row's non-padding tokens to its
    sequence, then gathers every row left-padded to the longest (``valid`` False at the padding,
    ``key_positions`` counting real tokens). Rows may so hold different lengths. :meth:`reorder`
    forks a sequence that is chosen twice (its blocks are shared, copied on write) and frees the
    ones no row keeps; :meth:`crop` releases the blocks past ``length``. The gather copies the
    context on every call; a decoding loop that reads the blocks in place uses
    :func:`paged_decode_attention`. No autograd through the pool.

    Example::

        >>> pool = PagedKVCache(num_blocks=8, block_size=4, kv_heads=1, head_dim=8)
        >>> layer = pool.layer([pool.allocate(), pool.allocate()])
        >>> valid = torch.tensor([[False, True, True], [True, True, True]])
        >>> kv = layer.update(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8), valid=valid)
        >>> layer.lengths().tolist(), kv.valid.tolist(), layer.next_positions(2, 1).tolist()
        ([[2], [3]], [[False, True, True], [True, True, True]], [[2], [3]])
        >>> layer.reorder(torch.tensor([1, 1])); layer.lengths().tolist(), pool.num_used_blocks
        ([[3], [3]], 1)
    """

    def __init__(self, cache: PagedKVCache, seq_ids: Sequence[int]):
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
        ids = [cache._check_seq(s, "seq_ids") for s in seq_ids]
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids must name at least one sequence, each once, got {list(seq_ids)}")
        self.cache, self.seq_ids = cache, ids

    def __repr__(self) -> str:
        return f"PagedLayerCache(seq_ids={self.seq_ids}, lengths={self._lens().tolist()})"

    def _lens(self) -> torch.Tensor:
        return torch.tensor([self.cache.seq_len(s) for s in self.seq_ids], dtype=torch.long)

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids)

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks these rows use (a block shared by several rows counts once)."""
        blocks = {b for s in self.seq_ids for b in self.cache.block_table(s)}
        return len(blocks) * self.cache.bytes_per_block

    def lengths(self) -> torch.Tensor:
        return self._lens()[:, None].expand(-1, self.cache.kv_heads).clone()

    def next_positions(self, batch: int, seq: int, valid: torch.Tensor | None = None, device=None) -> torch.Tensor:
        lens = self._lens().to(device)
        if valid is None and bool((lens == lens[0]).all()):
            return torch.arange(int(lens[0]), int(lens[0]) + seq, device=device)
        if valid is None:
            return lens[:, None] + torch.arange(seq, device=device)
        return (lens[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)

    def update(
        self,
        k: torch.Tensor,
        v: torch.Tensor | None = None,
        *,
        valid: torch.Tensor | None = None,
        q: torch.Tensor | None = None,
    ) -> CachedKV:
        """Append each row's real tokens of ``k``/``v [B, T, H_kv, D]`` to its sequence (all of them
        or none: :class:`PoolExhaustedError` when the pool is short) and gather the rows."""
        check_tensor("k", k, 4, "[batch, seq, heads_kv, head_dim]")
        if v is None:
            raise TypeError("v is required: PagedKVCache holds keys and values (no key-only form)")
        check_tensor("v", v, 4, "[batch, seq, heads_kv, head_dim_v]")
        B, T = k.shape[:2]
        self.check_batch(B)
        if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != (B, T)):
            raise ValueError(f"valid must be a bool tensor [batch, seq] = [{B}, {T}], got {valid!r:.80}")
        counts = [T] * B if valid is None else valid.sum(1).tolist()
        need = sum(self.cache.blocks_needed(s, n) for s, n in zip(self.seq_ids, counts))
        if need > self.cache.num_free_blocks:
            raise PoolExhaustedError(
                f"KV block pool exhausted: {B} sequences need {need} more block(s), "
                f"{self.cache.num_free_blocks} of {self.cache.num_blocks} are free"
            )
        with torch.no_grad():
            for b, s in enumerate(self.seq_ids):
                sel = slice(None) if valid is None else valid[b]
                self.cache.append(s, k[b, sel].detach(), v[b, sel].detach())
        lens = self._lens()
        L = int(lens.max())
        parts = [self.cache.gather(s) for s in self.seq_ids]
        if bool((lens == L).all()):
            return CachedKV(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
        k_all = k.new_zeros(B, L, *k.shape[2:])
        v_all = v.new_zeros(B, L, *v.shape[2:])
        for b, (kb, vb) in enumerate(parts):
            n = kb.shape[0]
            k_all[b, L - n :], v_all[b, L - n :] = kb, vb
        slots = torch.arange(L, device=k.device)
        key_valid = slots[None, :] >= (L - lens.to(k.device))[:, None]
        key_positions = (key_valid.long().cumsum(1) - 1).clamp(min=0)
        return CachedKV(k_all, v_all, key_valid, key_positions)

    def reset(self) -> None:
        """Forget every token of these rows (their blocks go back to the pool)."""
        for s in self.seq_ids:
            self.cache.truncate(s, 0)

    def reorder(self, index) -> None:
        """Rows ``index`` in that order: a sequence chosen again is forked (blocks shared), one not
        chosen is freed."""
        index = check_index(index, self.batch_size).tolist()
        chosen: set[int] = set()
        new_ids = []
        for i in index:
            s = self.seq_ids[i]
            new_ids.append(self.cache.fork(s) if s in chosen else s)
            chosen.add(s)
        for s in self.seq_ids:
            if s not in chosen:
                self.cache.free(s)
        self.seq_ids = new_ids

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens of every row (blocks past them are released)."""
        for s in self.seq_ids:
            self.cache.truncate(s, length)


def _check_decode_query(q, cache: PagedKVCache, seq_ids) -> tuple[torch.Tensor, bool, list[int]]:
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    if isinstance(q, torch.Tensor) and q.dim() == 4:
        check_tensor("q", q, 4, "[batch, 1, heads_q, head_dim]")
        if q.shape[1] != 1:
            raise ValueError(
                f"q must hold one new token per sequence: [batch, 1, heads_q, head_dim], got {tuple(q.shape)}"
            )
        q3, had_seq = q[:, 0], True
    else:
        q3, had_seq = check_tensor("q", q, 3, "[batch, heads_q, head_dim]"), False
    B, Hq, D = q3.shape
    if D != cache.head_dim:
        raise ValueError(f"q head_dim {D} differs from the cache's {cache.head_dim}: q {tuple(q.shape)}")
    if Hq % cache.kv_heads != 0:
        raise ValueError(f"heads_q ({Hq}) must be a multiple of the cache's heads_kv ({cache.kv_heads}) for GQA/MQA")
    if isinstance(seq_ids, torch.Tensor):
        seq_ids = seq_ids.tolist()
    ids = [cache._check_seq(s, "seq_ids") for s in seq_ids]
    if len(ids) != B:
        raise ValueError(f"seq_ids must name one sequence per query row: {B} rows, got {len(ids)} ids")
    return q3, had_seq, ids


def naive_paged_decode_attention(
    q: torch.Tensor, cache: PagedKVCache, seq_ids: Sequence[int], scale: float | None = None
) -> torch.Tensor:
    """Reference of :func:`paged_decode_attention`: gather each sequence, ``softmax(q K^T scale) V``
    in float32 (an empty sequence gives zeros)."""
    q3, had_seq, ids = _check_decode_query(q, cache, seq_ids)
    scale = check_scale(scale, q3.shape[-1])
    G = q3.shape[1] // cache.kv_heads
    outs = []
    for i, s in enumerate(ids):
        k, v = cache.gather(s)
        k, v = k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)  # [L, Hq, D]
        if k.shape[0] == 0:
            outs.append(torch.zeros(q3.shape[1], cache.head_dim_v, device=q3.device))
            continue
        p = torch.softmax(torch.einsum("hd,lhd->hl", q3[i].float(), k) * scale, dim=-1)
        outs.append(torch.einsum("hl,lhd->hd", p, v))
    o = torch.stack(outs).to(q3.dtype)
    return o[:, None] if had_seq else o


def paged_decode_attention(
    q: torch.Tensor,
    cache: PagedKVCache,
    seq_ids: Sequence[int],
    scale: float | None = None,
    *,
    partition_blocks: int | None = None,
    return_lse: bool = False,
):
    """Attention of one new query per sequence against its cached tokens, read through block tables.

    Args:
        q: ``[B, H_q, D]`` or ``[B, 1, H_q, D]``; ``H_q`` a multiple of the cache's ``H_kv`` (GQA).
            The new token's key is expected to be in the cache already (it sees every cached token).
        cache: a :class:`PagedKVCache`; seq_ids: ``B`` live sequence ids, one per row of ``q``.
        scale: softmax scale (default ``1 / sqrt(D)``).
        partition_blocks: logical blocks per partition (default: about 512 tokens' worth).
        return_lse: also return the log-sum-exp ``[B, H_q]`` (``-inf`` for an empty sequence).
    Returns ``o`` of ``q``'s form (``[B, H_q, D_v]`` or ``[B, 1, H_q, D_v]``) in ``q``'s dtype.
    Each partition gathers ``partition_blocks`` blocks per sequence by physical index; the partial
    results are merged with :func:`~effattn.exact.decode.merge_attention_states`.

    Example::

        >>> cache = PagedKVCache(num_blocks=4, block_size=8, kv_heads=1, head_dim=8)
        >>> s = cache.allocate(); cache.append(s, torch.randn(11, 1, 8), torch.randn(11, 1, 8))
        >>> q = torch.randn(1, 2, 8)
        >>> torch.allclose(paged_decode_attention(q, cache, [s], partition_blocks=1),
        ...                naive_paged_decode_attention(q, cache, [s]), atol=1e-6)
        True
    """
    q3, had_seq, ids = _check_decode_query(q, cache, seq_ids)
    B, Hq, D = q3.shape
    scale = check_scale(scale, D)
    bs, Hkv, Dv = cache.block_size, cache.kv_heads, cache.head_dim_v
    if partition_blocks is None:
        partition_blocks = max(1, 512 // bs)
    check_positive_int("partition_blocks", partition_blocks)
    G = Hq // Hkv
    tables, lens = cache.block_tables(ids)
    qf = q3.float().view(B, Hkv, G, D)
    outs, lses = [], []
    for start in range(0, max(tables.shape[1], 1), partition_blocks):
        blk = tables[:, start : start + partition_blocks]  # [B, n]; -1 past a sequence's end
        n = blk.shape[1]
        if n == 0:  # every sequence is empty
            outs.append(q3.new_zeros(B, 1, Hq, Dv, dtype=torch.float32))
            lses.append(q3.new_full((B, Hq, 1), float("-inf"), dtype=torch.float32))
            break
        idx = blk.clamp(min=0)
        kb = cache.key_blocks[idx].view(B, n * bs, Hkv, D).float()  # one partition, not the whole context
        vb = cache.value_blocks[idx].view(B, n * bs, Hkv, Dv).float()
        kpos = start * bs + torch.arange(n * bs, device=cache.device)
        seen = kpos[None, :] < lens[:, None]  # [B, n bs]
        bad = nonfinite_keys(kb, vb)  # garbage in unused slots is normal: effattn.exact.nonfinite
        if bad is not None:
            kb, vb = zero_keys(kb, vb, bad)
        s = torch.einsum("bhgd,bchd->bhgc", qf, kb) * scale
        s = s.masked_fill(~seen[:, None, None, :], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, G]
        p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
        o = torch.einsum("bhgc,bchd->bhgd", p, vb).reshape(B, 1, Hq, Dv)
        lse = lse.reshape(B, Hq, 1)
        if bad is not None:  # a real (seen) token with a non-finite key or value poisons its row
            sees = (bad & seen[..., None]).any(1).repeat_interleave(G, -1)  # [B, Hq]
            o, lse = poison_rows(o, lse, sees[:, None])
        outs.append(o)
        lses.append(lse)
    o, lse = merge_attention_states(outs, lses)  # [B, 1, Hq, Dv], [B, Hq, 1]
    o = o.to(q3.dtype)
    o = o if had_seq else o[:, 0]
    return (o, lse[..., 0]) if return_lse else o
