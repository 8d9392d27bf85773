"""TokenRing: queries travel around the ring, partial results travel straight back to their owner.

Wang et al. 2024, "TokenRing: An Efficient Parallelism Framework for Infinite-Context LLMs via
Bidirectional Communication".

Ring Attention keeps queries at home and moves K and V (two tensors per hop, and dK, dV on the way
back). TokenRing moves the queries instead and uses both directions of each link at once: while the
query block goes forward to the next rank, the partial result computed for a previous query block goes
back to the rank that owns those queries. Schedule on ``P`` ranks, rank ``r`` holding ``Q_r, K_r, V_r``:

    step s = 0 .. P-1:  owner j = r - s
                        post  send Q_j -> r+1,  receive Q_{j-1} <- r-1            (forward direction)
                        (o, lse)_{j,r} = attention(Q_j, K_r, V_r)                 (K, V never move)
                        send (o, lse)_{j,r} -> j,  receive (o, lse)_{r,r+s} <- r+s (backward direction)
    owner:  (o, lse) = merge over s of (o, lse)_{r,r+s}   (effattn.merge_attention_states)

Causal masks follow the same block plan as ring attention (zigzag: half blocks, nothing skipped
unevenly; future blocks are neither computed nor sent).

Backward: the query-side tensors ``Q, dO, LSE, delta = rowsum(dO * O) - dLSE`` travel forward; each rank
adds its K/V block's gradients to its own ``dK, dV`` (they never travel) and sends the partial ``dQ`` back
to the owner. Probabilities come from the saved global LSE (``P = exp(q k^T scale - L)``), so attention is
not re-run as a forward.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup

from effattn._checks import check_scale
from effattn.dist._blocks import BlockJob, apply_sinks, block_backward, block_forward, block_jobs, merge_into
from effattn.dist._comm import check_same_shapes, p2p, shift
from effattn.dist.layout import check_layout, group_rank_and_size
from effattn.dist.ring import check_extras, check_local_shards
from effattn.exact import compute_dtype

__all__ = ["token_ring_attention"]


def _one_job(layout, causal, q_rank, kv_rank, T):
    """The single job of an off-diagonal (query shard, key shard) pair, or ``None`` when it is skipped."""
    jobs = block_jobs(layout, causal, q_rank, kv_rank, T)
    assert len(jobs) <= 1, "an off-diagonal pair is at most one block job"
    return jobs[0] if jobs else None


def _merge_partial(acc_o, acc_lse, handle, job) -> None:
    got = handle.wait()
    if job is not None:
        merge_into(acc_o, acc_lse, job.q_rows, got[0], got[1])


def _add_partial(dq, handle, job) -> None:
    got = handle.wait()
    if job is not None:
        dq[:, job.q_rows] += got[0]


def _token_ring_forward(q, k, v, causal, scale, group, layout, backend, softcap):
    """The forward pass: ``(out, lse)`` of this rank's queries (partials computed by every rank)."""
    rank, world = group_rank_and_size(group)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    B, T, Hq, _ = q.shape
    Dv = v.shape[-1]
    cd = compute_dtype(q.dtype)  # float32, or float64 for float64 input: accumulators and the lse sent back
    acc_o = torch.zeros(B, T, Hq, Dv, dtype=cd, device=q.device)
    acc_lse = torch.full((B, Hq, T), float("-inf"), dtype=cd, device=q.device)
    if world > 1:  # the first query block travels while the own block is computed
        q_pending = shift([q], nxt, prv, group, tag="q")
    for job in block_jobs(layout, causal, rank, rank, T):  # step 0: own queries, own keys
        o, lse = block_forward(q, k, v, job, scale, backend, softcap)
        merge_into(acc_o, acc_lse, job.q_rows, o, lse)
    in_flight = None
    for s in range(1, world):
        (qb,) = q_pending.wait()
        if s + 1 < world:
            q_pending = shift([qb], nxt, prv, group, tag="q")
        owner, helper = (rank - s) % world, (rank + s) % world
        out_job, in_job = _one_job(layout, causal, owner, rank, T), _one_job(layout, causal, rank, helper, T)
        sends, recvs = [], []
        if out_job is not None:
            o, lse = block_forward(qb, k, v, out_job, scale, backend, softcap)
            sends = [(o, owner), (lse.to(cd), owner)]  # o in the input dtype, lse in the compute dtype
        if in_job is not None:
            n = in_job.q_rows.stop - in_job.q_rows.start
            recvs = [
                (torch.empty(B, n, Hq, Dv, dtype=q.dtype, device=q.device), helper),
                (torch.empty(B, Hq, n, dtype=cd, device=q.device), helper),
            ]
        # the partials travel while the next step computes; merged one step later
        posted = (p2p(sends, recvs, group, tag="partial"), in_job)
        if in_flight is not None:
            _merge_partial(acc_o, acc_lse, *in_flight)
        in_flight = posted
    if in_flight is not None:
        _merge_partial(acc_o, acc_lse, *in_flight)
    return acc_o.to(q.dtype), acc_lse


