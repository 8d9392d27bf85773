"""DeepSpeed-Ulysses: two all-to-alls around any local attention.

Jacobs et al. 2023, "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long
Sequence Transformer Models".

Schedule on ``P`` ranks, each holding a sequence shard ``[B, T/P, H, D]`` of q, k and v:

    all-to-all (sequence shards -> head shards):  [B, T/P, H, D] -> [B, T, H/P, D]
    o_h = attention(q_h, k_h, v_h, ...)              any local effattn.attention call, full sequence
    all-to-all (head shards -> sequence shards):  [B, T, H/P, D_v] -> [B, T/P, H, D_v]

Heads are independent in attention, so the result is exactly the single-process one; every rank sends
and receives ``(P-1)/P`` of its shard per all-to-all (``4 x (P-1)/P x |shard|`` per layer with q, k, v
and o), independent of ``P`` at fixed shard size. The backward of an all-to-all is the inverse
all-to-all (:func:`effattn.dist.all_to_all`), so autograd needs no special code.

Heads must be divisible by ``P``. GQA with ``H_kv`` not divisible by ``P`` (fewer KV heads than ranks):
each KV head is replicated ``lcm(H_kv, P) / H_kv`` times before the all-to-all (a head ``h`` of q still
reads the copy of its own KV head ``h // (H_q / H_kv)``), so each rank receives the KV heads its query
heads need; the copies' gradients are summed back by autograd.
"""

from __future__ import annotations

import math

import torch
from torch.distributed import ProcessGroup

from effattn._checks import check_qkv
from effattn.dist._comm import all_to_all, check_same_shapes
from effattn.dist.layout import check_layout, group_rank_and_size, layout_permutation
from effattn.exact import attention

__all__ = ["heads_to_sequence", "replicate_kv_heads", "sequence_to_heads", "ulysses_attention"]

# attention() arguments that hold one entry per query head: each rank keeps its heads' entries
_PER_HEAD = ("alibi_slopes", "sinks")


