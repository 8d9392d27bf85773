"""HyperAttention: engine == exact attention with the sampled log-weights, exactness when every key is
sampled, the estimator's unbiasedness, Gray-code order, no look-ahead, determinism, errors."""

import pytest
import torch

from effattn import attention
from effattn.exact import tiled
from effattn.sparse import hyper_attention, hyper_attention_dense, sort_lsh_buckets
from effattn.sparse.hyper_attention import gray_rank
from tests.helpers import assert_fp32_close, assert_lowp_close


def _inputs(B=2, T=128, H=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).requires_grad_(True)
    k = torch.randn(B, T, Hkv, D, generator=g).requires_grad_(True)
    v = torch.randn(B, T, Hkv, D, generator=g).requires_grad_(True)
    return q, k, v


def _reference(q, k, v, mask, bias, return_lse=False):
    return attention(
        q,
        k,
        v,
        mask_mod=lambda b, h, i, j: mask[b, h, i, j],
        score_mod=lambda s, b, h, i, j: s + bias[b, h, i, j],
        return_lse=return_lse,
        backend="reference",
    )


@pytest.mark.parametrize(
    "causal,T,block,samples",
    [
        (False, 128, 16, 24),
        (False, 128, 32, 0),
        (False, 256, 128, 40),
        (True, 128, 16, 24),
        (True, 97, 8, 30),
        (True, 257, 32, 64),
    ],
)
@pytest.mark.parametrize("kept", [True, False], ids=["kept_probs", "recomputed"])
def test_engine_matches_reference(causal, T, block, samples, kept, monkeypatch):
    monkeypatch.setattr(tiled, "KEPT_PROBS_PER_Q_ELEMENT", 10**6 if kept else 0)  # both backward paths
    q, k, v = _inputs(T=T)
    params = {"block_size": block, "num_samples": samples, "causal": causal, "seed": 2}
    o = hyper_attention(q, k, v, **params)
    mask, bias = hyper_attention_dense(q, k, **params)
    ref = _reference(q, k, v, mask, bias)
    assert_fp32_close(o, ref)
    do = torch.randn_like(o)
    for g, gr, name in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do), "qkv"):
        assert_fp32_close(g, gr, 1e-4, "d" + name)


@pytest.mark.parametrize("causal", [False, True])
def test_all_keys_sampled_is_exact(causal):
    """With every key sampled the weight is n_i / m_i = 1 and the two parts cover all keys exactly once."""
    q, k, v = _inputs(B=1, T=64, H=2, Hkv=2)
    o = hyper_attention(q, k, v, block_size=8, num_samples=64, causal=causal)
    torch.testing.assert_close(o, attention(q, k, v, causal=causal, backend="reference"), rtol=1e-5, atol=1e-5)


def test_sampled_part_is_unbiased():
    """Over sample draws, n/m * sum_{sampled, not in the LSH part} exp(s) averages to the residual's sum."""
    q, k, _ = _inputs(B=1, T=64, H=1, Hkv=1, D=8, seed=3)
    q, k = q.detach(), k.detach()
    s = (q[0, :, 0] @ k[0, :, 0].T) / 8**0.5
    est, exact = torch.zeros(64, dtype=torch.float64), None
    n_draws = 200
    for seed in range(n_draws):
        mask, bias = hyper_attention_dense(q, k, block_size=8, num_samples=16, seed=seed)
        lsh_only, _ = hyper_attention_dense(q, k, block_size=8, num_samples=0, seed=seed)
        sampled = (mask & ~lsh_only)[0, 0]
        est += (torch.exp(s + bias[0, 0]) * sampled).sum(-1).double() / n_draws
        resid = (torch.exp(s) * ~lsh_only[0, 0]).sum(-1).double()
        exact = resid / n_draws if exact is None else exact + resid / n_draws
    rel = ((est - exact).abs() / exact).mean()
    # ~0.01 here; a weight off by the block's share (56 / 64 instead of 1) would give ~0.12
    assert rel < 0.04, rel


def test_gray_order():
    codes = torch.arange(256)
    ranks = gray_rank(codes)
    assert torch.equal(ranks.sort().values, codes)  # a permutation
    by_rank = torch.empty_like(codes).scatter_(0, ranks, codes)  # the code at each rank
    flips = by_rank[1:] ^ by_rank[:-1]
    assert bool(((flips & (flips - 1)) == 0).all() and (flips > 0).all())  # neighbours differ in one bit
    x = torch.randn(1, 40, 2, 8)
    b = sort_lsh_buckets(x, n_hash_bits=4, seed=0)
    assert torch.equal(b, sort_lsh_buckets(3 * x, n_hash_bits=4, seed=0)) and int(b.max()) < 16


def test_causal_no_look_ahead():
    q, k, v = _inputs(B=1, T=128, H=2, Hkv=2)
    t = 60
    params = {"block_size": 8, "num_samples": 32, "causal": True, "seed": 1}
    o = hyper_attention(q, k, v, **params)
    mask, bias = hyper_attention_dense(q, k, **params)
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, t + 1 :] = torch.randn_like(x[:, t + 1 :]) * 3
    o2 = hyper_attention(q2, k2, v2, **params)
    mask2, bias2 = hyper_attention_dense(q2, k2, **params)
    assert torch.equal(mask[..., : t + 1, :], mask2[..., : t + 1, :])
    assert torch.equal(bias[..., : t + 1, :], bias2[..., : t + 1, :])
    assert not torch.equal(mask, mask2)
    assert bool(~mask.triu(1).any())
    torch.testing.assert_close(o[:, : t + 1], o2[:, : t + 1], rtol=1e-5, atol=1e-6)


def test_determinism_and_seed():
    q, k, v = _inputs(B=1, T=128, H=2, Hkv=2)
    a = hyper_attention(q, k, v, block_size=16, num_samples=16, seed=5)
    assert torch.equal(a, hyper_attention(q, k, v, block_size=16, num_samples=16, seed=5))
    assert not torch.allclose(a, hyper_attention(q, k, v, block_size=16, num_samples=16, seed=6))


def test_bad_input():
    q, k, v = _inputs(B=1, T=64, H=2, Hkv=2)
    with pytest.raises(ValueError, match="block_size"):
        hyper_attention(q, k, v, block_size=24)
    with pytest.raises(ValueError, match="num_samples"):
        hyper_attention(q, k, v, block_size=8, num_samples=65)
    with pytest.raises(ValueError, match="n_hash_bits"):
        hyper_attention(q, k, v, block_size=8, n_hash_bits=0)
    assert hyper_attention(q, k, v).shape == q.shape  # the defaults (min(256, T)) fit short sequences
    with pytest.raises(ValueError, match="seq_q"):
        hyper_attention(q[:, :32], k, v, block_size=8)
    with pytest.raises(ValueError, match="heads_q"):
        hyper_attention(q[:, :, :1], k, v, block_size=8)
    with pytest.raises(TypeError, match="causal"):
        hyper_attention(q, k, v, block_size=8, causal="yes")


def test_bfloat16_follows_the_flash_attention_rule():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 128, 2, 16, generator=g).bfloat16() for _ in range(3))
    for causal in (False, True):
        params = {"block_size": 16, "num_samples": 16, "causal": causal}
        mask, bias = hyper_attention_dense(q.float(), k.float(), **params)
        ref = _reference(q.float(), k.float(), v.float(), mask, bias)
        ref_low = _reference(q, k, v, mask, bias)
        o = hyper_attention(q, k, v, **params)
        assert o.dtype == torch.bfloat16
        assert_lowp_close(o, ref_low, ref)
