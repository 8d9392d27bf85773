"""Reformer LSH attention: engine == exact attention on the materialized selection, the selection rule
itself (chunks / per-bucket windows, shared-QK self rule, rounds), no look-ahead, determinism, errors."""

import pytest
import torch

from effattn import attention
from effattn.sparse import lsh_attention, lsh_buckets, lsh_pair_counts
from effattn.sparse.lsh import default_n_buckets
from tests.helpers import assert_fp32_close


def _inputs(B=2, T=128, H=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).requires_grad_(True)
    k = torch.randn(B, T, Hkv, D, generator=g).requires_grad_(True)
    v = torch.randn(B, T, Hkv, D, generator=g).requires_grad_(True)
    return q, k, v


def _reference(q, k, v, counts, shared_qk, dedup):
    """Exact attention over the pairs of ``counts`` (weights ``log counts`` without de-duplication)."""
    keys = torch.nn.functional.normalize(q, dim=-1) if shared_qk else k
    vals = v.repeat_interleave(q.shape[2] // v.shape[2], 2) if shared_qk else v
    allowed = counts > 0
    score_mod = None
    if not dedup:
        log_n = counts.float().clamp_min(1).log()

        def score_mod(s, b, h, i, j):
            return s + log_n[b, h, i, j]

    return attention(
        q, keys, vals, mask_mod=lambda b, h, i, j: allowed[b, h, i, j], score_mod=score_mod, backend="reference"
    )


CASES = [  # causal, shared_qk, dedup, n_rounds, T, chunk
    (False, True, True, 3, 128, 16),
    (False, True, False, 2, 128, 16),
    (False, False, True, 2, 128, 16),
    (False, False, False, 1, 128, 32),
    (False, True, True, 2, 256, 128),  # query tiles taller than key tiles (128 x 64)
    (True, True, True, 3, 128, 8),
    (True, True, False, 2, 97, 8),  # odd T (a causal chunk_size need not divide it)
    (True, False, True, 2, 128, 8),
    (True, False, False, 1, 257, 16),  # window tiles (64 queries x 32 keys)
    (True, False, True, 2, 2048, 32),  # window tiles of 256 queries x 64 keys
]


@pytest.mark.parametrize("causal,shared_qk,dedup,n_rounds,T,chunk", CASES)
def test_engine_matches_reference_on_selection(causal, shared_qk, dedup, n_rounds, T, chunk):
    q, k, v = _inputs(T=T) if T < 1024 else _inputs(B=1, T=T, H=1, Hkv=1, D=8)
    params = {"chunk_size": chunk, "n_rounds": n_rounds, "causal": causal, "shared_qk": shared_qk, "seed": 3}
    kk = None if shared_qk else k
    o, lse = lsh_attention(q, kk, v, dedup=dedup, return_lse=True, **params)
    counts = lsh_pair_counts(q, kk, **params)
    ref = _reference(q, k, v, counts, shared_qk, dedup)
    assert_fp32_close(o, ref)
    do = torch.randn_like(o)
    wrt = (q, v) if shared_qk else (q, k, v)
    for g, gr, name in zip(torch.autograd.grad(o, wrt, do), torch.autograd.grad(ref, wrt, do), ("dq", "dk/dv", "dv")):
        assert_fp32_close(g, gr, 1e-4, name)
    if dedup:  # the merged log-sum-exp is the exact one over the union
        keys = torch.nn.functional.normalize(q, dim=-1) if shared_qk else k
        allowed = counts > 0
        _, lse_ref = attention(
            q,
            keys,
            keys[..., :1],
            mask_mod=lambda b, h, i, j: allowed[b, h, i, j],
            return_lse=True,
            backend="reference",
        )
        empty = torch.isneginf(lse_ref)  # queries with no key at all (causal, separate q/k)
        assert torch.equal(torch.isneginf(lse), empty)
        assert_fp32_close(lse.masked_fill(empty, 0), lse_ref.masked_fill(empty, 0), name="lse")


def test_lse_gradient_through_rounds():
    """Gradients through the returned lse as well (the merge needs d lse / d q, d k)."""
    q, k, v = _inputs(B=1, T=64, H=2, Hkv=2)
    params = {"chunk_size": 8, "n_rounds": 2, "shared_qk": False, "seed": 1}
    o, lse = lsh_attention(q, k, v, return_lse=True, **params)
    allowed = lsh_pair_counts(q, k, **params) > 0
    ref, lse_ref = attention(
        q, k, v, mask_mod=lambda b, h, i, j: allowed[b, h, i, j], return_lse=True, backend="reference"
    )
    loss, loss_ref = (o.square().sum() + lse.sin().sum()), (ref.square().sum() + lse_ref.sin().sum())
    for g, gr in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(loss_ref, (q, k, v))):
        assert_fp32_close(g, gr, 1e-4)


