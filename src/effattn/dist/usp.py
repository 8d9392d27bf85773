"""USP: Unified Sequence Parallelism, Ulysses inside the inner mesh dimension x ring across the outer.

Fang & Zhao 2024, "USP: A Unified Sequence Parallelism Approach for Long Context Generative AI".

On a 2-D ``DeviceMesh`` of ``P_r x P_u`` ranks (ring dimension outer, e.g. across nodes; Ulysses
dimension inner, e.g. within a node where all-to-all is cheap):

* the sequence is split over the ring dimension by ``layout`` (zigzag or contiguous), and each ring
  shard is split contiguously over the Ulysses dimension: rank ``(i, j)`` holds the ``j``-th of ``P_u``
  pieces of ring shard ``i`` (:func:`usp_shard_positions`);
* an all-to-all within the Ulysses group turns ``[B, T/(P_r P_u), H, D]`` into the ring shard
  ``[B, T/P_r, H/P_u, D]`` for ``H/P_u`` heads;
* :func:`effattn.dist.ring_attention` over the ring group computes those heads over the whole sequence;
* the inverse all-to-all returns ``[B, T/(P_r P_u), H, D_v]``.

Heads must be divisible by ``P_u`` only (not by the world size); ring traffic is about ``P_u`` times smaller
than a ring over all ranks. ``P_u = 1`` is plain ring attention, ``P_r = 1`` plain Ulysses.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from effattn._checks import check_int, check_qkv
from effattn.dist._comm import check_same_shapes
from effattn.dist.layout import check_layout, check_shardable, gather_sequence, shard_positions, shard_sequence
from effattn.dist.ring import ring_attention
from effattn.dist.ulysses import heads_to_sequence, replicate_kv_heads, sequence_to_heads

__all__ = ["usp_attention", "usp_gather_sequence", "usp_groups", "usp_shard_positions", "usp_shard_sequence"]


def usp_groups(mesh: DeviceMesh, ring_dim: int | str = 0, ulysses_dim: int | str = 1):
    """``(ring_group, ulysses_group)`` of a 2-D ``DeviceMesh``.

    >>> from torch.distributed.device_mesh import init_device_mesh
    >>> from effattn.dist import spawn
    >>> def fn(rank, world_size):
    ...     ring, ulysses = usp_groups(init_device_mesh("cpu", (2, 2)))
    ...     return torch.distributed.get_process_group_ranks(ring), torch.distributed.get_process_group_ranks(ulysses)
    >>> spawn(fn, 4)[1]
    ([1, 3], [0, 1])
    """
    if getattr(mesh, "ndim", None) != 2:
        raise ValueError(f"mesh must be a 2-D DeviceMesh (ring x ulysses), got {mesh!r}")
    if ring_dim == ulysses_dim:
        raise ValueError(f"ring_dim and ulysses_dim must differ, got {ring_dim!r} for both")
    return mesh.get_group(ring_dim), mesh.get_group(ulysses_dim)


def usp_shard_positions(
    seq_len: int,
    ring_rank: int,
    ring_size: int,
    ulysses_rank: int,
    ulysses_size: int,
    layout: str = "zigzag",
    device=None,
) -> torch.Tensor:
    """Global positions held by rank ``(ring_rank, ulysses_rank)``: the ``ulysses_rank``-th contiguous
    piece of the ring shard ``ring_rank``.

    >>> usp_shard_positions(16, 0, 2, 1, 2, layout="zigzag").tolist()
    [12, 13, 14, 15]
    """
    ring = shard_positions(seq_len, ring_rank, ring_size, layout, device)
    check_int("ulysses_rank", ulysses_rank, minimum=0, maximum=ulysses_size - 1)
    n = check_shardable(ring.numel(), ulysses_size, "contiguous", name="the ring shard's length")
    return ring[ulysses_rank * n : (ulysses_rank + 1) * n]


def usp_shard_sequence(
    x: torch.Tensor,
    mesh: DeviceMesh,
    layout: str = "zigzag",
    dim: int = 1,
    ring_dim: int | str = 0,
    ulysses_dim: int | str = 1,
) -> torch.Tensor:
    """This rank's USP shard of a full sequence ``x`` (ring layout, then contiguous over Ulysses).

    >>> from torch.distributed.device_mesh import init_device_mesh
    >>> from effattn.dist import spawn
    >>> def fn(rank, world_size):
    ...     mesh = init_device_mesh("cpu", (2, 2))
    ...     shard = usp_shard_sequence(torch.arange(16).view(1, 16), mesh, layout="zigzag")
    ...     return shard.tolist(), torch.equal(usp_gather_sequence(shard, mesh), torch.arange(16).view(1, 16))
    >>> spawn(fn, 4)
    [([[0, 1, 2, 3]], True), ([[12, 13, 14, 15]], True), ([[4, 5, 6, 7]], True), ([[8, 9, 10, 11]], True)]
    """
    ring_group, ulysses_group = usp_groups(mesh, ring_dim, ulysses_dim)
    return shard_sequence(shard_sequence(x, ring_group, layout, dim), ulysses_group, "contiguous", dim)


def usp_gather_sequence(
    x: torch.Tensor,
    mesh: DeviceMesh,
    layout: str = "zigzag",
    dim: int = 1,
    ring_dim: int | str = 0,
    ulysses_dim: int | str = 1,
) -> torch.Tensor:
    """The full sequence from every rank's USP shard (inverse of :func:`usp_shard_sequence`, whose
    example uses it)."""
    ring_group, ulysses_group = usp_groups(mesh, ring_dim, ulysses_dim)
    return gather_sequence(gather_sequence(x, ulysses_group, "contiguous", dim), ring_group, layout, dim)


def usp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mesh: DeviceMesh,
    causal: bool = False,
    layout: str = "zigzag",
    return_lse: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    ring_dim: int | str = 0,
    ulysses_dim: int | str = 1,
    check_ranks: bool = True,
):
    """Exact attention over a sequence sharded across a 2-D mesh by USP (Ulysses x ring).

    Args:
        q, k, v: this rank's shards ``[B, T/P, H, D]`` as laid out by :func:`usp_shard_sequence` (GQA:
            KV heads replicated over the Ulysses dimension when fewer).
        mesh: a 2-D ``torch.distributed.device_mesh.DeviceMesh``; ``ring_dim`` and ``ulysses_dim`` name
            its dimensions (index or name).
        causal, layout, return_lse, scale, backend: as in :func:`effattn.dist.ring_attention` (``layout``
            is the ring dimension's layout).

    Returns ``o [B, T/P, H, D_v]`` (and the LSE ``[B, H, T/P]``).

    Example (four processes, a 2 x 2 mesh)::

        >>> import effattn
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> from effattn.dist import spawn
        >>> def fn(rank, world_size):
        ...     mesh = init_device_mesh("cpu", (2, 2))
        ...     torch.manual_seed(0)
        ...     q, k, v = (torch.randn(1, 32, 4, 24) for _ in range(3))
        ...     o = usp_attention(*(usp_shard_sequence(t, mesh) for t in (q, k, v)), mesh=mesh, causal=True)
        ...     ref = usp_shard_sequence(effattn.attention(q, k, v, causal=True), mesh)
        ...     return (o - ref).abs().max().item()
        >>> [err < 1e-5 for err in spawn(fn, 4)]
        [True, True, True, True]
    """
    check_layout(layout)
    ring_group, ulysses_group = usp_groups(mesh, ring_dim, ulysses_dim)
    pu = torch.distributed.get_world_size(ulysses_group)
    check_qkv(q, k, v)
    if q.shape[2] % pu:
        raise ValueError(
            f"usp_attention shards heads over the Ulysses dimension: heads_q ({q.shape[2]}, q {tuple(q.shape)}) must "
            f"be divisible by its size {pu}"
        )
    if check_ranks:
        for g in (ulysses_group, ring_group):
            check_same_shapes(g, q=q, k=k, v=v)
    k, v = replicate_kv_heads(k, q.shape[2], pu), replicate_kv_heads(v, q.shape[2], pu)
    qh, kh, vh = (sequence_to_heads(t, ulysses_group) for t in (q, k, v))
    o, lse = ring_attention(
        qh,
        kh,
        vh,
        causal=causal,
        group=ring_group,
        layout=layout,
        return_lse=True,
        scale=scale,
        backend=backend,
        check_ranks=False,
    )
    o = heads_to_sequence(o, ulysses_group)
    if not return_lse:
        return o
    return o, heads_to_sequence(lse, ulysses_group, seq_dim=2, head_dim=1)
