"""BiFormer bi-level routing attention: engine vs reference, routing rule, properties, causality."""

import pytest
import torch

from effattn import attention
from effattn.sparse import REGISTRY, biformer_attention, biformer_mask
from effattn.sparse import biformer as biformer_mod
from tests.sparse._blockwise_checks import (
    assert_no_lookahead,
    assert_same_fwd_bwd,
    qkv,
    reference_with_mask,
    run_doctests,
)


def _dense(q, k, **kw):
    return REGISTRY["biformer"].dense_mask(q, k, **kw)


@pytest.mark.parametrize(
    "T,kw",
    [
        (97, dict(region=16, top_k=3)),
        (97, dict(region=16, top_k=3, causal=True)),
        (128, dict(region=8, top_k=1, causal=True)),
        (12 * 8, dict(region=4, top_k=2, grid=(12, 8))),
        (16 * 16, dict(region=8, top_k=3, grid=(16, 16))),
    ],
    ids=["1d", "1d-causal", "1d-causal-self-only", "2d", "2d-64"],
)
def test_matches_reference(T, kw):
    q, k, v = qkv(T=T)
    dense = _dense(q, k, **kw)
    assert dense.shape == (2, 1, T, T)  # one routing per batch element, shared by the heads
    assert_same_fwd_bwd(biformer_attention(q, k, v, **kw), reference_with_mask(q, k, v, dense), (q, k, v))


def _region_sets(bm):
    return [
        [set(bm.kv_indices[b, 0, i, : bm.kv_counts[b, 0, i]].tolist()) for i in range(bm.kv_indices.shape[2])]
        for b in range(bm.kv_indices.shape[0])
    ]


@pytest.mark.parametrize("causal", [False, True])
def test_routing_rule(causal):
    """Region affinity from mean-pooled q and k (all heads), top-k regions, the region itself always in."""
    q, k, _ = qkv(T=80, Hq=4, Hkv=2)
    region, top_k, n = 10, 3, 8
    bm = biformer_mask(q, k, region=region, top_k=top_k, causal=causal)
    qd, kd = q.detach().double(), k.detach().double().repeat_interleave(2, 2)
    for b, rows in enumerate(_region_sets(bm)):
        for i, got in enumerate(rows):
            start = i * region
            qr = qd[b, max(0, start - region + 1) : start + 1] if causal else qd[b, start : start + region]
            qr = qr.mean(0)  # [H, D]
            aff = [float((qr * kd[b, j * region : (j + 1) * region].mean(0)).sum()) for j in range(n)]
            cands = [j for j in range(n) if (j < i if causal else j != i)]
            want = {i, *sorted(cands, key=lambda j: -aff[j])[: top_k - 1]}
            assert got == want, f"region {i}: {sorted(got)} != {sorted(want)}"


@pytest.mark.parametrize("kw", [dict(region=12), dict(region=12, causal=True), dict(region=2, grid=(8, 10))])
def test_each_region_selects_itself(kw):
    q, k, _ = qkv(T=80)
    for top_k in (1, 2):
        for b in _region_sets(biformer_mask(q, k, top_k=top_k, **kw)):
            assert all(i in s and len(s) <= top_k for i, s in enumerate(b))


@pytest.mark.parametrize(
    "T,kw", [(97, dict(region=16)), (97, dict(region=16, causal=True)), (96, dict(region=4, grid=(8, 12)))]
)
def test_all_regions_is_full_attention(T, kw):
    q, k, v = qkv(T=T)
    n = -(-T // kw["region"]) if "grid" not in kw else T // kw["region"] ** 2
    o = biformer_attention(q, k, v, top_k=n, **kw)
    assert_same_fwd_bwd(o, attention(q, k, v, causal=kw.get("causal", False), backend="reference"), (q, k, v))


@pytest.mark.parametrize("t0", [33, 48, 90])
def test_causal_no_lookahead(t0):
    q, k, v = qkv(T=112)
    assert_no_lookahead(biformer_attention, q, k, v, t0, region=16, top_k=3, causal=True)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(region=16, top_k=7), "top_k"),  # 6 regions
        (dict(region=16, top_k=0), "top_k"),
        (dict(region=0, top_k=1), "region"),
        (dict(region=4, top_k=1, grid=(8, 8)), "grid"),
        (dict(region=5, top_k=1, grid=(8, 12)), "region"),
        (dict(region=4, top_k=1, grid=(8, 12), causal=True), "causal"),
        (dict(region=4, top_k=1, causal="yes"), "causal"),
    ],
)
def test_bad_input(kw, match):
    q, k, v = qkv(T=96)
    with pytest.raises((ValueError, TypeError), match=match):
        biformer_attention(q, k, v, **kw)
    with pytest.raises(ValueError, match="seq_q"):
        biformer_attention(q[:, :50], k, v, region=4, top_k=1)


@pytest.mark.parametrize("T", [64, 97, 256])
def test_registry_entry(T):
    m = REGISTRY["biformer"]
    assert m.content_based
    q, k, v = qkv(T=T, B=1)
    for causal in m.causal_modes:
        p = m.make_params(T)
        dense = m.dense_mask(q, k, causal=causal, **p)
        torch.testing.assert_close(
            m.attend(q, k, v, causal=causal, **p), reference_with_mask(q, k, v, dense), rtol=1e-5, atol=1e-5
        )


def test_docstring_examples():
    run_doctests(biformer_mod)
