"""HiP's hierarchical top-k pruning (effattn.sparse.hip): equal to brute-force top-k where the pruning is
exact (max representative; block-monotone scores with any representative; top_k >= candidates), the
visible count == the dense selection, causality, the attention on the engine == the reference on the
selection, and the O(k log T) work per query block. The registry tests (test_registry.py) also run
``hip`` through the generic checks."""

import math

import pytest
import torch

from effattn import attention
from effattn.exact import count_scores
from effattn.sparse import brute_force_topk_blocks, hip_attention, hip_block_mask, hip_selection
from tests.helpers import assert_fp32_close


def as_sets(idx, valid):
    """Selected block ids per (batch, head, query block) as sorted lists (invalid entries dropped)."""
    B, H, n, _ = idx.shape
    return [[sorted(idx[b, h, i][valid[b, h, i]].tolist()) for i in range(n)] for b in range(B) for h in range(H)]


def rand_qk(B=2, T=200, Hq=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, Hq, D, generator=g), torch.randn(B, T, Hkv, D, generator=g)


@pytest.mark.parametrize("T,block,top_k", [(200, 8, 3), (257, 16, 2), (97, 4, 5), (64, 8, 1)])
def test_max_representative_equals_brute_force(T, block, top_k):
    q, k = rand_qk(T=T)
    got = hip_selection(q, k, block=block, top_k=top_k, representative="max")
    want = brute_force_topk_blocks(q, k, block=block, top_k=top_k)
    assert torch.equal(got[1], want[1])
    assert as_sets(*got) == as_sets(*want)


@pytest.mark.parametrize("representative", ["first", "center", "max"])
@pytest.mark.parametrize("increasing", [True, False])
def test_block_monotone_scores_equal_brute_force(representative, increasing):
    """Scores monotone across blocks (every key of block b scores above every key of block b - 1, or
    below): any representative orders the halves as their best blocks do, so the pruning is exact."""
    B, T, H, D, block = 1, 300, 2, 8, 10
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, T, H, D, generator=g) * 0.01
    q[..., 0] = 1.0  # every pooled query reads channel 0
    k = torch.randn(B, T, H, D, generator=g) * 0.01
    blk = torch.arange(T) // block
    k[..., 0] = ((blk if increasing else -blk).float() * 10 + torch.rand(T, generator=g)).view(1, T, 1)
    got = hip_selection(q, k, block=block, top_k=4, representative=representative)
    want = brute_force_topk_blocks(q, k, block=block, top_k=4)
    assert as_sets(*got) == as_sets(*want)
    i = 29  # 29 candidates: the newest 4 (increasing) or the oldest 4 blocks
    assert as_sets(*got)[0][i] == ([25, 26, 27, 28] if increasing else [0, 1, 2, 3])


def test_cheap_representative_is_an_approximation():
    """On random data the first-key representative differs from brute force somewhere (else the test of
    exactness above would prove nothing about the cheap path) but selects valid earlier blocks."""
    q, k = rand_qk(T=400, seed=3)
    idx, valid = hip_selection(q, k, block=8, top_k=3, representative="first")
    want = brute_force_topk_blocks(q, k, block=8, top_k=3)
    assert as_sets(idx, valid) != as_sets(*want)
    n = idx.shape[2]
    i = torch.arange(n).view(1, 1, n, 1)
    assert bool(((idx < i) | ~valid).all())  # only earlier blocks
    assert torch.equal(valid.sum(-1), torch.minimum(torch.arange(n), torch.tensor(3)).expand(2, 4, n))


def test_top_k_at_least_candidates_keeps_all():
    q, k = rand_qk(T=60)
    idx, valid = hip_selection(q, k, block=6, top_k=12)  # 10 blocks: every query block keeps all before it
    for rows in as_sets(idx, valid):
        assert rows == [list(range(i)) for i in range(10)]


@pytest.mark.parametrize("T,block,top_k", [(97, 8, 2), (130, 16, 3)])
def test_attention_equals_reference_on_selection_and_counts(T, block, top_k):
    q, k = rand_qk(T=T)
    q.requires_grad_(True)
    v = torch.randn(2, T, 2, 8, requires_grad=True)
    kk = k.clone().requires_grad_(True)
    o = hip_attention(q, kk, v, block=block, top_k=top_k)
    mask = hip_block_mask(q, kk, block=block, top_k=top_k).to_dense()  # [B, H, T, T]
    assert not bool(mask.triu(1).any())
    ref = attention(q, kk, v, mask_mod=lambda b, h, i, j: mask[b, h, i, j], backend="reference")
    assert_fp32_close(o, ref)
    do = torch.randn_like(o)
    for g, gr, n in zip(torch.autograd.grad(o, (q, kk, v), do), torch.autograd.grad(ref, (q, kk, v), do), "qkv"):
        assert_fp32_close(g, gr, 1e-4, "d" + n)
    with torch.no_grad(), count_scores() as c:
        hip_attention(q, k, v, block=block, top_k=top_k)
    assert c.visible == int(mask.sum())
    # the selection as stated: own block causally + the selected earlier blocks
    idx, valid = hip_selection(q, k, block=block, top_k=top_k)
    t = torch.arange(T)
    for b, h, qi in ((0, 0, T - 1), (1, 3, T // 2)):
        blocks = set(idx[b, h, qi // block][valid[b, h, qi // block]].tolist())
        want = ((t // block == qi // block) & (t <= qi)) | torch.tensor([int(j) // block in blocks for j in t])
        assert torch.equal(mask[b, h, qi], want)


def test_no_look_ahead():
    q, k = rand_qk(T=160)
    v = torch.randn(2, 160, 2, 8)
    o = hip_attention(q, k, v, block=8, top_k=3)
    t = 77
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, t + 1 :] = 4 * torch.randn_like(x[:, t + 1 :])
    o2 = hip_attention(q2, k2, v2, block=8, top_k=3)
    torch.testing.assert_close(o[:, : t + 1], o2[:, : t + 1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(o[:, t + 1 :], o2[:, t + 1 :])


def test_work_is_k_log_T_per_query_block(monkeypatch):
    """The pruning scores 2k representatives per level over ceil(log2(ceil((n - 1) / k))) levels (counted by
    wrapping the representative gather), not the n candidates of brute force."""
    import effattn.sparse.hip as hip

    calls = []
    real = torch.einsum

    def counting(eq, *ops):
        if eq == "bhid,bhird->bhir":
            calls.append(ops[1].shape[3])
        return real(eq, *ops)

    monkeypatch.setattr(hip.torch, "einsum", counting)
    T, block, top_k = 4096, 16, 4
    q, k = rand_qk(B=1, T=T, Hq=1, Hkv=1)
    hip_selection(q, k, block=block, top_k=top_k)
    n = T // block
    assert calls == [2 * top_k] * max(1, math.ceil(math.log2(math.ceil((n - 1) / top_k))))  # 6 levels here


def test_bad_input():
    q, k = rand_qk(T=64)
    with pytest.raises(ValueError, match="causal"):
        hip_block_mask(q, k, block=8, top_k=2, causal=False)
    with pytest.raises(ValueError, match="representative"):
        hip_selection(q, k, block=8, top_k=2, representative="mean")
    with pytest.raises(ValueError, match="top_k"):
        hip_selection(q, k, block=8, top_k=0)
    with pytest.raises(ValueError, match="seq_q"):
        hip_selection(q[:, :32], k, block=8, top_k=2)
