"""Routing Transformer: engine == exact attention on the routed selection, balanced clusters, the causal
per-cluster window (default ``T // num_clusters`` or a fixed ``cluster_window``, whose selection does not
depend on the call length), the online k-means router (EMA towards the data, no gradient), errors."""

import pytest
import torch

from effattn import attention
from effattn.sparse import KMeansRouter, routing_attention, routing_dense_mask
from effattn.sparse.kmeans import centroid_cosine as _cosine
from effattn.sparse.routing import _Balanced, random_centroids
from tests.helpers import assert_fp32_close, assert_lowp_close


def _inputs(B=2, T=128, H=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).requires_grad_(True)
    k = torch.randn(B, T, Hkv, D, generator=g).requires_grad_(True)
    v = torch.randn(B, T, Hkv, D, generator=g).requires_grad_(True)
    return q, k, v


CASES = [  # causal, T, num_clusters, local_heads
    (False, 128, 8, 0),
    (False, 128, 16, 2),
    (False, 160, 40, 0),  # 40 clusters: two membership words
    (False, 512, 2, 0),  # clusters of 256: query tiles taller than key tiles
    (True, 128, 8, 0),
    (True, 97, 6, 2),  # odd T (causal clusters need not divide it)
    (True, 300, 4, 0),  # window tiles of 64 queries x 32 keys
]


CLUSTER_WINDOW_CASES = [  # causal with a fixed per-cluster window: T, num_clusters, local_heads, cluster_window
    (97, 6, 2, 5),
    (64, 4, 0, 40),
    (7, 16, 2, 3),  # more clusters than tokens
    (1, 8, 0, 4),
]


@pytest.mark.parametrize("causal,T,K,L,cw", [(*c, None) for c in CASES] + [(True, *c) for c in CLUSTER_WINDOW_CASES])
def test_engine_matches_reference(causal, T, K, L, cw):
    q, k, v = _inputs(T=T)
    params = {"num_clusters": K, "causal": causal, "local_heads": L, "seed": 1}
    if cw is not None:
        params["cluster_window"] = cw
    o = routing_attention(q, k, v, **params)
    mask = routing_dense_mask(q, k, **params)
    ref = attention(q, k, v, mask_mod=lambda b, h, i, j: mask[b, h, i, j], backend="reference")
    assert_fp32_close(o, ref)
    do = torch.randn_like(o)
    for g, gr, name in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do), "qkv"):
        assert_fp32_close(g, gr, 1e-4, "d" + name)


def test_lse_matches_reference():
    q, k, v = _inputs(B=1, T=64, H=2, Hkv=2)
    o, lse = routing_attention(q, k, v, num_clusters=4, return_lse=True)
    mask = routing_dense_mask(q, k, num_clusters=4)
    _, lse_ref = attention(q, k, v, mask_mod=lambda b, h, i, j: mask[b, h, i, j], return_lse=True, backend="reference")
    empty = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse), empty)
    assert_fp32_close(lse.masked_fill(empty, 0), lse_ref.masked_fill(empty, 0))


