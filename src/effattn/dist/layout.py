"""Sequence layouts: which tokens of a length-``T`` sequence each of ``P`` ranks holds.

* ``"contiguous"``: rank ``r`` holds tokens ``[r T/P, (r+1) T/P)``; needs ``T % P == 0``.
* ``"zigzag"``: the sequence is cut into ``2P`` chunks of ``c = T / (2P)`` tokens and rank ``r``
  holds chunks ``r`` and ``2P - 1 - r``; needs ``T % (2P) == 0``. Under a causal mask every rank then
  owns the same amount of work (one early and one late chunk), the load balance of the zigzag
  schedule of ring-flash-attn and of Striped/balanced Ring Attention (Brandon et al. 2023, "Striped
  Attention: Faster Ring Attention for Causal Transformers"; Li et al. 2023, "LightSeq: Sequence
  Level Parallelism for Distributed Training of Long Context Transformers").

A rank's local shard keeps the ``[B, T/P, H, D]`` layout; :func:`shard_positions` gives the global
position of each local token (for RoPE, causal masks and position-dependent score mods).

Example (single process: the layouts are plain index arithmetic)::

    >>> shard_positions(8, rank=1, world_size=2, layout="zigzag").tolist()
    [2, 3, 4, 5]
    >>> shard_positions(8, rank=0, world_size=2, layout="zigzag").tolist()
    [0, 1, 6, 7]
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from effattn._checks import check_int, check_positive_int

__all__ = [
    "LAYOUTS",
    "check_layout",
    "check_shardable",
    "gather_sequence",
    "group_rank_and_size",
    "layout_permutation",
    "shard_positions",
    "shard_sequence",
]

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> str:
    """``layout`` is one of :data:`LAYOUTS`.

    >>> check_layout("zigzag")
    'zigzag'
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def check_shardable(seq_len: int, world_size: int, layout: str, name: str = "sequence length") -> int:
    """The number of tokens per rank; raises naming ``T``, ``P`` and the layout's divisibility rule.

    >>> check_shardable(12, 3, "contiguous")
    4
    >>> check_shardable(12, 4, "zigzag")
    Traceback (most recent call last):
    ...
    ValueError: layout 'zigzag' cannot shard sequence length T=12 over P=4 ranks: ... pad the sequence to 16 tokens
    """
    check_layout(layout)
    parts = world_size if layout == "contiguous" else 2 * world_size
    if seq_len % parts != 0:
        rule = "T % P == 0" if layout == "contiguous" else "T % (2 P) == 0 (2P chunks, two per rank)"
        raise ValueError(
            f"layout {layout!r} cannot shard {name} T={seq_len} over P={world_size} ranks: it needs {rule}, "
            f"i.e. T a multiple of {parts}; pad the sequence to {-(-seq_len // parts) * parts} tokens"
        )
    return seq_len // world_size


def group_rank_and_size(group: ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group`` (the default group when ``None``).

    >>> from effattn.dist import spawn
    >>> spawn(lambda rank, world_size: group_rank_and_size(), 2)
    [(0, 2), (1, 2)]
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group first "
            "(or run under torchrun, or effattn.dist.spawn)"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def shard_positions(
    seq_len: int,
    rank: int | None = None,
    world_size: int | None = None,
    layout: str = "contiguous",
    device=None,
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    """Global positions (``int64 [T/P]``, increasing) of the tokens rank ``rank`` holds (``rank`` and
    ``world_size`` default to this process's in ``group``): RoPE angles and position-dependent masks
    of a shard use these.

    >>> shard_positions(6, rank=2, world_size=3).tolist()
    [4, 5]
    """
    if rank is None or world_size is None:
        this_rank, this_world = group_rank_and_size(group)
        rank, world_size = this_rank if rank is None else rank, this_world if world_size is None else world_size
    world_size = check_positive_int("world_size", world_size)
    rank = check_int("rank", rank, minimum=0, maximum=world_size - 1)
    local = check_shardable(check_int("seq_len", seq_len), world_size, layout)
    if layout == "contiguous":
        return torch.arange(rank * local, (rank + 1) * local, device=device)
    c = local // 2
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * world_size - 1 - rank) * c, (2 * world_size - rank) * c, device=device)
    return torch.cat([first, second])


