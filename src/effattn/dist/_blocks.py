"""Blockwise pieces shared by ring attention and TokenRing: which part of a (query shard, key shard)
pair a causal layout needs, the blockwise forward, and the blockwise backward from a saved LSE.

The backward of one block uses the standard identities of memory-efficient attention (Rabe & Staats
2021, "Self-attention Does Not Need O(n^2) Memory"; Dao et al. 2022, "FlashAttention"), with the
*global* log-sum-exp ``L`` of each query row saved by the forward, so the block's probabilities are
exact without re-running attention::

    P = exp(q k^T * scale - L) ;  dV += P^T dO ;  dP = dO V^T
    dS = P * (dP - delta) ,  delta = rowsum(dO * O) - dL
    dQ += scale * dS K ;  dK += scale * dS^T Q

(``dL`` is the gradient reaching the returned LSE, zero when it is unused.)

Non-finite keys and values follow the rule of :func:`effattn.attention`: the forward (run by
``effattn.attention`` on each block) zeroes them and poisons with NaN only the rows that may see them;
the backward treats them as zeros and poisoned rows (non-finite LSE) as constants, so garbage in a
masked or skipped position never reaches a gradient of a clean row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effattn.exact import attention, compute_dtype, merge_attention_states

__all__ = ["BlockJob", "apply_sinks", "block_backward", "block_forward", "block_jobs", "merge_into", "tile_shape"]

# score elements of one tile of the blockwise backward (256k floats = 1 MiB per temporary, a few alive).
# The tile is fixed, not a fraction of the block, so a rank's peak memory is its O(T/P) shards plus a
# small constant: it falls with P at a fixed total length.
BACKWARD_TILE_ELEMENTS = 2**18


@dataclass(frozen=True)
class BlockJob:
    """Queries ``q_rows`` of a query shard attend to keys ``k_rows`` of a key shard (``causal``: the
    diagonal block, whose positions interleave, so the local causal mask is the global one)."""

    q_rows: slice
    k_rows: slice
    causal: bool


def block_jobs(layout: str, causal: bool, q_rank: int, kv_rank: int, local_len: int) -> list[BlockJob]:
    """The work between the query shard of ``q_rank`` and the key shard of ``kv_rank``.

    Non-causal: everything. Causal contiguous: earlier shards in full, the own shard causally,
    later shards not at all. Causal zigzag (shard = chunks ``r`` and ``2P-1-r``): the own shard
    causally; an earlier rank's shard: all queries see only its first chunk; a later rank's shard: only
    the second query chunk sees it, in full. Every off-diagonal job is half a block, so all ranks do the
    same work at every step.
    """
    everything = slice(0, local_len)
    if not causal:
        return [BlockJob(everything, everything, False)]
    if q_rank == kv_rank:
        return [BlockJob(everything, everything, True)]
    if layout == "contiguous":
        return [BlockJob(everything, everything, False)] if kv_rank < q_rank else []
    half = local_len // 2
    if kv_rank < q_rank:
        return [BlockJob(everything, slice(0, half), False)]
    return [BlockJob(slice(half, local_len), everything, False)]


def block_forward(
    q, k, v, job: BlockJob, scale: float, backend: str, softcap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` of one job with :func:`effattn.attention` (lse ``[B, H, rows]`` in
    :func:`effattn.exact.compute_dtype`: float32, or float64 for float64 input)."""
    return attention(
        q[:, job.q_rows],
        k[:, job.k_rows],
        v[:, job.k_rows],
        causal=job.causal,
        scale=scale,
        softcap=softcap,
        return_lse=True,
        backend=backend,
    )


def apply_sinks(o: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add a learned sink logit per head to the softmax's denominator (gpt-oss; Xiao et al., "Efficient
    Streaming Language Models with Attention Sinks", 2023): ``lse' = logaddexp(lse, sink_h)``,
    ``o' = exp(lse - lse') o``. Differentiable in ``o``, ``lse`` and ``sinks`` (``[H]``); ``o [B, T, H, D]``,
    ``lse [B, H, T]``; computed in ``compute_dtype(o.dtype)`` (float32, or float64 for float64 ``o``), the
    dtype of the returned lse. An empty row (``lse = -inf``) stays zero.

    >>> o, lse = torch.ones(1, 1, 1, 2), torch.zeros(1, 1, 1)
    >>> apply_sinks(o, lse, torch.zeros(1))[0].flatten().tolist()    # one key and a sink of equal weight
    [0.5, 0.5]
    """
    cd = compute_dtype(o.dtype)
    lse = lse.to(cd)
    new_lse = torch.logaddexp(lse, sinks.to(cd).view(1, -1, 1))
    w = torch.exp(lse - new_lse).transpose(1, 2).unsqueeze(-1)  # [B, T, H, 1]
    return (o.to(cd) * w).to(o.dtype), new_lse


def merge_into(acc_o: torch.Tensor, acc_lse: torch.Tensor, rows: slice, o: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge a partial ``(o, lse)`` for query ``rows`` into the accumulators (in the compute dtype: float32,
    or float64 for float64 input), in place, with :func:`effattn.merge_attention_states`
    (``lse' = logaddexp(lse_a, lse_b)``, ``o' = exp(lse_a - lse') o_a + exp(lse_b - lse') o_b``)."""
    o, lse = o.to(acc_o.dtype), lse.to(acc_lse.dtype)
    merged_o, merged_lse = merge_attention_states([acc_o[:, rows], o], [acc_lse[:, :, rows], lse])
    acc_o[:, rows] = merged_o
    acc_lse[:, :, rows] = merged_lse


