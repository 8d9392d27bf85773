"""LASP-2: sequence parallelism for the linear-attention / SSM family (``effattn.linear``).

Every op of the family is a recurrence on a state; over a contiguous piece of the sequence its
effect on the state is an affine map. For the ops whose transition is a diagonal decay (linear
attention, RetNet, Lightning Attention, simple GLA / Mamba-2 SSD, GLA, the Mamba selective scan)
that map is ``S -> Lambda * S + U`` (``*`` elementwise, broadcast), so rank ``r`` of ``P`` holding
tokens ``T_r`` needs only

    U_r      = the final state of its shard from a zero initial state,
    Lambda_r = exp(sum of its log-decays)  (the product of its per-token decays),

and the initial state of rank ``r`` is the prefix combine

    S_in(0) = S_0,     S_in(r) = Lambda_{r-1} * S_in(r-1) + U_{r-1},

after ONE all-gather of ``(U_r, Lambda_r)`` (packed into one buffer). Each rank then runs the op's
chunk form on its shard from ``S_in(r)``. The backward runs through the same pieces: the gradient
of ``S_in(r)`` flows back through the combine into the gathered buffer, and the all-gather's
backward is one all-reduce of that buffer's gradient, from which each rank takes its own row.
Communication per rank: ``P`` states (``B H K V`` floats each) in the forward and the backward,
independent of the sequence length. Compute: the chunk form runs twice per shard (once from zero
for ``U_r``, once from ``S_in(r)`` for the output); a kernel with a state-only pass would make the
first one a ``k^T v`` product.

Ops whose transition is not a diagonal decay (DeltaNet and Gated DeltaNet's ``I - beta k k^T``,
Mixture-of-Memories, Aaren's running softmax) have no cheap state-to-state summary: they use the
sequential pass of LASP-1 -- rank ``r`` receives ``S_in(r)`` from rank ``r - 1``, runs its shard,
sends its final state to rank ``r + 1``; the backward sends the gradient of ``S_in(r)`` back to
rank ``r - 1``. Correct for any op with an ``initial_state`` argument, but the ``P`` ranks run one
after the other: ``P`` sequential steps, no speed-up over one device (memory still falls as 1/P).

Conventions. Sequence tensors (those with a time dimension) are the local contiguous shards, in
rank order (shard ``r`` holds tokens ``r T/P .. (r+1) T/P - 1``; shards may have different
lengths). Replicated inputs (per-head decays, Mamba's ``A``, ``D``, ``delta_bias``, the global
``initial_state``) are passed whole on every rank; their gradients on each rank are partial, and
their sum over ranks (an all-reduce, as data parallelism does for weights) is the single-process
gradient. With ``output_final_state=True`` every rank returns the global final state; its gradient
is likewise summed over the ranks' copies.

References: Sun, Qin, Sun, Zhong, "Linear Attention Sequence Parallelism" (LASP), 2024; Sun, Lan,
Zhong, Qu, Qin, "LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid", 2025.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.autograd import Function

from effattn.dist._comm import check_same_shapes
from effattn.linear import (
    REGISTRY,
    LinearOp,
    chunk_gla,
    chunk_lightning_attn,
    chunk_linear_attn,
    chunk_retention,
    chunk_selective_scan,
    chunk_simple_gla,
    lightning_log_decay,
    retention_log_decay,
)

__all__ = ["lasp2", "lasp_schedule"]

# Log-decays are clamped here as the chunk kernels do (exp of it is 0 in float32).
_LOG_DECAY_FLOOR = -1e4

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------------------------
# process-group helpers
# ----------------------------------------------------------------------------------------------


def _rank_size(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _global_rank(group, r: int) -> int:
    return r if group is None else dist.get_global_rank(group, r)


def _send_meta(tensors: tuple[torch.Tensor, ...], dst: int, group) -> None:
    dist.send(_meta(tensors).to(tensors[0].device), dst, group=group)


def _meta(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``[n, (dtype, ndim, *shape) per tensor]`` in a fixed 64-int buffer."""
    m = [len(tensors)]
    for t in tensors:
        m += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
    if len(m) > 64:
        raise ValueError(f"state has too many components/dims to describe in 64 ints: {m}")
    return torch.tensor(m + [0] * (64 - len(m)), dtype=torch.int64)


def _empty_from_meta(meta: torch.Tensor, device) -> list[torch.Tensor]:
    m = meta.tolist()
    out, i = [], 1
    for _ in range(m[0]):
        dt, nd = _DTYPES[m[i]], m[i + 1]
        out.append(torch.empty(m[i + 2 : i + 2 + nd], dtype=dt, device=device))
        i += 2 + nd
    return out


# ----------------------------------------------------------------------------------------------
# differentiable collectives
# ----------------------------------------------------------------------------------------------