def layout_permutation(seq_len: int, world_size: int, layout: str = "contiguous", device=None) -> torch.Tensor:
    """``perm [T]``: the global positions of the rank-ordered concatenation of all shards.

    ``full[:, perm]`` is what an all-gather of the shards yields; ``gathered[:, perm.argsort()]``
    restores the global order.

    >>> layout_permutation(8, 2, "zigzag").tolist()
    [0, 1, 6, 7, 2, 3, 4, 5]
    """
    return torch.cat([shard_positions(seq_len, r, world_size, layout, device) for r in range(world_size)])


def shard_sequence(
    x: torch.Tensor, group: ProcessGroup | None = None, layout: str = "contiguous", dim: int = 1
) -> torch.Tensor:
    """This rank's shard of a full sequence ``x`` (every rank passes the same ``x``).

    Differentiable as indexing is: the gradient reaches ``x`` at this rank's positions only.

    Example (two processes; :func:`effattn.dist.spawn` starts them)::

        >>> from effattn.dist import spawn
        >>> def fn(rank, world_size):
        ...     x = torch.arange(8).view(1, 8)
        ...     return shard_sequence(x, layout="zigzag").tolist()
        >>> spawn(fn, 2)
        [[[0, 1, 6, 7]], [[2, 3, 4, 5]]]
    """
    rank, world = group_rank_and_size(group)
    dim = dim % x.dim()
    T = x.shape[dim]
    check_shardable(T, world, layout)
    if layout == "contiguous":
        local = T // world
        return x.narrow(dim, rank * local, local)
    return x.index_select(dim, shard_positions(T, rank, world, layout, x.device))


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim``; backward: this rank's slice of the incoming gradient."""

    @staticmethod
    def forward(ctx, x, group, layout, dim):
        rank, world = group_rank_and_size(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        out = torch.cat(parts, dim=dim)
        T = out.shape[dim]
        ctx.rank, ctx.world, ctx.layout, ctx.dim, ctx.T = rank, world, layout, dim, T
        if layout == "contiguous":
            return out
        return out.index_select(dim, layout_permutation(T, world, layout, x.device).argsort())

    @staticmethod
    def backward(ctx, grad):
        pos = shard_positions(ctx.T, ctx.rank, ctx.world, ctx.layout, grad.device)
        return grad.index_select(ctx.dim, pos), None, None, None


def gather_sequence(
    x: torch.Tensor, group: ProcessGroup | None = None, layout: str = "contiguous", dim: int = 1
) -> torch.Tensor:
    """The full sequence from every rank's shard ``x`` (inverse of :func:`shard_sequence`).

    All shards must have the same shape. Differentiable for a computation replicated on every rank
    (each rank computes the same loss from the gathered tensor): the gradient of a rank's shard is its
    slice of the gathered tensor's gradient.

    Example (two processes)::

        >>> from effattn.dist import spawn
        >>> def fn(rank, world_size):
        ...     shard = torch.tensor([[rank, rank]])
        ...     return gather_sequence(shard, layout="zigzag").tolist()
        >>> spawn(fn, 2)
        [[[0, 1, 1, 0]], [[0, 1, 1, 0]]]
    """
    check_layout(layout)
    dim = dim % x.dim()
    _, world = group_rank_and_size(group)
    if layout == "zigzag" and x.shape[dim] % 2:
        raise ValueError(
            f"layout 'zigzag' shards hold two equal chunks, so the local length must be even; got {x.shape[dim]} "
            f"(T = 2 P c with P={world})"
        )
    return _GatherSequence.apply(x, group, layout, dim)
