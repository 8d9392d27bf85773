"""Routing attention with a fixed per-cluster window (``cluster_window=``, causal): engine == exact
attention on the selection (values and gradients), the selection rule, independence from the call
length (a prefix call gives the prefix's outputs), more clusters than tokens, errors."""

import pytest
import torch

from effattn import attention
from effattn.sparse import KMeansRouter, routing_attention, routing_dense_mask
from effattn.sparse.routing import _cosine, random_centroids
from tests.helpers import assert_fp32_close


def _inputs(B=2, T=97, H=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).requires_grad_(True)
    k = torch.randn(B, T, Hkv, D, generator=g).requires_grad_(True)
    v = torch.randn(B, T, Hkv, D, generator=g).requires_grad_(True)
    return q, k, v


@pytest.mark.parametrize("T,K,cw,L", [(97, 6, 5, 2), (64, 4, 40, 0), (7, 16, 3, 2), (1, 8, 4, 0)])
def test_engine_matches_reference(T, K, cw, L):
    q, k, v = _inputs(T=T)
    params = {"num_clusters": K, "causal": True, "local_heads": L, "cluster_window": cw, "seed": 3}
    o = routing_attention(q, k, v, **params)
    mask = routing_dense_mask(q, k, **params)
    ref = attention(q, k, v, mask_mod=lambda b, h, i, j: mask[b, h, i, j], backend="reference")
    assert_fp32_close(o, ref)
    do = torch.randn_like(o)
    for g, gr, name in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do), "qkv"):
        assert_fp32_close(g, gr, 1e-4, "d" + name)


def test_selection_rule():
    """Each query sees the ``cluster_window`` most recent keys of its cluster at positions <= its own."""
    q, k, _ = _inputs(B=1, T=50, H=2, Hkv=2)
    K, cw, T = 3, 4, 50
    mask = routing_dense_mask(q, k, num_clusters=K, causal=True, cluster_window=cw, seed=2)
    cents = random_centroids(2, 16, K, seed=2)
    cq, ck = _cosine(q, cents).argmax(-1), _cosine(k, cents).argmax(-1)
    for h in range(2):
        for i in range(T):
            same = [j for j in range(i + 1) if ck[0, h, j] == cq[0, h, i]][-cw:]
            expected = torch.zeros(T, dtype=torch.bool)
            expected[same] = True
            assert torch.equal(mask[0, h, i], expected)


def test_prefix_call_gives_the_prefix_outputs():
    """With a fixed cluster_window a query's keys do not depend on how long the call is; with the
    default ``w = T // num_clusters`` they do (which is why the nn layer fixes it)."""
    q, k, v = _inputs(B=1, T=96)
    router = KMeansRouter(2, 16, 4, seed=0).eval()
    fixed = {"router": router, "causal": True, "local_heads": 2, "window": 8, "cluster_window": 6}
    with torch.no_grad():
        full = routing_attention(q, k, v, **fixed)
        for t in (1, 5, 33, 95):
            part = routing_attention(q[:, :t], k[:, :t], v[:, :t], **fixed)
            assert_fp32_close(part, full[:, :t], name=f"prefix {t}")
        default = {"router": router, "causal": True, "local_heads": 2, "window": 8}
        a = routing_attention(q[:, :32], k[:, :32], v[:, :32], **default)  # w = 8
        b = routing_attention(q, k, v, **default)[:, :32]  # w = 24
        assert (a - b).abs().max() > 1e-3


def test_errors():
    q, k, v = _inputs(T=16)
    with pytest.raises(ValueError, match="cluster_window applies to causal"):
        routing_attention(q, k, v, num_clusters=4, cluster_window=4)
    with pytest.raises(ValueError, match="cluster_window must be a positive int"):
        routing_attention(q, k, v, num_clusters=4, causal=True, cluster_window=0)
    with pytest.raises(ValueError, match="num_clusters=32 exceeds"):  # without cluster_window, as before
        routing_attention(q, k, v, num_clusters=32, causal=True)
    assert routing_attention(q, k, v, num_clusters=32, causal=True, cluster_window=2).shape == q.shape
