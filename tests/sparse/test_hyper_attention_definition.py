"""HyperAttention's selection rebuilt by brute force from its definition (module docstring of
``effattn.sparse.hyper_attention``), independently of the library's selection object:

- sortLSH: queries and keys ranked by their Gray-code bucket (:func:`sort_lsh_buckets`, the public hash)
  and sorted by ``(rank, position)``; not causal, sorted query block ``i`` sees sorted key block ``i``;
  causal, query ``t`` sees the ``block_size`` most recent keys ``j <= t`` of its own bucket;
- residual: the sampled positions ``S`` (:func:`sampled_positions`) not already in the LSH part, their
  scores raised by ``log(n_t / m_t)`` (``T / m`` not causal; causal, only samples ``<= t`` count:
  ``(t + 1) / #{s in S, s <= t}``).

Each query's key list and weights come from a plain Python loop; a float64 dense softmax over them is
the reference for :func:`hyper_attention`'s output and its q/k/v gradients.
"""

import math

import pytest
import torch

from effattn.sparse import hyper_attention, hyper_attention_dense, sort_lsh_buckets
from effattn.sparse.hyper_attention import sampled_positions
from tests.helpers import assert_fp32_close


def _selection(q, k, *, block_size, num_samples, n_hash_bits, causal, seed):
    """``{(b, h, t): {j: log-weight}}`` listed from the definition (k already expanded to q's heads)."""
    B, T, H, _ = q.shape
    bq = sort_lsh_buckets(q, n_hash_bits=n_hash_bits, seed=seed).tolist()  # [B, H, T]
    bk = sort_lsh_buckets(k, n_hash_bits=n_hash_bits, seed=seed).tolist()
    samples = sampled_positions(H, T, num_samples, seed=seed).tolist()
    sel = {}
    for b in range(B):
        for h in range(H):
            q_order = sorted(range(T), key=lambda t: (bq[b][h][t], t))
            k_order = sorted(range(T), key=lambda j: (bk[b][h][j], j))
            for t in range(T):
                if causal:
                    same = [j for j in range(t + 1) if bk[b][h][j] == bq[b][h][t]]
                    lsh = set(same[-block_size:])
                    past = [s for s in samples[h] if s <= t]
                    weight = math.log((t + 1) / len(past)) if past else 0.0
                else:
                    blk = q_order.index(t) // block_size
                    lsh = set(k_order[blk * block_size : (blk + 1) * block_size])
                    past = samples[h]
                    weight = math.log(T / num_samples) if num_samples else 0.0
                keys = dict.fromkeys(lsh, 0.0)
                for s in past:
                    if s not in lsh:
                        keys[s] = weight
                sel[b, h, t] = keys
    return sel


def _dense_reference(q, k, v, sel, scale):
    """float64 softmax of each query over its listed keys, with the listed log-weights added; a query
    with no key (causal: no key of its bucket at or before it, no past sample) gives zeros."""
    B, T, H, D = q.shape
    bias = torch.full((B, H, T, T), -1e4, dtype=torch.float64)  # exp(-1e4) is exactly 0 in float64
    keep = torch.zeros(B, H, T, T, dtype=torch.bool)
    for (b, h, t), keys in sel.items():
        for j, w in keys.items():
            bias[b, h, t, j], keep[b, h, t, j] = w, True
    s = torch.einsum("bthd,bjhd->bhtj", q.double(), k.double()) * scale + bias
    p = s.softmax(-1) * keep.any(-1, keepdim=True)
    return torch.einsum("bhtj,bjhd->bthd", p, v.double())


@pytest.mark.parametrize(
    "causal,T,block,samples,bits,Hkv",
    [
        (False, 99, 11, 17, 3, 2),  # odd T, GQA
        (False, 105, 15, 0, 2, 4),  # LSH only
        (True, 97, 6, 23, 2, 2),  # odd T, GQA
        (True, 61, 4, 61, 3, 4),  # every key sampled: weights log((t+1)/(t+1)) = 0
    ],
)
def test_matches_brute_force_definition(causal, T, block, samples, bits, Hkv):
    B, H, D = 2, 4, 12
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, T, H, D, generator=g).requires_grad_(True)
    k = torch.randn(B, T, Hkv, D, generator=g).requires_grad_(True)
    v = torch.randn(B, T, Hkv, D, generator=g).requires_grad_(True)
    params = dict(block_size=block, num_samples=samples, n_hash_bits=bits, causal=causal, seed=3)
    o = hyper_attention(q, k, v, **params)

    G = H // Hkv
    k_h, v_h = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)  # query head h uses key head h // G
    sel = _selection(q.detach(), k_h.detach(), **params)
    ref = _dense_reference(q, k_h, v_h, sel, 1 / math.sqrt(D))
    assert_fp32_close(o, ref.float(), 1e-5, "output")
    do = torch.randn(o.shape, generator=g)
    for name, gr, gr_ref in zip("qkv", torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        assert_fp32_close(gr, gr_ref.float(), 1e-4, "d" + name)

    # the library's dense statement lists the same pairs and weights
    mask, bias = hyper_attention_dense(q.detach(), k.detach(), **params)
    want = torch.zeros(B, H, T, T, dtype=torch.bool)
    want_bias = torch.zeros(B, H, T, T)
    for (b, h, t), keys in sel.items():
        for j, w in keys.items():
            want[b, h, t, j], want_bias[b, h, t, j] = True, w
    assert torch.equal(mask, want)
    torch.testing.assert_close(bias.masked_fill(~mask, 0.0), want_bias, rtol=1e-6, atol=1e-6)


def test_sampled_positions_are_the_residual_keys():
    """With a one-key LSH part (causal, block_size 1: the query's own key), the keys a query sees are
    itself and the samples at or before it, nothing else."""
    T, m = 41, 9
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, T, 1, 8, generator=g)
    mask, _ = hyper_attention_dense(q, q, block_size=1, num_samples=m, n_hash_bits=2, causal=True, seed=4)
    s = set(sampled_positions(1, T, m, seed=4)[0].tolist())
    assert len(s) == m
    for t in range(T):
        assert set(mask[0, 0, t].nonzero().view(-1).tolist()) == {t} | {j for j in s if j <= t}
