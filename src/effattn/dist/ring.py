"""Ring Attention: K/V blocks travel around a ring of ranks while each rank attends with its queries.

Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context";
Li et al. 2023, "LightSeq: Sequence Level Parallelism for Distributed Training of Long Context
Transformers" (the load-balanced causal schedule and the backward that does not re-run attention);
the zigzag layout of ring-flash-attn (Zhu 2024).

Schedule on ``P`` ranks, rank ``r`` holding queries ``Q_r`` and keys/values ``K_r, V_r`` (``T/P`` tokens):

    step s = 0 .. P-1:  post  send (K, V)_{r-s} -> r+1,  receive (K, V)_{r-s-1} <- r-1
                        compute (o_s, lse_s) = attention(Q_r, K_{r-s}, V_{r-s})   (overlaps the transfer)
                        (o, lse) <- merge((o, lse), (o_s, lse_s))

with ``merge`` the log-sum-exp combination of :func:`effattn.merge_attention_states`
(``lse = log(e^lse_a + e^lse_b)``, ``o = e^(lse_a - lse) o_a + e^(lse_b - lse) o_b``), so the result is
exact softmax attention over the whole sequence. Under a causal mask, blocks wholly in the future are
skipped; with the zigzag layout every off-diagonal step is exactly half a block on every rank
(:func:`effattn.dist._blocks.block_jobs`), and the diagonal block is attended causally.

The backward sends K/V around the ring again together with travelling ``dK, dV`` accumulators that
return to their owner after ``P`` hops. It recomputes each block's probabilities from the forward's
saved global LSE, ``P = exp(q k^T scale - L)``, so attention is never re-run as a forward (LightSeq's
rematerialization-aware checkpointing): the forward saves only the local ``q, k, v``, the output and
the LSE. A rank holds its own K/V, one travelling block and the one being received, never the full K/V.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup

from effattn._checks import check_float, check_qkv, check_scale
from effattn.dist._blocks import apply_sinks, block_backward, block_forward, block_jobs, merge_into
from effattn.dist._comm import check_same_shapes, shift
from effattn.dist.layout import check_layout, group_rank_and_size
from effattn.exact import compute_dtype

__all__ = ["ring_attention"]


def check_local_shards(q, k, v, layout: str, world: int) -> tuple[int, int, int, int, int, int]:
    """Validate local self-attention shards; returns ``(B, T_local, Hq, Hkv, D, Dv)``."""
    B, Tq, Tk, Hq, Hkv, D, Dv = check_qkv(q, k, v)
    if Tq != Tk:
        raise ValueError(
            f"sequence-parallel attention needs q and k shards of one length (self-attention over one sharded "
            f"sequence), got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if layout == "zigzag" and Tq % 2:
        raise ValueError(
            f"layout 'zigzag' shards hold two equal chunks, so the local length must be even: got local length "
            f"{Tq} (T = {Tq * world} over P={world} ranks needs T % (2 P) == 0); pad the sequence or use "
            f"layout='contiguous'"
        )
    return B, Tq, Hq, Hkv, D, Dv


def _ring_forward(q, k, v, causal, scale, group, layout, backend, softcap):
    """The forward ring pass: ``(out, lse)`` of this rank's queries over every rank's keys."""
    rank, world = group_rank_and_size(group)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    B, T, Hq, _ = q.shape
    cd = compute_dtype(q.dtype)  # float32, or float64 for float64 input: accumulators and lse
    acc_o = torch.zeros(B, T, Hq, v.shape[-1], dtype=cd, device=q.device)
    acc_lse = torch.full((B, Hq, T), float("-inf"), dtype=cd, device=q.device)
    kb, vb = k, v
    for s in range(world):
        if s + 1 < world:  # the next block is in flight while this one is computed
            pending = shift([kb, vb], nxt, prv, group, tag="kv")
        for job in block_jobs(layout, causal, rank, (rank - s) % world, T):
            o, lse = block_forward(q, kb, vb, job, scale, backend, softcap)
            merge_into(acc_o, acc_lse, job.q_rows, o, lse)
        if s + 1 < world:
            kb, vb = pending.wait()
    return acc_o.to(q.dtype), acc_lse


def check_extras(q: torch.Tensor, softcap, sinks, precomputed) -> None:
    """Validate the optional arguments shared by ring attention and TokenRing."""
    if softcap is not None:
        check_float("softcap", softcap, 0.0, math.inf, lo_open=True, hi_open=True)
    B, T, Hq, _ = q.shape
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or not sinks.dtype.is_floating_point or tuple(sinks.shape) != (Hq,):
            raise ValueError(
                f"sinks must be a floating tensor [H_q] = [{Hq}] (one logit per query head), got "
                f"{getattr(sinks, 'shape', type(sinks).__name__)}"
            )
    if precomputed is not None:
        o, lse = precomputed
        if tuple(o.shape[:3]) != (B, T, Hq) or tuple(lse.shape) != (B, Hq, T):
            raise ValueError(
                f"precomputed must be (o [B, T/P, H_q, D_v], lse [B, H_q, T/P]) = ([{B}, {T}, {Hq}, .], "
                f"[{B}, {Hq}, {T}]), got {tuple(o.shape)} and {tuple(lse.shape)}"
            )


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, group, layout, backend, softcap, precomputed):
        if precomputed is not None:  # a checkpoint's recompute: this call's first result, no ring pass
            out, acc_lse = (t.detach().clone() for t in precomputed)
        else:
            out, acc_lse = _ring_forward(q, k, v, causal, scale, group, layout, backend, softcap)
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
        cd = compute_dtype(q.dtype)  # the gradient buffers, and dK/dV on their way round the ring
        delta = (do.to(cd) * out.to(cd)).sum(-1).transpose(1, 2)  # [B, H, T]
        if dlse is not None:
            delta = delta - dlse.to(cd)
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        kb, vb = k, v
        dkv_pending = None
        for s in range(world):
            if s + 1 < world:
                kv_pending = shift([kb, vb], nxt, prv, ctx.group, tag="kv")
            dk_blk = torch.zeros(k.shape, dtype=cd, device=k.device)
            dv_blk = torch.zeros(v.shape, dtype=cd, device=v.device)
            for job in block_jobs(ctx.layout, ctx.causal, rank, (rank - s) % world, T):
                block_backward(q, kb, vb, do, lse, delta, job, ctx.scale, dq, dk_blk, dv_blk, ctx.softcap)
            if dkv_pending is not None:  # what the ranks before this one added to this block's dK, dV
                dk_in, dv_in = dkv_pending.wait()
                dk_blk += dk_in
                dv_blk += dv_in
                del dk_in, dv_in  # not kept through the next step's compute
                dkv_pending = None
            if world == 1:
                return dq.to(q.dtype), dk_blk.to(k.dtype), dv_blk.to(v.dtype), None, None, None, None, None, None, None
            dkv_pending = shift([dk_blk, dv_blk], nxt, prv, ctx.group, tag="dkv")
            if s + 1 < world:
                kb, vb = kv_pending.wait()
        dk, dv = dkv_pending.wait()  # after P hops this rank's own block's accumulators are back
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def ring_attention(
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
    """Exact attention over a sequence sharded across the ranks of ``group``, by Ring Attention.

    Args:
        q, k, v: this rank's shards ``[B, T/P, H_q, D]``, ``[B, T/P, H_kv, D]``, ``[B, T/P, H_kv, D_v]``
            (GQA when ``H_q % H_kv == 0``), laid out by ``layout`` (see
            :func:`effattn.dist.shard_sequence`).
        causal: causal over global positions (token ``i`` sees ``j <= i``).
        group: the process group (``None``: the default group).
        layout: ``"zigzag"`` (balanced causal work; local length even) or ``"contiguous"``.
        return_lse: also return the LSE ``[B, H_q, T/P]`` (differentiable; in
            :func:`effattn.exact.compute_dtype`: float32, or float64 for float64 input).
        scale: softmax scale (default ``1/sqrt(D)``).
        softcap: scores ``c tanh(s / c)`` (Gemma 2), in the forward blocks and the backward.
        sinks: one learned sink logit per query head ``[H_q]`` added to every row's denominator
            (:func:`effattn.dist._blocks.apply_sinks`, after the ring merge); its gradient on each rank
            is that rank's share: all-reduce it as a replicated weight.
        backend: the :func:`effattn.attention` backend of each block.
        check_ranks: compare shapes across ranks first (one small all-gather), so a mismatch raises on
            every rank instead of timing out in a receive.
        precomputed: ``(o, lse)`` this very call returned before (without sinks), e.g. kept by the forward
            of an activation-checkpointed layer: the call returns it without running the ring, and the
            backward is the usual one (LightSeq's checkpointing that never re-runs attention; used by
            :func:`effattn.dist.sequence_parallel` under ``LMConfig(checkpoint=...)``).

    Returns ``o [B, T/P, H_q, D_v]`` (and the LSE), this rank's shard of the single-process result.

    Example (two processes started by :func:`effattn.dist.spawn`)::

        >>> import effattn
        >>> from effattn.dist import gather_sequence, shard_sequence, spawn
        >>> def fn(rank, world_size):
        ...     torch.manual_seed(0)  # the same full tensors on every rank
        ...     q, k, v = (torch.randn(1, 16, 4, 24) for _ in range(3))
        ...     o = ring_attention(*(shard_sequence(t, layout="zigzag") for t in (q, k, v)), causal=True)
        ...     full = gather_sequence(o, layout="zigzag")
        ...     return (full - effattn.attention(q, k, v, causal=True)).abs().max().item()
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
    o, lse = _RingAttention.apply(q, k, v, bool(causal), scale, group, layout, backend, softcap, precomputed)
    if sinks is not None:
        o, lse = apply_sinks(o, lse, sinks)
    return (o, lse) if return_lse else o