def replicate_kv_heads(k: torch.Tensor, heads_q: int, world_size: int) -> torch.Tensor:
    """``k [B, T, H_kv, D]`` with each head repeated so the head count divides by ``world_size``
    (``lcm(H_kv, P)`` heads; unchanged when ``H_kv % P == 0``). Needs ``H_q % P == 0``.

    >>> replicate_kv_heads(torch.zeros(1, 3, 2, 4), heads_q=8, world_size=4).shape
    torch.Size([1, 3, 4, 4])
    """
    hkv = k.shape[2]
    if hkv % world_size == 0:
        return k
    heads = math.lcm(hkv, world_size)
    if heads_q % heads:
        raise ValueError(f"cannot replicate {hkv} KV heads for {heads_q} query heads over P={world_size} ranks")
    return k.repeat_interleave(heads // hkv, dim=2)


def sequence_to_heads(
    x: torch.Tensor, group: ProcessGroup | None = None, layout: str = "contiguous", seq_dim: int = 1, head_dim: int = 2
) -> torch.Tensor:
    """All-to-all ``[B, T/P, H, D]`` sequence shards (laid out by ``layout``) to ``[B, T, H/P, D]``
    head shards in global sequence order. Differentiable.

    >>> from effattn.dist import shard_sequence, spawn
    >>> def fn(rank, world_size):
    ...     x = torch.arange(8.0).view(1, 4, 2, 1).expand(1, 4, 2, 3)  # value 2 t + h
    ...     heads = sequence_to_heads(shard_sequence(x, layout="zigzag"), layout="zigzag")
    ...     back = heads_to_sequence(heads, layout="zigzag")
    ...     return heads[0, :, 0, 0].tolist(), torch.equal(back, shard_sequence(x, layout="zigzag"))
    >>> spawn(fn, 2)
    [([0.0, 2.0, 4.0, 6.0], True), ([1.0, 3.0, 5.0, 7.0], True)]
    """
    _, world = group_rank_and_size(group)
    out = all_to_all(x, group, scatter_dim=head_dim, gather_dim=seq_dim)
    if layout == "zigzag":  # the all-to-all concatenates shards in rank order; restore global order
        perm = layout_permutation(out.shape[seq_dim], world, layout, x.device)
        out = out.index_select(seq_dim, perm.argsort())
    return out


def heads_to_sequence(
    x: torch.Tensor, group: ProcessGroup | None = None, layout: str = "contiguous", seq_dim: int = 1, head_dim: int = 2
) -> torch.Tensor:
    """The inverse of :func:`sequence_to_heads`: ``[B, T, H/P, D]`` to ``[B, T/P, H, D]``. Differentiable
    (example: :func:`sequence_to_heads`)."""
    _, world = group_rank_and_size(group)
    if layout == "zigzag":
        x = x.index_select(seq_dim, layout_permutation(x.shape[seq_dim], world, layout, x.device))
    return all_to_all(x, group, scatter_dim=seq_dim, gather_dim=head_dim)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: ProcessGroup | None = None,
    layout: str = "contiguous",
    return_lse: bool = False,
    check_ranks: bool = True,
    **attention_kwargs,
):
    """Exact attention over a sequence sharded across ``group``, by DeepSpeed-Ulysses.

    Args:
        q, k, v: this rank's shards ``[B, T/P, H, D]`` (k/v may have fewer heads: GQA, replicated when
            needed), laid out by ``layout`` (``"contiguous"`` or ``"zigzag"``,
            :func:`effattn.dist.shard_sequence`).
        group: the process group (``None``: the default group).
        return_lse: also return the LSE shard ``[B, H, T/P]``.
        check_ranks: compare shapes across ranks first (one small all-gather).
        **attention_kwargs: passed to the local :func:`effattn.attention` on the full sequence (``causal``,
            ``window``, ``mask_mod``, ``score_mod``, ``block_mask``, ``scale``, ``softcap``, ``cu_seqlens``,
            ``backend``, ...). Per-head tensors ``alibi_slopes`` and ``sinks`` (``[H]``) are sliced to this
            rank's heads; a ``mask_mod``/``score_mod``/``block_mask`` sees local head indices
            ``0 .. H/P - 1`` (build per-head ones for the local heads).

    Returns ``o [B, T/P, H, D_v]`` (and the LSE), this rank's shard of the single-process result.

    Example (two processes started by :func:`effattn.dist.spawn`)::

        >>> import effattn
        >>> from effattn.dist import shard_sequence, spawn
        >>> def fn(rank, world_size):
        ...     torch.manual_seed(0)
        ...     q, k, v = (torch.randn(1, 32, 4, 40) for _ in range(3))
        ...     o = ulysses_attention(*(shard_sequence(t) for t in (q, k, v)), causal=True, window=8)
        ...     ref = shard_sequence(effattn.attention(q, k, v, causal=True, window=8))
        ...     return (o - ref).abs().max().item()
        >>> [err < 1e-5 for err in spawn(fn, 2)]
        [True, True]
    """
    check_layout(layout)
    rank, world = group_rank_and_size(group)
    check_qkv(q, k, v)
    hq = q.shape[2]
    if hq % world:
        raise ValueError(
            f"ulysses_attention shards heads over the ranks: heads_q ({hq}, q {tuple(q.shape)}) must be divisible "
            f"by P={world}; use ring_attention (any head count) or usp_attention with a smaller Ulysses dimension"
        )
    for name, t in (("q", q), ("k", k)):
        if layout == "zigzag" and t.shape[1] % 2:
            raise ValueError(f"layout 'zigzag' needs an even local length, got {name} {tuple(t.shape)}")
    if check_ranks:
        check_same_shapes(group, q=q, k=k, v=v)
    k, v = replicate_kv_heads(k, hq, world), replicate_kv_heads(v, hq, world)
    kwargs = dict(attention_kwargs)
    for name in _PER_HEAD:
        t = kwargs.get(name)
        if t is not None:
            if not isinstance(t, torch.Tensor) or t.shape != (hq,):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a tensor [heads_q] = [{hq}], got {got}")
            kwargs[name] = t[rank * hq // world : (rank + 1) * hq // world]
    qh, kh, vh = (sequence_to_heads(t, group, layout) for t in (q, k, v))
    if not return_lse:
        return heads_to_sequence(attention(qh, kh, vh, **kwargs), group, layout)
    o, lse = attention(qh, kh, vh, return_lse=True, **kwargs)
    return heads_to_sequence(o, group, layout), heads_to_sequence(lse, group, layout, seq_dim=2, head_dim=1)
