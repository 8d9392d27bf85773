"""A differentiable ``all_to_all_single`` for expert parallelism (``torch.distributed`` only).

Forward sends ``in_splits[r]`` rows to rank ``r`` and receives ``out_splits[r]`` rows from it; the
backward is the same exchange with the splits swapped (the gradient of a row goes back where the row
came from). With ``pending`` (a list), the forward is started with ``async_op=True`` and its work handle
appended to the list: the caller must ``wait()`` before reading the result (the overlapped schedule of
:class:`effattn.moe.MoE` with ``ep_chunks > 1``). The backward exchange is synchronous.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_to_all", "AllToAllWork"]


class AllToAllWork:
    """An in-flight forward exchange: its work handle and the buffers it must keep alive."""

    def __init__(self, work, *buffers: torch.Tensor):
        self.work, self.buffers = work, buffers

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, pending):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        x = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=pending is not None)
        if pending is not None:
            pending.append(AllToAllWork(work, x, out))
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        gx = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(gx, grad, ctx.in_splits, ctx.out_splits, group=ctx.group)
        return gx, None, None, None, None


def all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None, pending: list | None = None
) -> torch.Tensor:
    """Rows of ``x`` split by ``in_splits`` go to ranks ``0..P-1``; returns the ``sum(out_splits)`` rows received.

    Differentiable; ``pending`` makes the forward asynchronous (see the module docstring). Every rank of
    ``group`` must call it with matching splits (rank ``r``'s ``in_splits[s]`` is rank ``s``'s
    ``out_splits[r]``).
    """
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group, pending)
