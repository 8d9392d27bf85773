"""HyperAttention (Han, Jayaram, Karbasi, Mirrokni, Woodruff and Zandieh 2024, "HyperAttention:
Long-context Attention in Near-Linear Time").

The softmax numerator and denominator are split into the large entries, found by sortLSH, and a
sampled estimate of the rest, and the two parts are combined by their log-sum-exps:

1. sortLSH: ``n_hash_bits`` random hyperplanes (seeded, per head) give every query and key a bit
   code; codes are ranked in Gray-code order (neighbouring ranks differ in one bit) and queries and
   keys are sorted by ``(rank, position)`` separately. Non-causal (the paper): the sorted order is cut
   into blocks of ``block_size`` and query block ``i`` attends key block ``i`` (block-diagonal mask
   ``M^H``). Causal: a query attends to the ``block_size`` most recent keys of its own hash bucket at
   positions ``<= t`` (the block boundaries of the sorted order would depend on later tokens).
2. residual: ``num_samples`` key positions ``S`` drawn uniformly without replacement (seeded, per
   head). Query ``i`` attends to the sampled keys *not* already in its LSH part, and that part's
   log-sum-exp is raised by ``log(n_i / m_i)``: ``n_i / m_i * sum_{s in S_i, s not in LSH_i} exp(s_is)``
   is an unbiased estimate of the residual's sum ``sum_{j not in LSH_i} exp(s_ij)`` (``n_i`` candidate
   keys, ``m_i`` of them sampled: ``T / m`` non-causal; causal, only samples at positions ``<= i``
   count, ``(i + 1) / m_i``, so no sampled key lies in the future). This is the estimator of the
   authors' implementation (uniform columns, the same-block keys masked out); the paper's analysis
   also allows sampling by the value rows' norms, not done here.
3. the two parts combined by their log-sum-exps, ``o = sum_p exp(lse_p - lse) o_p`` with
   ``lse_sample`` raised by ``log(n_i / m_i)``. That is one softmax over ``LSH_i U (S_i minus LSH_i)``
   with ``log(n_i / m_i)`` added to the sampled scores, and it runs as one engine call over the keys
   ``[LSH keys in sorted order | sampled keys]``: the log-weight enters through one extra key
   dimension (``a_i / scale`` on the query side, 1 on sampled keys, 0 on the others), so no merge and
   no log-sum-exp gradient is needed.

The paper's causal algorithm recursively splits the causal mask into exact diagonal blocks and
unmasked off-diagonal blocks; the causal variant here is the simplest exact-causal one (per-bucket
windows plus past-only samples). :func:`hyper_attention_dense` materializes the pairs and the
log-weights (tests). In low precision the extra dimension rounds ``a_i / scale`` to the input dtype.
Cost: ``O(T log T)`` sorting, ``O(T (block_size + num_samples) D)`` attention, ``O(T)`` memory.
"""

from __future__ import annotations

import torch

from effattn._checks import check_int, check_qkv, check_scale
from effattn.exact import BlockMask, attention
from effattn.sparse._buckets import (
    chunk_round,
    expand_kv,
    gather_tokens,
    permute_tokens,
    round_mask,
    rowless,
    sorted_attention,
    visible_float,
    window_round,
)
from effattn.sparse._common import SparseMethod, check_block_size, register


def sort_lsh_buckets(x: torch.Tensor, *, n_hash_bits: int, seed: int = 0) -> torch.Tensor:
    """Gray-code rank of the sign pattern of ``x`` against ``n_hash_bits`` random hyperplanes per head:
    ``[B, H, T]`` in ``[0, 2^n_hash_bits)``; buckets with adjacent ranks differ in one bit.

    Example::

        >>> sort_lsh_buckets(torch.randn(1, 16, 2, 8), n_hash_bits=3).shape
        torch.Size([1, 2, 16])
    """
    B, T, H, D = x.shape
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randn(H, D, n_hash_bits, generator=gen).to(x.device)
    with torch.no_grad():
        bits = (torch.einsum("bthd,hdn->bhtn", x.detach().float(), planes) > 0).long()
        return gray_rank((bits << torch.arange(n_hash_bits, device=x.device)).sum(-1))