def _brute_force_counts(q, k, chunk, n_rounds, causal, shared_qk, seed, n_buckets):
    """The selection rule written out with Python loops (tiny sizes)."""
    B, T, H, _ = q.shape
    bq = lsh_buckets(q, n_buckets=n_buckets, n_rounds=n_rounds, seed=seed)
    bk = bq if shared_qk else lsh_buckets(k, n_buckets=n_buckets, n_rounds=n_rounds, seed=seed)
    counts = torch.zeros(B, H, T, T, dtype=torch.long)
    for r in range(n_rounds):
        for b in range(B):
            for h in range(H):
                qb, kb = bq[r, b, h].tolist(), bk[r, b, h].tolist()
                q_sorted = sorted(range(T), key=lambda t: (qb[t], t))
                k_sorted = sorted(range(T), key=lambda t: (kb[t], t))
                for s, i in enumerate(q_sorted):
                    if causal:  # the 2 * chunk most recent keys of the bucket at positions <= i
                        same = [j for j in range(i + 1) if kb[j] == qb[i]]
                        seen = same[-2 * chunk :]
                    else:
                        c, nc = s // chunk, T // chunk
                        slots = {c} | ({(c - 1) % nc} if nc > 1 else set())
                        seen = [k_sorted[t] for t in range(T) if t // chunk in slots]
                    for j in seen:
                        counts[b, h, i, j] += 1
    if shared_qk:  # self only when nothing else
        has_other = ((counts > 0) & ~torch.eye(T, dtype=torch.bool)).any(-1)
        counts = counts.masked_fill(torch.eye(T, dtype=torch.bool) & has_other[..., None], 0)
    return counts


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared_qk", [True, False])
def test_selection_rule(causal, shared_qk):
    q, k, _ = _inputs(B=1, T=32, H=2, Hkv=2, D=8, seed=5)
    chunk, n_rounds = 4, 2
    kk = None if shared_qk else k
    nb = default_n_buckets(32, chunk, causal)
    counts = lsh_pair_counts(q, kk, chunk_size=chunk, n_rounds=n_rounds, causal=causal, shared_qk=shared_qk, seed=2)
    expected = _brute_force_counts(q, q if shared_qk else k, chunk, n_rounds, causal, shared_qk, 2, nb)
    assert torch.equal(counts, expected)


def test_shared_qk_self_rule():
    q, _, v = _inputs(B=1, T=64, H=2, D=8)
    counts = lsh_pair_counts(q, None, chunk_size=4, causal=True, shared_qk=True)
    eye = torch.eye(64, dtype=torch.bool)
    others = ((counts > 0) & ~eye).sum(-1)
    diag = counts.diagonal(dim1=-2, dim2=-1) > 0
    assert torch.equal(diag, others == 0)  # itself exactly when nothing else
    assert bool(diag[..., 0].all())  # the first token has only itself
    o = lsh_attention(q, None, v, chunk_size=4, causal=True)
    torch.testing.assert_close(o[:, 0], v[:, 0], rtol=0, atol=1e-6)


def test_dedup_changes_weights_of_repeated_pairs():
    q, _, v = _inputs(B=1, T=64, H=2, D=8)
    counts = lsh_pair_counts(q, None, chunk_size=8, n_rounds=4, seed=0)
    assert bool((counts > 1).any())  # some pairs meet in several rounds
    a = lsh_attention(q, None, v, chunk_size=8, n_rounds=4, dedup=True)
    b = lsh_attention(q, None, v, chunk_size=8, n_rounds=4, dedup=False)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("shared_qk", [True, False])
def test_causal_no_look_ahead(shared_qk):
    q, k, v = _inputs(B=1, T=128, H=2, Hkv=2)
    t = 70
    params = {"chunk_size": 8, "n_rounds": 2, "causal": True, "shared_qk": shared_qk, "seed": 4}
    kk = None if shared_qk else k
    o = lsh_attention(q, kk, v, **params)
    counts = lsh_pair_counts(q, kk, **params)
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, t + 1 :] = torch.randn_like(x[:, t + 1 :]) * 3
    kk2 = None if shared_qk else k2
    o2 = lsh_attention(q2, kk2, v2, **params)
    counts2 = lsh_pair_counts(q2, kk2, **params)
    assert torch.equal(counts[..., : t + 1, :], counts2[..., : t + 1, :])  # the selection of positions <= t
    assert not torch.equal(counts[..., t + 1 :, :], counts2[..., t + 1 :, :])  # (the perturbation does act)
    torch.testing.assert_close(o[:, : t + 1], o2[:, : t + 1], rtol=1e-5, atol=1e-6)
    assert bool(counts.tril().eq(counts).all())  # no key after the query, ever


