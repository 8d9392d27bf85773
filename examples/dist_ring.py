"""Sequence parallelism on the CPU: ring attention, Ulysses, the halo exchange and LASP-2 on shards.

Run with torchrun (any number of processes that divides the sizes below)::

    torchrun --nproc-per-node 2 examples/dist_ring.py

or without it (the script then starts 2 local processes itself with ``effattn.dist.spawn``)::

    python examples/dist_ring.py

Every rank builds the same full inputs (seeded), keeps its shard, runs each method on the shards,
gathers the outputs and compares them with the single-process op on the whole sequence.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import effattn
from effattn.dist import (
    gather_sequence,
    halo_attention,
    lasp2,
    ring_attention,
    shard_sequence,
    spawn,
    ulysses_attention,
)
from effattn.linear import chunk_simple_gla


def main(rank: int, world: int) -> dict[str, float]:
    torch.manual_seed(0)  # the same full tensors on every rank
    B, T, H, D = 1, 64 * world, 4, 32
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    g = -0.1 * torch.rand(B, T, H)  # log-decays for simple GLA
    errors = {}

    # ring attention, zigzag layout (balanced causal work)
    qs, ks, vs = (shard_sequence(x, layout="zigzag") for x in (q, k, v))
    o = gather_sequence(ring_attention(qs, ks, vs, causal=True, layout="zigzag"), layout="zigzag")
    errors["ring"] = (o - effattn.attention(q, k, v, causal=True)).abs().max().item()

    # Ulysses (heads divisible by the world size), halo (sliding window) and LASP-2: contiguous shards
    qs, ks, vs, gs = (shard_sequence(x) for x in (q, k, v, g))
    if H % world == 0:
        o = gather_sequence(ulysses_attention(qs, ks, vs, causal=True))
        errors["ulysses"] = (o - effattn.attention(q, k, v, causal=True)).abs().max().item()
    o = gather_sequence(halo_attention(qs, ks, vs, window=40))
    errors["halo"] = (o - effattn.attention(q, k, v, causal=True, window=40)).abs().max().item()
    o, state = lasp2("simple_gla", qs, ks, vs, gs, output_final_state=True)
    o_ref, state_ref = chunk_simple_gla(q, k, v, g, output_final_state=True)
    errors["lasp2"] = max((gather_sequence(o) - o_ref).abs().max().item(), (state - state_ref).abs().max().item())
    if rank == 0:
        for name, err in errors.items():
            print(f"{name:>8}: max |distributed - single process| = {err:.2e}  (world size {world})")
    return errors


if __name__ == "__main__":
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        main(dist.get_rank(), dist.get_world_size())
        dist.destroy_process_group()
    else:
        spawn(main, 2)