class _TokenRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, group, layout, backend, softcap, precomputed):
        if precomputed is not None:  # a checkpoint's recompute: this call's first result, no ring pass
            out, acc_lse = (t.detach().clone() for t in precomputed)
        else:
            out, acc_lse = _token_ring_forward(q, k, v, causal, scale, group, layout, backend, softcap)
        ctx.save_for_backward(q, k, v, out, acc_lse)
        ctx.causal, ctx.scale, ctx.group, ctx.layout, ctx.softcap = causal, scale, group, layout, softcap
        return out, acc_lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        rank, world = group_rank_and_size(ctx.group)
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        T = q.shape[1]
        cd = compute_dtype(q.dtype)  # the gradient buffers, and the partial dQ sent back
        delta = (do.to(cd) * out.to(cd)).sum(-1).transpose(1, 2).contiguous()  # [B, H, T]
        if dlse is not None:
            delta = delta - dlse.to(cd)
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        dk = torch.zeros(k.shape, dtype=cd, device=k.device)
        dv = torch.zeros(v.shape, dtype=cd, device=v.device)
        travel = [q, do, lse, delta]
        if world > 1:
            pending = shift(travel, nxt, prv, ctx.group, tag="q")
        for job in block_jobs(ctx.layout, ctx.causal, rank, rank, T):
            block_backward(q, k, v, do, lse, delta, job, ctx.scale, dq, dk, dv, ctx.softcap)
        in_flight = None
        for s in range(1, world):
            travel = pending.wait()
            if s + 1 < world:
                pending = shift(travel, nxt, prv, ctx.group, tag="q")
            owner, helper = (rank - s) % world, (rank + s) % world
            out_job, in_job = (
                _one_job(ctx.layout, ctx.causal, owner, rank, T),
                _one_job(ctx.layout, ctx.causal, rank, helper, T),
            )
            sends, recvs = [], []
            if out_job is not None:
                # only the job's query rows: an off-diagonal job is never causal, so they can be renumbered
                rows, n = out_job.q_rows, out_job.q_rows.stop - out_job.q_rows.start
                sub = BlockJob(slice(0, n), out_job.k_rows, out_job.causal)
                tq, tdo = travel[0][:, rows], travel[1][:, rows]
                tlse, tdelta = travel[2][:, :, rows], travel[3][:, :, rows]
                dq_part = torch.zeros(q.shape[0], n, *q.shape[2:], dtype=cd, device=q.device)
                block_backward(tq, k, v, tdo, tlse, tdelta, sub, ctx.scale, dq_part, dk, dv, ctx.softcap)
                sends = [(dq_part, owner)]
            if in_job is not None:
                n = in_job.q_rows.stop - in_job.q_rows.start
                recvs = [(torch.empty(q.shape[0], n, *q.shape[2:], dtype=cd, device=q.device), helper)]
            posted = (p2p(sends, recvs, ctx.group, tag="partial"), in_job)
            if in_flight is not None:
                _add_partial(dq, *in_flight)
            in_flight = posted
        if in_flight is not None:
            _add_partial(dq, *in_flight)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def token_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    group: ProcessGroup | None = None,
    layout: str = "zigzag",
    return_lse: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    backend: str = "auto",
    check_ranks: bool = True,
    precomputed: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Exact attention over a sequence sharded across ``group``, by TokenRing's bidirectional schedule.

    Same arguments, shards and result as :func:`effattn.dist.ring_attention` (``[B, T/P, H, D]`` local
    shards, GQA, ``layout`` ``"zigzag"`` or ``"contiguous"``, optional LSE, ``softcap``, ``sinks``,
    ``precomputed``); only the communication differs: per step one query block forward and one partial
    result back, K/V stay where they are.

    Example (two processes started by :func:`effattn.dist.spawn`)::

        >>> import effattn
        >>> from effattn.dist import shard_sequence, spawn
        >>> def fn(rank, world_size):
        ...     torch.manual_seed(0)
        ...     q, k, v = (torch.randn(1, 16, 4, 24) for _ in range(3))
        ...     o = token_ring_attention(*(shard_sequence(t, layout="zigzag") for t in (q, k, v)), causal=True)
        ...     ref = shard_sequence(effattn.attention(q, k, v, causal=True), layout="zigzag")
        ...     return (o - ref).abs().max().item()
        >>> [err < 1e-5 for err in spawn(fn, 2)]
        [True, True]
    """
    check_layout(layout)
    _, world = group_rank_and_size(group)
    check_local_shards(q, k, v, layout, world)
    if check_ranks:
        check_same_shapes(group, q=q, k=k, v=v)
    scale = check_scale(scale, q.shape[-1])
    check_extras(q, softcap, sinks, precomputed)
    o, lse = _TokenRingAttention.apply(q, k, v, bool(causal), scale, group, layout, backend, softcap, precomputed)
    if sinks is not None:
        o, lse = apply_sinks(o, lse, sinks)
    return (o, lse) if return_lse else o
