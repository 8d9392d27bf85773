"""float64 shards compute in float64 end to end, as single-process attention does (``compute_dtype``):
the output, LSE and q/k/v (and sinks) gradients of ring attention, TokenRing, Ulysses and USP at P = 2
equal the float64 reference to ~1e-12. A float32 accumulator, lse, message or gradient buffer anywhere
on the way gives errors near 1e-7 and fails."""

from __future__ import annotations

import torch

import effattn
from effattn.dist import (
    ring_attention,
    shard_sequence,
    spawn,
    token_ring_attention,
    ulysses_attention,
    usp_attention,
    usp_shard_sequence,
)
from tests.helpers import rel_rms

TOL = 1e-12  # float64 rounding is ~1e-16; float32 anywhere gives ~1e-7
FNS = {"ring": ring_attention, "token_ring": token_ring_attention, "ulysses": ulysses_attention, "usp": usp_attention}
CASES = [  # (method, layout, causal, softcap and sinks)
    ("ring", "zigzag", True, False),
    ("ring", "contiguous", False, False),
    ("ring", "zigzag", True, True),
    ("token_ring", "zigzag", True, False),
    ("token_ring", "contiguous", False, False),
    ("token_ring", "contiguous", True, True),
    ("ulysses", "zigzag", True, False),
    ("usp", "zigzag", True, False),
]


def _float64_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world, 1))  # USP: a ring of P ranks, Ulysses groups of one
    results = []
    for method, layout, causal, extras in CASES:
        g = torch.Generator().manual_seed(7)
        B, T, Hq, Hkv, D = 2, 8 * world, 4, 2, 20
        q = (torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64) * 2).requires_grad_()
        k = (torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64) * 2).requires_grad_()
        v = torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64).requires_grad_()
        sinks = torch.randn(Hq, generator=g, dtype=torch.float64).requires_grad_()
        do = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64)
        dlse = torch.randn(B, Hq, T, generator=g, dtype=torch.float64)
        kw = {"softcap": 3.0, "sinks": sinks} if extras else {}
        o, lse = effattn.attention(q, k, v, causal=causal, return_lse=True, backend="reference", **kw)
        ((o * do).sum() + (lse * dlse).sum()).backward()

        if method == "usp":

            def shard(t, dim, layout=layout):
                return usp_shard_sequence(t, mesh, layout=layout, dim=dim)
        else:

            def shard(t, dim, layout=layout):
                return shard_sequence(t, layout=layout, dim=dim)

        local = [shard(t.detach(), 1).requires_grad_() for t in (q, k, v)]
        s = sinks.detach().clone().requires_grad_()
        lkw = {"softcap": 3.0, "sinks": s} if extras else {}
        if method == "usp":
            lkw["mesh"] = mesh
        o_l, lse_l = FNS[method](*local, causal=causal, layout=layout, return_lse=True, **lkw)
        ((o_l * shard(do, 1)).sum() + (lse_l * shard(dlse, 2)).sum()).backward()
        errs = {"o": rel_rms(o_l, shard(o.detach(), 1)), "lse": rel_rms(lse_l, shard(lse.detach(), 2))}
        for name, t_l, t in zip(("dq", "dk", "dv"), local, (q, k, v)):
            errs[name] = rel_rms(t_l.grad, shard(t.grad, 1))
        if extras:
            ds = s.grad.clone()
            torch.distributed.all_reduce(ds)  # each rank holds its share of the replicated weight's gradient
            errs["dsinks"] = rel_rms(ds, sinks.grad)
        dtypes = {str(t.dtype) for t in (o_l, lse_l, *(t.grad for t in local))}
        results.append((f"rank {rank} {method} {layout} causal={causal} softcap+sinks={extras}", errs, dtypes))
    return results


def test_float64_shards_match_the_float64_reference():
    per_rank = spawn(_float64_worker, 2, timeout=60, deadline=180)
    assert len(per_rank) == 2 and all(len(r) == len(CASES) for r in per_rank)
    for results in per_rank:
        for case, errs, dtypes in results:
            assert dtypes == {"torch.float64"}, (case, dtypes)
            for name, err in errs.items():
                assert err < TOL, f"{case}: {name} relative RMS error {err:.3g} >= {TOL:g}"
