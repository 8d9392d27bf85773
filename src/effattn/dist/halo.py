"""Sliding-window attention on contiguous sequence shards by a halo exchange.

With a causal window of ``w`` keys (query ``i`` sees keys ``i - w + 1 .. i``), the queries of a
contiguous shard need, besides their own keys and values, only the ``w - 1`` tokens just before the
shard: the *halo*. Each rank receives that halo from the rank(s) before it with point-to-point
messages (``batch_isend_irecv``; several ranks when ``w - 1`` is longer than a shard), runs
:func:`effattn.attention` on ``[halo, own]`` keys with causal bottom-right alignment (the last query
sees the last key) and the same window, and keeps its output local. The backward sends the
gradients of the halo's keys and values back to the ranks they came from, which add them to their
own ``dK``/``dV``.

Communication per rank: at most ``w - 1`` keys and values received (and the same amount of their
gradients sent back), independent of ``P`` and of the sequence length; no collective except one
all-gather of the shard lengths (one integer per rank) that lets shards differ in length.

This is the sequence-parallel form of the local attention of Longformer (Beltagy, Peters, Cohan,
"Longformer: The Long-Document Transformer", 2020) and Mistral's sliding-window layers; the halo
exchange is the classic stencil technique of domain decomposition.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd import Function

from effattn._checks import check_int, check_positive_int, check_tensor
from effattn.dist._comm import check_same_shapes
from effattn.exact import attention

__all__ = ["halo_attention", "halo_plan", "previous_tokens"]


def halo_plan(lengths: list[int], window: int) -> list[tuple[int, int, int]]:
    """The messages of a halo exchange: ``(src, dst, n)`` -- rank ``src`` sends its last ``n``
    tokens to rank ``dst`` -- for contiguous shards of ``lengths`` tokens and a causal ``window``.

    Rank ``dst`` needs the ``window - 1`` tokens before its first one; they come from the ranks
    before it, latest first.

    >>> halo_plan([4, 4, 4], window=3)
    [(0, 1, 2), (1, 2, 2)]
    >>> halo_plan([2, 2, 2], window=4)  # a halo longer than a shard comes from two ranks
    [(0, 1, 2), (0, 2, 1), (1, 2, 2)]
    """
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    halo = window - 1
    plan = []
    for src in range(len(lengths)):
        for dst in range(src + 1, len(lengths)):
            lo = max(starts[dst] - halo, starts[src])  # first global position dst needs from src
            n = starts[src + 1] - lo
            if n > 0 and lengths[src] > 0:
                plan.append((src, dst, n))
    return plan


def _global(group, r: int) -> int:
    return r if group is None else dist.get_global_rank(group, r)


class _HaloExchange(Function):
    """``(*xs) -> (*x_halo)``: for each tensor, the tokens before this shard, in sequence order."""

    @staticmethod
    def forward(ctx, group, rank, plan, *xs):
        ctx.group, ctx.rank, ctx.plan = group, rank, plan
        ctx.shapes = [x.shape for x in xs]
        ops, incoming = [], []
        for src, dst, n in plan:
            if src == rank:
                for x in xs:
                    ops.append(dist.P2POp(dist.isend, x[:, -n:].detach().contiguous(), _global(group, dst), group))
            elif dst == rank:
                bufs = tuple(x.new_empty(x.shape[0], n, *x.shape[2:]) for x in xs)
                incoming.append((src, bufs))
                for b in bufs:
                    ops.append(dist.P2POp(dist.irecv, b, _global(group, src), group))
        _run(ops)
        incoming.sort(key=lambda item: item[0])  # earlier ranks hold earlier tokens
        halos = tuple(torch.cat([x[:, :0], *[b[i] for _, b in incoming]], dim=1) for i, x in enumerate(xs))
        ctx.sizes = [b[0].shape[1] for _, b in incoming]
        ctx.sources = [s for s, _ in incoming]
        return halos

    @staticmethod
    def backward(ctx, *g_halos):
        group, rank = ctx.group, ctx.rank
        grads = [torch.zeros(s, dtype=g.dtype, device=g.device) for s, g in zip(ctx.shapes, g_halos, strict=True)]
        ops, back = [], []
        offset = 0
        for src, n in zip(ctx.sources, ctx.sizes, strict=True):
            for g in g_halos:
                ops.append(dist.P2POp(dist.isend, g[:, offset : offset + n].contiguous(), _global(group, src), group))
            offset += n
        for src, dst, n in ctx.plan:
            if src == rank:
                bufs = tuple(g.new_empty(g.shape[0], n, *g.shape[2:]) for g in grads)
                back.append((n, bufs))
                for b in bufs:
                    ops.append(dist.P2POp(dist.irecv, b, _global(group, dst), group))
        _run(ops)
        for n, bufs in back:
            for g, b in zip(grads, bufs, strict=True):
                g[:, -n:] += b
        return (None, None, None, *grads)


def _run(ops: list) -> None:
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


def halo_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    group=None,
    **kwargs,
):
    """Causal sliding-window attention on contiguous shards ``[B, T_r, H, D]`` (rank order is
    sequence order), equal to ``effattn.attention(q, k, v, causal=True, window=window)`` on the
    whole sequence: query ``i`` attends to keys ``max(0, i - window + 1) .. i``.

    Each rank receives the ``window - 1`` keys/values before its shard (from several ranks if a
    shard is shorter), then calls :func:`effattn.attention` on ``[halo, own]`` keys;
    ``**kwargs`` go to it (``scale``, ``softcap``, ``return_lse``, ``backend``, ...). Shards may
    differ in length. Without an initialized process group it is the plain call.

    >>> q = k = v = torch.randn(1, 12, 2, 8)
    >>> o = halo_attention(q, k, v, window=4)
    >>> bool(torch.allclose(o, attention(q, k, v, causal=True, window=4)))
    True
    """
    check_tensor("q", q, 4, "[batch, seq, heads, head_dim]")
    check_tensor("k", k, 4, "[batch, seq, kv_heads, head_dim]")
    check_tensor("v", v, 4, "[batch, seq, kv_heads, value_dim]")
    window = check_positive_int("window", window)
    causal = kwargs.pop("causal", True)
    if causal is not True:
        raise ValueError(f"halo_attention is causal sliding-window attention; got causal={causal!r}")
    for name in ("cu_seqlens", "block_mask", "mask_mod"):
        if kwargs.get(name) is not None:
            raise ValueError(f"halo_attention does not take {name} (shards of one sequence per batch row)")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must be the same shard (same length): q {tuple(q.shape)}, k {tuple(k.shape)}")
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialized")
        return attention(q, k, v, causal=True, window=window, **kwargs)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # every dim but the length must agree across ranks; a mismatch raises everywhere, nobody waits
    check_same_shapes(group, q=q[:, :0], k=k[:, :0], v=v[:, :0])
    lengths = [torch.zeros(1, dtype=torch.int64, device=k.device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([k.shape[1]], dtype=torch.int64, device=k.device), group=group)
    plan = halo_plan([int(n) for n in lengths], window)
    k_halo, v_halo = _HaloExchange.apply(group, rank, plan, k, v)
    k_all = torch.cat([k_halo, k], dim=1)
    v_all = torch.cat([v_halo, v], dim=1)
    return attention(q, k_all, v_all, causal=True, window=window, **kwargs)


def previous_tokens(x: torch.Tensor, n: int, group=None) -> torch.Tensor:
    """The ``n`` tokens just before this rank's contiguous shard ``x [B, T_r, ...]``, as ``[B, n, ...]``:
    ``x_global[start - n .. start - 1]`` with zeros for positions before the sequence begins (rank 0,
    or a halo longer than all earlier shards). Differentiable: the gradient of each received token goes
    back to the rank that holds it (added to that rank's gradient of ``x``).

    This is what a causal convolution of ``n + 1`` taps needs on sequence shards (the short
    convolutions of Mamba, Mamba-2, DeltaNet, Based): ``conv(cat([previous_tokens(x, K - 1), x]))``
    equals the single-process convolution's rows of this shard. Communication: the same halo exchange
    as :func:`halo_attention` (``n`` tokens received, from several ranks if shards are shorter), plus one
    all-gather of the shard lengths. Without an initialized process group: zeros.

    >>> previous_tokens(torch.ones(1, 5, 3), 2).shape    # one process: nothing comes before the shard
    torch.Size([1, 2, 3])
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor [batch, seq, ...], got {getattr(x, 'shape', type(x).__name__)}")
    n = check_int("n", n, 0)
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialized")
        return _zeros_before(x, n)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if n == 0 or world == 1:
        return _zeros_before(x, n)
    lengths = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([x.shape[1]], dtype=torch.int64, device=x.device), group=group)
    plan = halo_plan([int(t) for t in lengths], n + 1)
    (halo,) = _HaloExchange.apply(group, rank, plan, x)
    missing = n - halo.shape[1]  # before the sequence's first token
    if missing:
        halo = torch.cat([halo.new_zeros(x.shape[0], missing, *x.shape[2:]), halo], dim=1)
    return halo


def _zeros_before(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` zero tokens shaped like ``x``'s, still part of ``x``'s graph (a zero-length slice of it)."""
    return torch.cat([x.new_zeros(x.shape[0], n, *x.shape[2:]), x[:, :0]], dim=1)