def gray_rank(code: torch.Tensor) -> torch.Tensor:
    """Position of each Gray code in the Gray sequence (``rank ^ (rank >> 1) == code``): consecutive ranks
    are codes that differ in one bit, so sorting by rank keeps neighbouring hash cells together."""
    rank = code.clone()
    shift = 1
    while shift < 63:
        rank ^= rank >> shift
        shift *= 2
    return rank


def sampled_positions(
    num_heads: int, seq_len: int, num_samples: int, *, seed: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """The residual part's key positions ``S``: ``[num_heads, num_samples]``, sorted, drawn uniformly
    without replacement from ``[0, seq_len)`` per head (the same draw as :func:`hyper_attention` with
    this ``seed``).

    Example::

        >>> s = sampled_positions(2, 10, 4, seed=3)
        >>> s.shape, bool((s.diff(dim=-1) > 0).all()), bool((s < 10).all())
        (torch.Size([2, 4]), True, True)
    """
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.rand(num_heads, seq_len, generator=gen).argsort(-1)[:, :num_samples].sort(-1).values.to(device)


def default_hash_bits(T: int, block_size: int, causal: bool) -> int:
    """7 hyperplanes (the authors' default) when not causal; causal, few enough that a bucket holds
    about ``2 * block_size`` keys (a query only sees its bucket's past, capped at ``block_size``)."""
    if not causal:
        return 7
    return int(min(7, max(1, (T // (2 * block_size)).bit_length() - 1)))


def _check(q, k, v, block_size, num_samples, n_hash_bits, causal):
    B, Tq, Tk, Hq, Hkv, D, Dv = check_qkv(q, k, v)
    if Tq != Tk:
        raise ValueError(f"hyper_attention is self-attention here: seq_q ({Tq}) must equal seq_k ({Tk})")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    block_size = min(256, Tq) if block_size is None else block_size
    num_samples = min(256, Tq) if num_samples is None else num_samples
    check_block_size("block_size", block_size, Tq, must_divide=not causal)
    check_int("num_samples", num_samples, 0, Tq)
    if n_hash_bits is None:
        n_hash_bits = default_hash_bits(Tq, block_size, causal)
    check_int("n_hash_bits", n_hash_bits, 1, 30)
    return Tq, Hq // Hkv, block_size, num_samples, n_hash_bits


class _Selection:
    """The LSH round, the sampled keys and the per-query log-weights of the sampled part."""

    def __init__(self, q, k, block_size, num_samples, n_hash_bits, causal, seed):
        B, T, H, _ = q.shape
        self.T, self.causal = T, causal
        with torch.no_grad():
            bq = sort_lsh_buckets(q, n_hash_bits=n_hash_bits, seed=seed)
            bk = sort_lsh_buckets(k, n_hash_bits=n_hash_bits, seed=seed)
            if causal:
                self.round = window_round(bq, bk, block_size)
            else:
                self.round = chunk_round(bq, bk, block_size, look_back=False)
            self.m = num_samples
            self.samples = sampled_positions(H, T, num_samples, seed=seed, device=q.device)  # [H, m]
            pos = torch.arange(T, device=q.device)
            if causal:
                m_i = torch.searchsorted(self.samples, pos.expand(H, T).contiguous(), right=True)  # [H, T]
                n_i = (pos + 1).expand(H, T)
            else:
                m_i = torch.full((H, T), num_samples, device=q.device)
                n_i = torch.full((H, T), T, device=q.device)
            self.log_w = torch.where(m_i > 0, torch.log(n_i.double() / m_i.clamp(min=1).double()), 0.0).float()

    def joint_block_mask(self) -> BlockMask:
        """One :class:`BlockMask` over ``[LSH keys in sorted order | padding | sampled keys]`` for the queries in
        sorted order: each query block lists its LSH tiles and the sample tiles (in causal mode only those
        whose first sample is not after every query of the block)."""
        rnd, T, causal = self.round, self.T, self.causal
        S = self.samples
        B, H, _ = rnd.q_order.shape
        lsh = round_mask(rnd)  # the LSH tiles and their full / partial split
        bq, bk = lsh.q_block, lsh.kv_block
        nq = lsh.num_q_blocks
        t_pad = -(-T // bk) * bk
        self.t_pad = t_pad
        n_s = -(-self.m // bk)
        dev = S.device
        lsh_idx = lsh.kv_indices.expand(B, H, nq, -1)
        lsh_real = torch.arange(lsh_idx.shape[-1], device=dev) < lsh.kv_counts.expand(B, H, nq)[..., None]
        s_idx = (t_pad // bk + torch.arange(n_s, device=dev)).expand(B, H, nq, n_s)
        s_real = torch.ones(B, H, nq, n_s, dtype=torch.bool, device=dev)
        if causal:  # a sample block matters only if its first sample is <= the block's latest query
            latest = torch.nn.functional.pad(rnd.q_order, (0, nq * bq - T), value=-1).view(B, H, nq, bq).amax(-1)
            first = S[:, ::bk]  # [H, n_s]
            s_real = first[None, :, None, :] <= latest[..., None]
        idx = torch.cat([lsh_idx, s_idx], -1)
        real = torch.cat([lsh_real, s_real], -1)
        partial = torch.cat([lsh.kv_partial.expand(B, H, nq, -1), torch.ones_like(s_real)], -1)
        order = torch.sort((~real).to(torch.int8), dim=-1, stable=True).indices  # real entries first
        return BlockMask.from_kv_indices(
            idx.gather(-1, order),
            T,
            t_pad + self.m,
            q_block=bq,
            kv_block=bk,
            kv_counts=real.sum(-1),
            keep_mod=self.joint_mask(),
            kv_partial=partial.gather(-1, order),
        )

    def joint_mask(self):
        """Query slot ``q`` (sorted order) x key slot ``kv`` of ``[LSH keys | padding | samples]``, as float
        0/1 (``BlockMask.keep_mod``), from per-column tables so that a tile costs one interval test:

        ``keep = sign_kv * inside(slot_kv) + base``: ``slot_kv`` is the sorted slot of the column's key (its
        own index for an LSH key, the sample's slot for a sample) and ``inside`` the query's LSH interval.
        Causal: ``sign`` is +1 on LSH keys (kept when inside the window) and -1 on samples, ``base`` is 1 on
        samples at positions ``<= q`` (a past sample counts unless the window holds it; the window holds
        past keys only, so the sum stays in {0, 1}). Not causal: ``sign`` is -1 on samples and 0 on LSH
        keys, ``base`` 1 on both. Padding columns have ``sign = base = 0``."""
        rnd, T, causal, m = self.round, self.T, self.causal, self.m
        t_pad = -(-T // rnd.kv_block) * rnd.kv_block
        B, H, _ = rnd.k_slot.shape
        dev = rnd.k_slot.device
        S = self.samples
        s_slot = rnd.k_slot.gather(-1, S.expand(B, -1, -1))  # [B, H, m]
        lsh_slot = torch.arange(t_pad, device=dev).expand(B, H, -1)
        slot = torch.cat([lsh_slot, s_slot], -1).to(torch.int32)  # [B, H, t_pad + m]
        is_lsh = (torch.arange(t_pad + m, device=dev) < T).float()
        is_sample = torch.zeros(t_pad + m, device=dev)
        is_sample[t_pad:] = 1.0
        sign = (is_lsh - is_sample) if causal else -is_sample
        lo, length = rnd.lo, rnd.length
        if causal:  # base = clamp(q_pos + 1 - limit, 0, 1): limit is the sample's position, beyond T elsewhere
            limit = torch.full((H, t_pad + m), 2.0 * T + 2, device=dev)
            limit[:, t_pad:] = S.float()
            qpos1 = rnd.q_order.float() + 1.0
        else:
            base = is_lsh + is_sample

        def keep(b, h, q, kv):
            hk = rowless(h)
            out = visible_float(slot[b, hk, kv], lo[b, h, q], length[b, h, q], T, cyclic=False).mul_(sign[kv])
            if causal:
                return out.add_(torch.sub(qpos1[b, h, q], limit[hk, kv]).clamp_(0.0, 1.0))
            return out.add_(base[kv])

        return keep

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, bias) [B, H, T, T]``: the attended pairs and the log-weight added to their scores."""
        T = self.T
        lsh = self.round.dense_visible()
        B, H = lsh.shape[:2]
        sampled = torch.zeros(H, T, dtype=torch.bool, device=lsh.device).scatter_(-1, self.samples, True)
        extra = sampled[None, :, None, :] & ~lsh
        if self.causal:
            extra = extra & torch.ones(T, T, dtype=torch.bool, device=lsh.device).tril()
        bias = torch.where(extra, self.log_w[None, :, :, None], 0.0)
        return lsh | extra, bias


def hyper_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int | None = None,
    num_samples: int | None = None,
    n_hash_bits: int | None = None,
    causal: bool = False,
    seed: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
):
    """HyperAttention (see the module docstring): ``q [B, T, H, D]``, ``k, v [B, T, H_kv, *]``.

    ``block_size`` (default ``min(256, T)``, the authors' 256) must divide ``T`` when not causal;
    ``0 <= num_samples <= T`` (default ``min(256, T)``); ``n_hash_bits`` defaults to :func:`default_hash_bits`.
    Returns
    ``o [B, T, H, D_v]`` (and the combined ``lse [B, H, T]`` with ``return_lse``).

    Example::

        >>> q = k = v = torch.randn(1, 256, 2, 16)
        >>> hyper_attention(q, k, v, block_size=32, num_samples=32).shape
        torch.Size([1, 256, 2, 16])
    """
    T, G, block_size, num_samples, n_hash_bits = _check(q, k, v, block_size, num_samples, n_hash_bits, causal)
    scale = check_scale(scale, q.shape[-1])
    k, v = expand_kv(k, G), expand_kv(v, G)
    sel = _Selection(q, k, block_size, num_samples, n_hash_bits, causal, seed)
    rnd = sel.round
    if num_samples == 0:
        o, lse = sorted_attention(q, k, v, rnd, round_mask(rnd), scale)
        return (o, lse) if return_lse else o
    # One softmax over [LSH keys | sampled keys]: the sampled scores get + log(n_i / m_i) through an
    # extra key dimension (query side a_i / scale, key side 1 on samples, 0 on the LSH keys), so the
    # two parts need no merge and the engine's backward is exact as it is.
    bm = sel.joint_block_mask()
    B = q.shape[0]
    pad = sel.t_pad - T
    qs = permute_tokens(q, rnd.q_order, rnd.q_slot)
    a = sel.log_w.expand(B, -1, -1).gather(-1, rnd.q_order)  # [B, H, T] log-weight of each sorted query
    q_aug = torch.cat([qs, (a / scale).transpose(1, 2)[..., None].to(q.dtype)], -1)
    parts_k = [permute_tokens(k, rnd.k_order, rnd.k_slot)]
    parts_v = [permute_tokens(v, rnd.k_order, rnd.k_slot)]
    if pad:
        parts_k.append(k.new_zeros(B, pad, k.shape[2], k.shape[3]))
        parts_v.append(v.new_zeros(B, pad, v.shape[2], v.shape[3]))
    parts_k.append(gather_tokens(k, sel.samples[None]))
    parts_v.append(gather_tokens(v, sel.samples[None]))
    flag = torch.zeros(sel.t_pad + num_samples, dtype=q.dtype, device=q.device)
    flag[sel.t_pad :] = 1.0
    k_aug = torch.cat([torch.cat(parts_k, 1), flag.view(1, -1, 1, 1).expand(B, -1, k.shape[2], 1)], -1)
    v_all = torch.cat(parts_v, 1)
    o, lse = attention(q_aug, k_aug, v_all, block_mask=bm, scale=scale, return_lse=True, backend="tiled")
    o, lse = permute_tokens(o, rnd.q_slot, rnd.q_order), lse.gather(-1, rnd.q_slot)
    return (o, lse) if return_lse else o


def hyper_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int | None = None,
    num_samples: int | None = None,
    n_hash_bits: int | None = None,
    causal: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, bias) [B, H, T, T]`` such that :func:`hyper_attention` equals exact attention over ``mask``
    with ``bias`` added to the scores (small ``T`` only: tests and inspection)."""
    T, G, block_size, num_samples, n_hash_bits = _check(q, k, k, block_size, num_samples, n_hash_bits, causal)
    return _Selection(q, expand_kv(k, G), block_size, num_samples, n_hash_bits, causal, seed).dense()


def _params(T: int) -> dict:
    """LSH blocks and samples of ``~T / 32`` each: about ``T / 16`` keys per query."""
    block = max(16, T // 32)
    while T % block:
        block -= 1
    return {"block_size": block, "num_samples": min(T, max(16, T // 32))}


register(
    SparseMethod(
        name="hyper_attention",
        attend=hyper_attention,
        # not a plain mask: the sampled scores carry log-weights (see hyper_attention_dense)
        dense_mask=lambda q, k, *, causal=False, **params: None,
        make_params=_params,
        content_based=True,
    )
)