class _AllGatherPacked(Function):
    """All-gather of several tensors packed into one buffer; returns each as ``[P, *shape]``.

    Backward: the gradients of the gathered tensors (every rank's view of every slot) are summed
    over ranks by one all-reduce; each rank keeps its own slot's sum."""

    @staticmethod
    def forward(ctx, group, rank, world, *tensors):
        ctx.group, ctx.rank, ctx.world = group, rank, world
        ctx.meta = [(t.shape, t.dtype) for t in tensors]
        ctx.dtype, ctx.device = tensors[0].dtype, tensors[0].device
        flat = torch.cat([t.detach().reshape(-1).to(ctx.dtype) for t in tensors])
        rows = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(rows, flat, group=group)
        out = torch.stack(rows)
        pieces, i = [], 0
        for s, dt in ctx.meta:
            n = s.numel()
            pieces.append(out[:, i : i + n].reshape(world, *s).to(dt))
            i += n
        return tuple(pieces)

    @staticmethod
    def backward(ctx, *grads):
        cols = []
        for g, (s, dt) in zip(grads, ctx.meta, strict=True):
            g = g if g is not None else torch.zeros(ctx.world, *s, dtype=dt, device=ctx.device)
            cols.append(g.reshape(ctx.world, -1).to(ctx.dtype))
        flat = torch.cat(cols, dim=1).contiguous()
        dist.all_reduce(flat, group=ctx.group)
        mine, out, i = flat[ctx.rank], [], 0
        for s, dt in ctx.meta:
            n = s.numel()
            out.append(mine[i : i + n].reshape(s).to(dt))
            i += n
        return (None, None, None, *out)


class _Tie(Function):
    """``o`` unchanged; ``others`` get zero gradients. Makes every rank's backward reach a
    collective's backward even where its output does not depend on the collective's result
    (rank 0's output does not depend on the gathered states), so no rank waits forever."""

    @staticmethod
    def forward(ctx, o, *others):
        ctx.meta = [(t.shape, t.dtype, t.device) for t in others]
        return o.view_as(o)

    @staticmethod
    def backward(ctx, grad_o):
        return (grad_o, *[torch.zeros(s, dtype=dt, device=dev) for s, dt, dev in ctx.meta])


class _RecvState(Function):
    """Receive a (tuple) state from ``src``; backward sends its gradient back to ``src``.
    ``anchor`` is any input that requires grad, so that this node is part of the backward."""

    @staticmethod
    def forward(ctx, anchor, group, src, device):
        ctx.group, ctx.src = group, src
        meta = torch.empty(64, dtype=torch.int64, device=device)  # NCCL moves device tensors only
        dist.recv(meta, src, group=group)
        bufs = _empty_from_meta(meta, device)
        for b in bufs:
            dist.recv(b, src, group=group)
        ctx.meta = [(b.shape, b.dtype, b.device) for b in bufs]
        return tuple(bufs)

    @staticmethod
    def backward(ctx, *grads):
        for g, (s, dt, dev) in zip(grads, ctx.meta, strict=True):
            g = g if g is not None else torch.zeros(s, dtype=dt, device=dev)
            dist.send(g.contiguous(), ctx.src, group=ctx.group)
        return None, None, None, None


class _SendState(Function):
    """``o`` unchanged; sends the (tuple) state to ``dst``; backward receives its gradient from ``dst``."""

    @staticmethod
    def forward(ctx, group, dst, o, *state):
        ctx.group, ctx.dst = group, dst
        ctx.meta = [(s.shape, s.dtype, s.device) for s in state]
        _send_meta(tuple(s.detach() for s in state), dst, group)
        for s in state:
            dist.send(s.detach().contiguous(), dst, group=group)
        return o.view_as(o)

    @staticmethod
    def backward(ctx, grad_o):
        grads = []
        for s, dt, dev in ctx.meta:
            g = torch.empty(s, dtype=dt, device=dev)
            dist.recv(g, ctx.dst, group=ctx.group)
            grads.append(g)
        return (None, None, grad_o, *grads)


class _BroadcastState(Function):
    """``o`` unchanged, plus the (tuple) state of rank ``src`` on every rank; backward sums the
    state gradients of all ranks (one all-reduce) into ``src``'s state. Taking ``o`` as input puts
    this node on every rank's backward path."""

    @staticmethod
    def forward(ctx, group, src, is_src, device, o, *state):
        ctx.group, ctx.is_src = group, is_src
        if is_src:
            meta = _meta(tuple(s.detach() for s in state)).to(device)
        else:
            meta = torch.empty(64, dtype=torch.int64, device=device)
        dist.broadcast(meta, src, group=group)
        bufs = [s.detach().clone() for s in state] if is_src else _empty_from_meta(meta, device)
        for b in bufs:
            dist.broadcast(b, src, group=group)
        ctx.meta = [(b.shape, b.dtype, b.device) for b in bufs]
        ctx.n_state = len(state)
        return (o.view_as(o), *bufs)

    @staticmethod
    def backward(ctx, grad_o, *grads):
        summed = []
        for g, (s, dt, dev) in zip(grads, ctx.meta, strict=True):
            g = (g if g is not None else torch.zeros(s, dtype=dt, device=dev)).contiguous().clone()
            dist.all_reduce(g, group=ctx.group)
            summed.append(g)
        state_grads = summed if ctx.is_src else [None] * ctx.n_state
        return (None, None, None, None, grad_o, *state_grads)