def test_balanced_clusters():
    """Every centroid takes exactly its T / K nearest queries and keys (top-k by cosine similarity)."""
    q, k, _ = _inputs(B=2, T=96, H=3, Hkv=3)
    K = 6
    cents = random_centroids(3, 16, K, seed=4)
    sel = _Balanced(q.detach(), k.detach(), cents)
    assert sel.q_idx.shape == sel.k_idx.shape == (2, 3, K, 96 // K)
    for idx, x in ((sel.q_idx, q), (sel.k_idx, k)):
        assert bool((idx.sort(-1).values.diff(dim=-1) > 0).all())  # w distinct tokens per cluster
        sim = _cosine(x.detach(), cents).transpose(-1, -2)  # [B, H, K, T]
        chosen = sim.gather(-1, idx)
        others = sim.scatter(-1, idx, float("-inf"))
        assert bool((chosen.amin(-1) >= others.amax(-1)).all())  # the nearest w, no closer token left out
    mask = routing_dense_mask(q, k, num_clusters=K, seed=4)
    # a query and a key share a cluster exactly when the dense mask says so
    mq = torch.zeros(2, 3, K, 96, dtype=torch.bool).scatter_(-1, sel.q_idx, True)
    mk = torch.zeros(2, 3, K, 96, dtype=torch.bool).scatter_(-1, sel.k_idx, True)
    expected = (mq.transpose(-1, -2).float() @ mk.float()) > 0
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("T,K,cw", [(64, 4, None), (50, 3, 4)])
def test_causal_window_rule(T, K, cw):
    """Causal: nearest-centroid clusters; each query sees the w most recent same-cluster keys at <= its
    position (``w = T // K`` by default, ``cluster_window`` when given)."""
    q, k, _ = _inputs(B=1, T=T, H=2, Hkv=2)
    w = T // K if cw is None else cw
    mask = routing_dense_mask(q, k, num_clusters=K, causal=True, cluster_window=cw, seed=2)
    cents = random_centroids(2, 16, K, seed=2)
    cq, ck = _cosine(q, cents).argmax(-1), _cosine(k, cents).argmax(-1)
    for h in range(2):
        for i in range(T):
            same = [j for j in range(i + 1) if ck[0, h, j] == cq[0, h, i]][-w:]
            expected = torch.zeros(T, dtype=torch.bool)
            expected[same] = True
            assert torch.equal(mask[0, h, i], expected)


def test_causal_no_look_ahead():
    q, k, v = _inputs(B=1, T=128, H=4, Hkv=2)
    router = KMeansRouter(2, 16, 8, seed=0).eval()
    t = 50
    params = {"router": router, "causal": True, "local_heads": 2, "window": 16}
    o = routing_attention(q, k, v, **params)
    mask = routing_dense_mask(q, k, **params)
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, t + 1 :] = torch.randn_like(x[:, t + 1 :]) * 3
    o2 = routing_attention(q2, k2, v2, **params)
    mask2 = routing_dense_mask(q2, k2, **params)
    assert torch.equal(mask[..., : t + 1, :], mask2[..., : t + 1, :])
    assert not torch.equal(mask, mask2)
    assert not bool(mask.triu(1).any())
    torch.testing.assert_close(o[:, : t + 1], o2[:, : t + 1], rtol=1e-5, atol=1e-6)


def _planted(n_clusters=4, T=256, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(H, n_clusters, D, generator=g), dim=-1)
    labels = torch.randint(0, n_clusters, (1, T, H), generator=g)
    x = centers[torch.arange(H).view(1, 1, H), labels] + 0.2 * torch.randn(1, T, H, D, generator=g)
    return x


def _centroid_error(router, x):
    """Mean distance of every used centroid to the mean of the normalized points assigned to it."""
    xn = torch.nn.functional.normalize(x, dim=-1)
    a = router.assign(x)  # [B, H, T]
    errs = []
    for h in range(x.shape[2]):
        for c in range(router.num_clusters):
            pts = xn[0, :, h][a[0, h] == c]
            if len(pts):
                errs.append((router.centroids[h, c] - pts.mean(0)).norm())
    return torch.stack(errs).mean()


def test_router_ema_moves_centroids_to_the_data():
    x = _planted()
    router = KMeansRouter(2, 16, 4, decay=0.5, seed=0)
    before = _centroid_error(router, x)
    errors = [before]
    for _ in range(5):
        router.update(x, x)
        errors.append(_centroid_error(router, x))
    assert errors[1] < 0.6 * errors[0]  # one step halves the gap (decay 0.5)
    assert errors[-1] < 0.2 * errors[0]
    # an EMA of decay d: the step moves exactly (1 - d) of the way to the assigned mean
    r2 = KMeansRouter(2, 16, 4, decay=0.9, seed=0)
    old = r2.centroids.clone()
    a = r2.assign(x)
    xn = torch.nn.functional.normalize(x, dim=-1)
    r2.update(x, x)
    mean = xn[0, :, 0][a[0, 0] == a[0, 0, 0]].mean(0)
    torch.testing.assert_close(r2.centroids[0, a[0, 0, 0]], 0.9 * old[0, a[0, 0, 0]] + 0.1 * mean)


def test_router_gets_no_gradient_and_updates_only_in_training():
    q, k, v = _inputs(B=1, T=64, H=2, Hkv=2)
    router = KMeansRouter(2, 16, 4, seed=0)
    assert list(router.parameters()) == []
    assert "centroids" in router.state_dict() and not router.centroids.requires_grad
    before = router.centroids.clone()
    router.eval()
    routing_attention(q, k, v, router=router).sum().backward()
    assert torch.equal(router.centroids, before)  # eval: no update
    assert router.centroids.grad is None
    router.train()
    routing_attention(q, k, v, router=router).sum().backward()
    assert not torch.equal(router.centroids, before)  # training: one EMA step
    assert router.centroids.grad is None and not router.centroids.requires_grad