def test_determinism_and_seed():
    q, _, v = _inputs(B=1, T=128, H=2)
    a = lsh_attention(q, None, v, chunk_size=16, n_rounds=2, seed=7)
    b = lsh_attention(q, None, v, chunk_size=16, n_rounds=2, seed=7)
    c = lsh_attention(q, None, v, chunk_size=16, n_rounds=2, seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_hash_is_angular():
    """Angular LSH: buckets depend on the direction only, and lie in [0, n_buckets)."""
    x = torch.randn(2, 50, 3, 8)
    b1 = lsh_buckets(x, n_buckets=6, n_rounds=2, seed=1)
    b2 = lsh_buckets(x * torch.rand(2, 50, 3, 1) * 5 + 0.0, n_buckets=6, n_rounds=2, seed=1)
    assert torch.equal(b1, b2)
    assert int(b1.min()) >= 0 and int(b1.max()) < 6
    assert set(b1.unique().tolist()) == set(range(6))  # every bucket in use at this size
    assert torch.equal(lsh_buckets(-x, n_buckets=6, seed=1), (lsh_buckets(x, n_buckets=6, seed=1) + 3) % 6)


def test_bad_input():
    q, k, v = _inputs(B=1, T=64, H=2, Hkv=2)
    with pytest.raises(ValueError, match="n_buckets"):
        lsh_attention(q, None, v, chunk_size=8, n_buckets=7)
    with pytest.raises(ValueError, match="chunk_size"):
        lsh_attention(q, None, v, chunk_size=24)  # does not divide 64
    with pytest.raises(ValueError, match="chunk_size"):
        lsh_attention(q, None, v, chunk_size=0, causal=True)
    with pytest.raises(ValueError, match="n_rounds"):
        lsh_attention(q, None, v, chunk_size=8, n_rounds=0)
    with pytest.raises(ValueError, match="shared_qk"):
        lsh_attention(q, k, v, chunk_size=8)
    with pytest.raises(ValueError, match="k is None"):
        lsh_attention(q, None, v, chunk_size=8, shared_qk=False)
    with pytest.raises(ValueError, match="v must be"):
        lsh_attention(q, None, v[:, :32], chunk_size=8)
    with pytest.raises(ValueError, match="k must be"):
        lsh_attention(q, k[:, :32], v, chunk_size=8, shared_qk=False)
    with pytest.raises(TypeError, match="causal"):
        lsh_attention(q, None, v, chunk_size=8, causal=1)
    with pytest.raises(TypeError, match="dtype"):
        lsh_attention(q, None, v.double(), chunk_size=8)