def tile_shape(batch_heads: int, rows: int, cols: int, budget: int | None = None) -> tuple[int, int]:
    """``(rows, cols)`` of a score tile ``[batch_heads, rows, cols]`` with at most ``budget`` elements
    (default :data:`BACKWARD_TILE_ELEMENTS`; at least one row and one column), roughly square.

    >>> tile_shape(8, 2048, 2048, budget=2**20)
    (362, 362)
    >>> tile_shape(8, 10, 4096, budget=2**20)
    (10, 4096)
    """
    budget = BACKWARD_TILE_ELEMENTS if budget is None else budget
    per = max(1, budget // max(1, batch_heads))
    side = max(1, int(per**0.5))
    if rows <= side:
        return rows, min(cols, max(1, per // rows))
    if cols <= side:
        return min(rows, max(1, per // cols)), cols
    return side, side


def block_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    job: BlockJob,
    scale: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    softcap: float | None = None,
) -> None:
    """Add one job's gradients into the buffers ``dq [B, Tq, Hq, D]``, ``dk``, ``dv`` (``[B, Tk, Hkv, .]``),
    from the saved global ``lse`` and ``delta`` (``[B, Hq, Tq]``). Computed in the buffers' dtype, the
    compute dtype (float32, or float64 for float64 input).

    The block is processed in score tiles of at most ``BACKWARD_TILE_ELEMENTS`` elements (query rows x
    key columns, :func:`tile_shape`), updated in place, so the temporaries are a few tiles whatever
    the block size. GQA: query head ``h`` reads key head ``h // (Hq / Hkv)``; its key gradients are
    summed per group. ``softcap``: scores ``c tanh(s / c)``, whose derivative ``1 - tanh^2`` scales
    ``dS``. Non-finite keys/values count as zeros and rows with a non-finite LSE (poisoned, or empty)
    as constants, as in the forward.
    """
    qs, ks = job.q_rows, job.k_rows
    B, _, Hq, D = q.shape
    Hkv = k.shape[2]
    g = Hq // Hkv
    kb, vb = k[:, ks], v[:, ks]
    bad = ~(torch.isfinite(kb).all(-1) & torch.isfinite(vb).all(-1))  # [B, Tk, Hkv]
    if not bool(bad.any()):
        bad = None
    Tk = kb.shape[1]
    n_rows = qs.stop - qs.start
    tr, tc = tile_shape(B * Hq, n_rows, Tk)

    cd = dq.dtype

    def key_tile(x, c0, c1):  # [B, Hkv, 1, cols, D] in cd, non-finite keys/values as zeros: one tile's copy
        t = x[:, c0:c1].to(cd)
        if bad is not None:
            t = t.masked_fill(bad[:, c0:c1, :, None], 0.0)
        return t.permute(0, 2, 1, 3).unsqueeze(2)

    for start in range(0, n_rows, tr):
        rows = slice(qs.start + start, qs.start + min(n_rows, start + tr))
        n = rows.stop - rows.start
        L = lse[:, :, rows].reshape(B, Hkv, g, n, 1)
        const = ~torch.isfinite(L)  # empty (-inf) or poisoned (NaN) rows: P = 0, no gradient
        L = L.masked_fill(const, float("inf"))
        dlt = delta[:, :, rows].reshape(B, Hkv, g, n, 1).masked_fill(const, 0.0)
        qh = q[:, rows].to(cd).permute(0, 2, 1, 3).reshape(B, Hkv, g, n, D).masked_fill(const, 0.0)
        doh = do[:, rows].to(cd).permute(0, 2, 1, 3).reshape(B, Hkv, g, n, -1).masked_fill(const, 0.0)
        dq_rows = torch.zeros(B, Hkv, g, n, D, dtype=cd, device=q.device)
        for c0 in range(0, Tk, tc):
            c1 = min(Tk, c0 + tc)
            kc, vc = key_tile(kb, c0, c1), key_tile(vb, c0, c1)
            s = (qh @ kc.transpose(-1, -2)).mul_(scale)
            if softcap is not None:
                t = s.div_(softcap).tanh_()  # kept for the derivative
                p = (t * softcap).sub_(L).exp_()
            else:
                t, p = None, s.sub_(L).exp_()  # P = exp(S - L), in place
            del s
            if job.causal:
                # bottom-right aligned within the block: key j visible to query i iff j <= i + Tk - Tq
                qi = torch.arange(rows.start - qs.start, rows.stop - qs.start, device=q.device).view(n, 1)
                kj = torch.arange(c0, c1, device=q.device).view(1, c1 - c0)
                p.masked_fill_(kj > qi + (Tk - n_rows), 0.0)
            # the key gradients go straight into the caller's buffers: [B, cols, Hkv, .]
            dv[:, ks.start + c0 : ks.start + c1] += (p.transpose(-1, -2) @ doh).sum(2).transpose(1, 2)
            ds = (doh @ vc.transpose(-1, -2)).sub_(dlt).mul_(p)  # dS = P * (dP - delta)
            del p, vc
            if t is not None:
                ds.mul_(t.mul_(t).neg_().add_(1.0))
                del t
            dq_rows += ds @ kc
            dk[:, ks.start + c0 : ks.start + c1] += (ds.transpose(-1, -2) @ qh).sum(2).mul_(scale).transpose(1, 2)
            del ds, kc
        dq[:, rows] += dq_rows.mul_(scale).reshape(B, Hq, n, D).transpose(1, 2)