def test_training_update_happens_after_the_selection():
    """The call that sees the data is routed by the centroids from before the update."""
    q, k, v = _inputs(B=1, T=64, H=2, Hkv=2)
    router = KMeansRouter(2, 16, 4, decay=0.0, seed=0)
    expected = routing_attention(q, k, v, router=KMeansRouter(2, 16, 4, decay=0.0, seed=0).eval(), causal=True)
    got = routing_attention(q, k, v, router=router.train(), causal=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_determinism():
    q, k, v = _inputs(B=1, T=128, H=2, Hkv=2)
    a = routing_attention(q, k, v, num_clusters=8, seed=3)
    assert torch.equal(a, routing_attention(q, k, v, num_clusters=8, seed=3))
    assert not torch.allclose(a, routing_attention(q, k, v, num_clusters=8, seed=4))
    r1, r2 = KMeansRouter(2, 16, 8, seed=9), KMeansRouter(2, 16, 8, seed=9)
    assert torch.equal(r1.centroids, r2.centroids)


def test_bad_input():
    q, k, v = _inputs(B=1, T=64, H=4, Hkv=2)
    with pytest.raises(ValueError, match="num_clusters"):
        routing_attention(q, k, v, num_clusters=5)  # does not divide 64 (non-causal)
    with pytest.raises(ValueError, match="num_clusters"):
        routing_attention(q, k, v, num_clusters=65, causal=True)
    with pytest.raises(ValueError, match="exactly one"):
        routing_attention(q, k, v)
    with pytest.raises(ValueError, match="exactly one"):
        routing_attention(q, k, v, num_clusters=4, router=KMeansRouter(4, 16, 4))
    with pytest.raises(ValueError, match="local_heads"):
        routing_attention(q, k, v, num_clusters=4, local_heads=1)  # not a multiple of the GQA group (2)
    with pytest.raises(ValueError, match="local_heads"):
        routing_attention(q, k, v, num_clusters=4, local_heads=6)
    with pytest.raises(ValueError, match="router has num_heads"):
        routing_attention(q, k, v, router=KMeansRouter(4, 16, 4), local_heads=2)
    with pytest.raises(TypeError, match="router"):
        routing_attention(q, k, v, router="kmeans")
    with pytest.raises(ValueError, match="seq_q"):
        routing_attention(q[:, :32], k, v, num_clusters=4)
    with pytest.raises(ValueError, match="window"):
        routing_attention(q, k, v, num_clusters=4, local_heads=2, window=0)
    with pytest.raises(ValueError, match="num_clusters"):
        KMeansRouter(2, 16, 0)
    with pytest.raises(ValueError, match="decay"):
        KMeansRouter(2, 16, 4, decay=1.0)
    with pytest.raises(ValueError, match="q must be"):
        KMeansRouter(2, 16, 4).update(q, k)


def test_bfloat16_follows_the_flash_attention_rule():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 128, 2, 16, generator=g).bfloat16() for _ in range(3))
    for causal in (False, True):
        mask = routing_dense_mask(q.float(), k.float(), num_clusters=8, causal=causal)
        mm = lambda b, h, i, j, mask=mask: mask[b, h, i, j]  # noqa: E731
        ref = attention(q.float(), k.float(), v.float(), mask_mod=mm, backend="reference")
        ref_low = attention(q, k, v, mask_mod=mm, backend="reference")
        o = routing_attention(q, k, v, num_clusters=8, causal=causal)
        assert o.dtype == torch.bfloat16
        assert_lowp_close(o, ref_low, ref)


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


def test_cluster_window_errors():
    q, k, v = _inputs(T=16)
    with pytest.raises(ValueError, match="cluster_window applies to causal"):
        routing_attention(q, k, v, num_clusters=4, cluster_window=4)
    with pytest.raises(ValueError, match="cluster_window must be a positive int"):
        routing_attention(q, k, v, num_clusters=4, causal=True, cluster_window=0)
    with pytest.raises(ValueError, match="num_clusters=32 exceeds"):  # without cluster_window, as before
        routing_attention(q, k, v, num_clusters=32, causal=True)
    assert routing_attention(q, k, v, num_clusters=32, causal=True, cluster_window=2).shape == q.shape
