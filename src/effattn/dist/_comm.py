"""Communication pieces shared by the sequence-parallel methods (``torch.distributed`` only).

* :func:`p2p` posts point-to-point sends and receives with ``batch_isend_irecv`` and returns a
  handle; every transfer (and every :func:`all_to_all`) is recorded by an active :func:`count_bytes`
  counter, which is how the tests check that a rank never receives more than one travelling block at
  a time.
* :func:`all_to_all` is a differentiable ``all_to_all_single`` that scatters one dimension and gathers
  another (its backward is the inverse all-to-all), the building block of Ulysses.
* :func:`check_same_shapes` compares tensor shapes across ranks with one small all-gather, so that a
  mismatch raises on every rank instead of hanging in a receive.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = [
    "CommCounter",
    "P2PHandle",
    "all_to_all",
    "check_same_shapes",
    "count_bytes",
    "global_rank",
    "p2p",
    "shift",
]

_COUNTERS: list[CommCounter] = []


@dataclass
class CommCounter:
    """Bytes moved by :func:`p2p` calls while the counter is active (see :func:`count_bytes`).

    ``calls`` holds one ``(tag, bytes_sent, bytes_received)`` per ``p2p`` call, in order.
    """

    calls: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(c[1] for c in self.calls)

    @property
    def received(self) -> int:
        return sum(c[2] for c in self.calls)

    def by_tag(self, tag: str) -> list[tuple[int, int]]:
        """``(sent, received)`` of the calls with this tag."""
        return [(s, r) for t, s, r in self.calls if t == tag]


@contextlib.contextmanager
def count_bytes() -> Iterator[CommCounter]:
    """Record the bytes every :func:`p2p` and :func:`all_to_all` call of this process sends and receives
    inside the block (an all-to-all counts the ``(P-1)/P`` of its input that leaves the rank).

    >>> from effattn.dist import spawn
    >>> def fn(rank, world_size):
    ...     with count_bytes() as counter:
    ...         (got,) = shift([torch.full((4,), float(rank))], (rank + 1) % world_size, (rank - 1) % world_size).wait()
    ...     return got.tolist(), counter.calls
    >>> spawn(fn, 2)
    [([1.0, 1.0, 1.0, 1.0], [('shift', 16, 16)]), ([0.0, 0.0, 0.0, 0.0], [('shift', 16, 16)])]
    """
    counter = CommCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def global_rank(group, rank: int) -> int:
    """The default-group rank of ``rank`` in ``group`` (P2P ops address default-group ranks)."""
    return rank if group is None else dist.get_global_rank(group, rank)


class P2PHandle:
    """Pending transfers of one :func:`p2p` call; :meth:`wait` returns the receive buffers."""

    def __init__(self, works, buffers: list[torch.Tensor], sent: list[torch.Tensor]):
        self._works, self.buffers = works, buffers
        self._sent = sent  # the send buffers stay alive until the transfers complete

    def wait(self) -> list[torch.Tensor]:
        for w in self._works:
            w.wait()
        self._works, self._sent = [], []
        return self.buffers


def p2p(
    sends: Sequence[tuple[torch.Tensor, int]],
    recvs: Sequence[tuple[torch.Tensor, int]],
    group: ProcessGroup | None = None,
    tag: str = "p2p",
) -> P2PHandle:
    """Post sends ``(tensor, peer)`` and receives ``(buffer, peer)`` at once (``batch_isend_irecv``).

    Peers are ranks in ``group``. Both sides must post matching operations in the same order.
    Returns a handle whose ``wait()`` gives the receive buffers in order.
    """
    ops, sent = [], [t.contiguous() for t, _ in sends]
    tag_id = zlib.crc32(tag.encode()) % 2**15  # distinct streams never match each other's messages (gloo)
    for t, (_, peer) in zip(sent, sends):
        ops.append(dist.P2POp(dist.isend, t, global_rank(group, peer), group, tag_id))
    for buf, peer in recvs:
        ops.append(dist.P2POp(dist.irecv, buf, global_rank(group, peer), group, tag_id))
    n_sent = sum(t.numel() * t.element_size() for t in sent)
    n_received = sum(b.numel() * b.element_size() for b, _ in recvs)
    for c in _COUNTERS:
        c.calls.append((tag, n_sent, n_received))
    works = dist.batch_isend_irecv(ops) if ops else []
    return P2PHandle(works, [b for b, _ in recvs], sent)


def shift(
    tensors: Sequence[torch.Tensor],
    send_to: int,
    recv_from: int,
    group: ProcessGroup | None = None,
    tag: str = "shift",
) -> P2PHandle:
    """Send ``tensors`` to rank ``send_to`` and receive tensors of the same shapes and dtypes from
    ``recv_from`` (one ring step when ``send_to = r + 1``, ``recv_from = r - 1``)."""
    buffers = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
    return p2p([(t, send_to) for t in tensors], [(b, recv_from) for b in buffers], group, tag)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    if x.shape[scatter_dim] % world:
        raise ValueError(f"all_to_all: dim {scatter_dim} of shape {tuple(x.shape)} is not divisible by P={world}")
    # [.., P * n, ..] -> [P, .., n, ..]: part p of the scattered dim goes to rank p
    shape = list(x.shape)
    n = shape[scatter_dim] // world
    parts = x.reshape(shape[:scatter_dim] + [world, n] + shape[scatter_dim + 1 :]).movedim(scatter_dim, 0).contiguous()
    out = torch.empty_like(parts)
    moved = parts.numel() * parts.element_size() * (world - 1) // world  # the own part stays
    for c in _COUNTERS:
        c.calls.append(("all_to_all", moved, moved))
    dist.all_to_all_single(out, parts, group=group)
    # out[p] came from rank p: its piece of the gathered dim, placed in rank order
    out = out.movedim(0, gather_dim)  # [.., P, m, ..] at gather_dim (the scattered dim keeps size n)
    new = list(out.shape)
    return out.reshape(new[:gather_dim] + [new[gather_dim] * new[gather_dim + 1]] + new[gather_dim + 2 :])


def all_to_all(
    x: torch.Tensor, group: ProcessGroup | None = None, scatter_dim: int = 2, gather_dim: int = 1
) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` into ``P`` parts, send part ``p`` to rank ``p``, and concatenate
    the received parts along ``gather_dim`` in rank order. Differentiable (the backward is the inverse
    all-to-all). With the defaults, ``[B, T/P, H, D]`` sequence shards become ``[B, T, H/P, D]`` head
    shards (DeepSpeed-Ulysses).

    >>> from effattn.dist import spawn
    >>> def fn(rank, world_size):
    ...     shard = torch.tensor([[[10 * rank + h for h in range(4)]]])  # [B=1, T/P=1, H=4]: value 10 t + h
    ...     return all_to_all(shard, scatter_dim=2, gather_dim=1).tolist()  # [1, T=2, H/P=2]
    >>> spawn(fn, 2)
    [[[[0, 1], [10, 11]]], [[[2, 3], [12, 13]]]]
    """
    scatter_dim, gather_dim = scatter_dim % x.dim(), gather_dim % x.dim()
    if scatter_dim == gather_dim:
        raise ValueError(f"scatter_dim and gather_dim must differ, got {scatter_dim} for both")
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def check_same_shapes(group: ProcessGroup | None = None, **tensors: torch.Tensor | None) -> None:
    """Raise on every rank when the named tensors' shapes (or dtypes) differ between ranks.

    Two all-gathers of a few integers; every rank reaches the same verdict, so none is left waiting.

    >>> from effattn.dist import spawn
    >>> def fn(rank, world_size):
    ...     try:
    ...         check_same_shapes(q=torch.zeros(1, 4 + rank, 2, 8))
    ...     except ValueError as e:
    ...         return str(e).split(": ", 1)[1]
    >>> spawn(fn, 2)[1]
    'rank 0: q (1, 4, 2, 8); rank 1: q (1, 5, 2, 8)'
    """
    items = [(n, t) for n, t in tensors.items() if t is not None]
    code = []
    for _, t in items:
        code += [t.dim(), *t.shape, zlib.crc32(str(t.dtype).encode())]
    # NCCL moves only device tensors; gloo takes CPU ones
    device = items[0][1].device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = torch.tensor([len(code), *code], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, mine[:1], group=group)
    width = max(int(s) for s in sizes) + 1
    padded = torch.full((width,), -1, dtype=torch.int64, device=device)
    padded[: mine.numel()] = mine
    everyone = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(everyone, padded, group=group)
    if any(not torch.equal(e, everyone[0]) for e in everyone):
        described = [f"rank {r}: " + _describe(e.cpu(), [n for n, _ in items]) for r, e in enumerate(everyone)]
        raise ValueError(
            "the ranks passed tensors of different shapes or dtypes (every rank must hold an equal shard): "
            + "; ".join(described)
        )


def _describe(code: torch.Tensor, names: list[str]) -> str:
    vals = code.tolist()[1 : 1 + code[0].item()]
    out, i = [], 0
    for n in names:
        if i >= len(vals):
            break
        nd = vals[i]
        out.append(f"{n} {tuple(vals[i + 1 : i + 1 + nd])}")
        i += nd + 2
    return ", ".join(out)
