"""Combiner-Mixture: heads split between Combiner-Fixed and Combiner-Axial, checked against a dense
statement of both factorizations built here (per query: softmax over [direct keys | region means])."""

import pytest
import torch

from effattn.sparse import (
    combiner_attention,
    combiner_axial_attention,
    combiner_mixture_attention,
    combiner_mixture_reference,
)
from tests.sparse._blockwise_checks import assert_no_lookahead, assert_same_fwd_bwd, qkv

CAUSAL = pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])


def _factorization(T, *, block=None, width=None, causal):
    """The factorization as tables (plain Python loops): ``direct [T][T]`` (0/1) and, per query, the
    summarized regions as rows of a mean matrix ``M [R, T]`` with ``sees [T][R]`` (Fixed: own block +
    one mean per other/earlier block; Axial: own row + per column the mean of the other/earlier rows)."""
    n = block or width
    regions, sees, direct = [], [[0] * 0 for _ in range(T)], [[0] * T for _ in range(T)]
    index = {}
    for t in range(T):
        r = t // n
        for j in range(r * n, min(T, r * n + n)):
            direct[t][j] = int(not causal or j <= t)
        if block:
            others = range(r) if causal else [c for c in range(-(-T // n)) if c != r]
            groups = [tuple(range(c * n, min(T, c * n + n))) for c in others]
        else:
            rows = range(r) if causal else [r2 for r2 in range(-(-T // n)) if r2 != r]
            groups = [tuple(r2 * n + c for r2 in rows if r2 * n + c < T) for c in range(n)]
        for g in groups:
            if g:
                if g not in index:
                    index[g] = len(regions)
                    regions.append(g)
                sees[t].append(index[g])
    M = torch.zeros(max(1, len(regions)), T, dtype=torch.float64)
    for i, g in enumerate(regions):
        M[i, list(g)] = 1.0 / len(g)
    seen = torch.zeros(T, M.shape[0], dtype=torch.bool)
    for t in range(T):
        seen[t, sees[t]] = True
    return torch.tensor(direct, dtype=torch.bool), M, seen


def _dense_mixture(q, k, v, *, block, width, fixed_heads, causal):
    """Float64 dense softmax over ``[K | M K]`` with the factorization's table, per head."""
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    qd, kd, vd = q.double(), k.double().repeat_interleave(G, 2), v.double().repeat_interleave(G, 2)
    out = []
    for h in range(Hq):
        kw = dict(block=block) if h < fixed_heads else dict(width=width)
        direct, M, seen = _factorization(T, causal=causal, **kw)
        keys = torch.cat([kd[:, :, h], torch.einsum("rt,btd->brd", M, kd[:, :, h])], 1)
        vals = torch.cat([vd[:, :, h], torch.einsum("rt,btd->brd", M, vd[:, :, h])], 1)
        s = torch.einsum("bqd,bjd->bqj", qd[:, :, h], keys) * D**-0.5
        p = s.masked_fill(~torch.cat([direct, seen], 1), float("-inf")).softmax(-1)
        out.append(torch.einsum("bqj,bjd->bqd", p, vals))
    return torch.stack(out, 2)


@CAUSAL
@pytest.mark.parametrize(
    "T,block,width,Hq,Hkv,fixed_heads",
    [(41, 6, 7, 4, 2, 2), (37, 5, 6, 3, 1, 1), (23, 4, 4, 6, 3, 3)],
)
def test_matches_dense_factorization(causal, T, block, width, Hq, Hkv, fixed_heads):
    q, k, v = qkv(B=2, T=T, Hq=Hq, Hkv=Hkv, D=8)
    o = combiner_mixture_attention(q, k, v, block=block, width=width, fixed_heads=fixed_heads, causal=causal)
    ref = _dense_mixture(
        q.detach(), k.detach(), v.detach(), block=block, width=width, fixed_heads=fixed_heads, causal=causal
    )
    torch.testing.assert_close(o.double(), ref, atol=2e-6, rtol=1e-5)


@CAUSAL
def test_matches_reference_fwd_bwd(causal):
    q, k, v = qkv(T=63, Hq=4, Hkv=2)
    kw = dict(block=9, width=8, causal=causal)
    assert_same_fwd_bwd(combiner_mixture_attention(q, k, v, **kw), combiner_mixture_reference(q, k, v, **kw), (q, k, v))


def test_heads_split_and_extremes():
    """Heads below fixed_heads equal Combiner-Fixed, the others Combiner-Axial; 0 and all heads
    reduce to one of them; the default splits half and half."""
    q, k, v = (x.detach() for x in qkv(T=50, Hq=4, Hkv=2))
    fixed = combiner_attention(q, k, v, block=10, causal=True)
    axial = combiner_axial_attention(q, k, v, width=7, causal=True)
    mix = combiner_mixture_attention(q, k, v, block=10, width=7, causal=True)
    torch.testing.assert_close(mix, torch.cat([fixed[:, :, :2], axial[:, :, 2:]], 2))
    torch.testing.assert_close(combiner_mixture_attention(q, k, v, width=7, fixed_heads=0, causal=True), axial)
    torch.testing.assert_close(combiner_mixture_attention(q, k, v, block=10, fixed_heads=4, causal=True), fixed)
    assert not torch.allclose(fixed[:, :, :2], axial[:, :, :2], atol=1e-3)  # the two parts differ


def test_no_lookahead():
    q, k, v = qkv(T=40, Hq=4, Hkv=2)
    for t0 in (1, 17, 39):
        assert_no_lookahead(combiner_mixture_attention, q, k, v, t0, block=6, width=5, causal=True)


def test_errors():
    q, k, v = qkv(T=20, Hq=4, Hkv=2)
    with pytest.raises(ValueError, match=r"fixed_heads must lie in \[0, heads=4\], got 5"):
        combiner_mixture_attention(q, k, v, fixed_heads=5)
    with pytest.raises(ValueError, match="fixed_heads"):
        combiner_mixture_attention(q, k, v, fixed_heads=-1)
    with pytest.raises(ValueError, match="block"):
        combiner_mixture_attention(q, k, v, block=0, fixed_heads=2)