# ----------------------------------------------------------------------------------------------
# per-op decays (the diagonal transition of a whole shard)
# ----------------------------------------------------------------------------------------------


def _arg(args: tuple, kw: dict, index: int, name: str):
    return args[index] if len(args) > index else kw.get(name)


def _sum_log(g: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return g.clamp(min=_LOG_DECAY_FLOOR).double().sum(dim).exp()


def _decay_scalar(args, kw, state):
    g = _arg(args, kw, 3, "g")  # [B, T, H]
    return (_sum_log(g).to(state[0].dtype)[..., None, None],)


def _decay_vector(args, kw, state):
    gk = _arg(args, kw, 3, "gk")  # [B, T, H, K]
    return (_sum_log(gk).to(state[0].dtype)[..., None],)


def _decay_per_head(default: Callable[[int], torch.Tensor]):
    def decay(args, kw, state):
        q = args[0]
        ld = _arg(args, kw, 3, "log_decay")
        if ld is None:
            ld = default(q.shape[2]).to(q.device)
        T = q.shape[1]
        lam = (ld.clamp(min=_LOG_DECAY_FLOOR).double() * T).exp().to(state[0].dtype)
        return (lam.view(1, -1, 1, 1),)

    return decay


def _decay_none(args, kw, state):
    return tuple(None for _ in state)


def _decay_probe(args, kw, state):
    """Run the op on zero inputs (``x = 0``: nothing enters the state) from a state of ones: the
    final state is the elementwise decay of the shard (Mamba's ``exp(A sum dt)``)."""
    x = args[0]
    ones = tuple(torch.ones_like(s) for s in state)
    _, lam = chunk_selective_scan(
        torch.zeros_like(x), *args[1:], **kw, initial_state=_untuple(ones), output_final_state=True
    )
    return _tuple(lam)


# chunk function -> how to get its shard decay; any other op uses the sequential pass
_DECAYS: dict[Callable, Callable] = {
    chunk_linear_attn: _decay_none,
    chunk_simple_gla: _decay_scalar,
    chunk_gla: _decay_vector,
    chunk_retention: _decay_per_head(retention_log_decay),
    chunk_lightning_attn: _decay_per_head(lightning_log_decay),
    chunk_selective_scan: _decay_probe,
}


def _tuple(s) -> tuple[torch.Tensor, ...]:
    return s if isinstance(s, tuple) else (s,)


def _untuple(s: tuple[torch.Tensor, ...] | None, like_tuple: bool = False):
    if s is None:
        return None
    return s if (like_tuple or len(s) != 1) else s[0]


def _resolve(op: str | LinearOp) -> LinearOp:
    if isinstance(op, LinearOp):
        return op
    if isinstance(op, str) and op in REGISTRY:
        return REGISTRY[op]
    raise ValueError(f"op must be a LinearOp or a registered linear op name {sorted(REGISTRY)}, got {op!r}")


def lasp_schedule(op: str | LinearOp) -> str:
    """``"allgather"`` (LASP-2: one all-gather of shard states and decays) for the ops whose state
    transition is a diagonal decay, ``"sequential"`` (LASP-1's state pass, ``P`` steps) otherwise.

    >>> lasp_schedule("simple_gla"), lasp_schedule("delta_rule")
    ('allgather', 'sequential')
    """
    return "allgather" if _resolve(op).chunk in _DECAYS else "sequential"


# ----------------------------------------------------------------------------------------------
# the two schedules
# ----------------------------------------------------------------------------------------------


def _allgather(op: LinearOp, args, kw, initial_state, output_final_state, group, rank, world):
    _, U = op.chunk(*args, **kw, initial_state=None, output_final_state=True)
    was_tuple = isinstance(U, tuple)
    U = _tuple(U)
    lam = _DECAYS[op.chunk](args, kw, U)
    has = [d is not None for d in lam]
    parts = list(U) + [d for d in lam if d is not None]
    gathered = _AllGatherPacked.apply(group, rank, world, *parts)
    Ug, lam_g = gathered[: len(U)], iter(gathered[len(U) :])
    lam_g = [next(lam_g) if h else None for h in has]
    S0 = None if initial_state is None else tuple(s.to(u.dtype) for s, u in zip(_tuple(initial_state), U, strict=True))

    def advance(S, j):
        if S is None:
            return tuple(u[j] for u in Ug)
        return tuple(s * (d[j] if d is not None else 1) + u[j] for s, d, u in zip(S, lam_g, Ug, strict=True))

    S = S0
    for j in range(rank):
        S = advance(S, j)
    o, _ = op.chunk(*args, **kw, initial_state=_untuple(S, was_tuple), output_final_state=False)
    o = _Tie.apply(o, *gathered)
    final = None
    if output_final_state:
        for j in range(rank, world):
            S = advance(S, j)
        final = _untuple(S, was_tuple)
    return o, final


def _anchor(args, kw, initial_state) -> torch.Tensor | None:
    for t in (*args, *kw.values(), *(_tuple(initial_state) if initial_state is not None else ())):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return t
    return None


def _sequential(op: LinearOp, args, kw, initial_state, output_final_state, group, rank, world):
    S = initial_state
    if rank > 0:
        anchor = _anchor(args, kw, initial_state)
        anchor = anchor if anchor is not None else torch.zeros(())
        received = _RecvState.apply(anchor, group, _global_rank(group, rank - 1), args[0].device)
        S = received if len(received) != 1 else received[0]
    o, final = op.chunk(*args, **kw, initial_state=S, output_final_state=True)
    was_tuple = isinstance(final, tuple)
    if rank < world - 1:
        o = _SendState.apply(group, _global_rank(group, rank + 1), o, *_tuple(final))
    if not output_final_state:
        return o, None
    last = world - 1
    mine = _tuple(final) if rank == last else ()
    o, *fin = _BroadcastState.apply(group, _global_rank(group, last), rank == last, args[0].device, o, *mine)
    return o, _untuple(tuple(fin), was_tuple)


def lasp2(
    op: str | LinearOp,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *gates: torch.Tensor,
    group=None,
    initial_state: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    output_final_state: bool = False,
    check_ranks: bool = True,
    **kw,
) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, ...] | None]:
    """A linear-family op on contiguous sequence shards, equal to ``op.chunk`` on the whole sequence.

    ``op`` is a registered name (``effattn.linear.REGISTRY``) or a :class:`LinearOp`; ``q, k, v,
    *gates`` and ``**kw`` are the op's own arguments with the local shard of every sequence tensor
    (Mamba: ``x, delta, A, Bm, Cm``). Diagonal-decay ops use LASP-2 (one all-gather of
    ``(U_r, Lambda_r)``, the prefix combine ``S_in(r) = Lambda_{r-1} S_in(r-1) + U_{r-1}``);
    the others the sequential LASP-1 pass (``P`` steps); see :func:`lasp_schedule` and the module
    docstring. Returns ``(o_local, final_state or None)``; the final state is the global one, on
    every rank. Without an initialized process group it is the op on one process. ``check_ranks``
    compares the inputs' shapes (all but the sequence length) across ranks first, so a mismatch
    raises on every rank instead of leaving one waiting in a collective.

    Sun et al., "LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid", 2025.

    >>> import torch
    >>> from effattn.linear import chunk_simple_gla
    >>> q, k, v = (torch.randn(1, 20, 2, 8) for _ in range(3))
    >>> g = -torch.rand(1, 20, 2)
    >>> o, s = lasp2("simple_gla", q, k, v, g, output_final_state=True)
    >>> o_ref, s_ref = chunk_simple_gla(q, k, v, g, output_final_state=True)
    >>> bool(torch.allclose(o, o_ref, atol=1e-5)), bool(torch.allclose(s, s_ref, atol=1e-5))
    (True, True)
    """
    op = _resolve(op)
    if kw.get("cu_seqlens") is not None:
        raise ValueError(
            "lasp2 does not take cu_seqlens: shard one sequence per batch row (packed sequences would "
            "cross shard boundaries)"
        )
    kw.pop("cu_seqlens", None)
    rank, world = _rank_size(group)
    args = (q, k, v, *gates)
    if world == 1:
        return op.chunk(*args, **kw, initial_state=initial_state, output_final_state=output_final_state)
    if check_ranks:
        T = q.shape[1]
        named = {f"arg{i}": a for i, a in enumerate(args)} | {n: t for n, t in kw.items()}
        if initial_state is not None:
            named |= {f"initial_state{i}": s for i, s in enumerate(_tuple(initial_state))}
        check_same_shapes(
            group,
            **{
                n: (t[:, :0] if t.dim() >= 2 and t.shape[1] == T else t)
                for n, t in named.items()
                if isinstance(t, torch.Tensor)
            },
        )
    schedule = _allgather if op.chunk in _DECAYS else _sequential
    return schedule(op, args, kw, initial_state, output_final_state, group, rank, world)
