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

from effattn.exact import attention, merge_attention_states

__all__ = ["BlockJob", "block_backward", "block_forward", "block_jobs", "merge_into"]

# queries per chunk of the blockwise backward: bounds its score tile to ~this many elements
BACKWARD_TILE_ELEMENTS = 2**22


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


def block_forward(q, k, v, job: BlockJob, scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` of one job with :func:`effattn.attention` (float32 lse ``[B, H, rows]``)."""
    return attention(
        q[:, job.q_rows], k[:, job.k_rows], v[:, job.k_rows], causal=job.causal, scale=scale,
        return_lse=True, backend=backend,
    )


def merge_into(acc_o: torch.Tensor, acc_lse: torch.Tensor, rows: slice, o: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge a partial ``(o, lse)`` for query ``rows`` into the float32 accumulators, in place, with
    :func:`effattn.merge_attention_states` (``lse' = logaddexp(lse_a, lse_b)``,
    ``o' = exp(lse_a - lse') o_a + exp(lse_b - lse') o_b``)."""
    merged_o, merged_lse = merge_attention_states([acc_o[:, rows], o.float()], [acc_lse[:, :, rows], lse.float()])
    acc_o[:, rows] = merged_o
    acc_lse[:, :, rows] = merged_lse


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
) -> None:
    """Add one job's gradients into the float32 buffers ``dq [B, Tq, Hq, D]``, ``dk``, ``dv``
    (``[B, Tk, Hkv, .]``), from the saved global ``lse`` and ``delta`` (``[B, Hq, Tq]``).

    Query rows are processed in chunks so the score tile stays near ``BACKWARD_TILE_ELEMENTS``.
    GQA: query head ``h`` reads key head ``h // (Hq / Hkv)``; its key gradients are summed per group.
    Non-finite keys/values count as zeros and rows with a non-finite LSE (poisoned, or empty) as
    constants, as in the forward.
    """
    qs, ks = job.q_rows, job.k_rows
    B, _, Hq, D = q.shape
    Hkv = k.shape[2]
    g = Hq // Hkv
    kb, vb = k[:, ks].float(), v[:, ks].float()
    bad = ~(torch.isfinite(kb).all(-1) & torch.isfinite(vb).all(-1))  # [B, Tk, Hkv]
    if bool(bad.any()):
        kb, vb = kb.masked_fill(bad[..., None], 0.0), vb.masked_fill(bad[..., None], 0.0)
    kh = kb.permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hkv, 1, Tk, D]
    vh = vb.permute(0, 2, 1, 3).unsqueeze(2)
    Tk = kh.shape[3]
    n_rows = qs.stop - qs.start
    step = max(1, BACKWARD_TILE_ELEMENTS // max(1, B * Hq * Tk))
    dk_acc = torch.zeros(B, Hkv, Tk, D, dtype=torch.float32, device=q.device)
    dv_acc = torch.zeros(B, Hkv, Tk, vh.shape[-1], dtype=torch.float32, device=q.device)
    for start in range(0, n_rows, step):
        rows = slice(qs.start + start, qs.start + min(n_rows, start + step))
        n = rows.stop - rows.start
        L = lse[:, :, rows].reshape(B, Hkv, g, n, 1)
        const = ~torch.isfinite(L)  # empty (-inf) or poisoned (NaN) rows: P = 0, no gradient
        L = L.masked_fill(const, float("inf"))
        dlt = delta[:, :, rows].reshape(B, Hkv, g, n, 1).masked_fill(const, 0.0)
        qh = q[:, rows].float().permute(0, 2, 1, 3).reshape(B, Hkv, g, n, D).masked_fill(const, 0.0)
        doh = do[:, rows].float().permute(0, 2, 1, 3).reshape(B, Hkv, g, n, -1).masked_fill(const, 0.0)
        s = (qh @ kh.transpose(-1, -2)) * scale
        if job.causal:
            # bottom-right aligned within the block: key j visible to query i iff j <= i + Tk - Tq
            qi = torch.arange(rows.start - qs.start, rows.stop - qs.start, device=q.device).view(n, 1)
            kj = torch.arange(Tk, device=q.device).view(1, Tk)
            s = s.masked_fill(kj > qi + (Tk - n_rows), float("-inf"))
        p = torch.exp(s - L)
        dv_acc += (p.transpose(-1, -2) @ doh).sum(2)
        dp = doh @ vh.transpose(-1, -2)
        ds = p * (dp - dlt)
        dq[:, rows] += (ds @ kh).reshape(B, Hq, n, D).transpose(1, 2) * scale
        dk_acc += (ds.transpose(-1, -2) @ qh).sum(2) * scale
    dk[:, ks] += dk_acc.transpose(1, 2)
    dv[:, ks] += dv_acc.transpose(1, 2)
