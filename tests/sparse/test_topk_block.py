"""Top-k block retrieval (MoBA / Landmark / HiP): engine vs reference, selection rule, causality, mass kept."""

import pytest
import torch

from effattn import attention
from effattn.sparse import REGISTRY, attention_mass_kept, topk_block_attention, topk_block_mask
from effattn.sparse import topk_block as topk_mod
from tests.helpers import assert_lowp_close
from tests.sparse._blockwise_checks import (
    assert_no_lookahead,
    assert_same_fwd_bwd,
    qkv,
    reference_with_mask,
    run_doctests,
)

REPS = ["mean", "max", "last"]
CAUSAL = pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])


def _selected(bm):
    """Per (b, h, query block) the set of listed key blocks."""
    Bm, Hm, n, _ = bm.kv_indices.shape
    return [
        [[set(bm.kv_indices[b, h, i, : bm.kv_counts[b, h, i]].tolist()) for i in range(n)] for h in range(Hm)]
        for b in range(Bm)
    ]


def _brute_force(q, k, block, top_k, causal, rep):
    """The selection rule written with loops: pooled query (causal: the ``block`` queries ending at
    the block's first token), key representative, top-k among the candidate blocks, plus the own block."""
    B, T, Hq, _ = q.shape
    G = Hq // k.shape[2]
    n = -(-T // block)
    out = []
    for b in range(B):
        per_head = []
        for h in range(Hq):
            reps = []
            for j in range(n):
                kb = k[b, j * block : (j + 1) * block, h // G].double()
                reps.append({"mean": kb.mean(0), "max": kb.amax(0), "last": kb[-1]}[rep])
            rows = []
            for i in range(n):
                start = i * block
                qb = q[b, max(0, start - block + 1) : start + 1, h] if causal else q[b, start : start + block, h]
                p = qb.double().mean(0)
                cands = [j for j in range(n) if (j < i if causal else j != i)]
                ranked = sorted(cands, key=lambda j: -float(p @ reps[j]))
                rows.append({i, *ranked[:top_k]})
            per_head.append(rows)
        out.append(per_head)
    return out


@CAUSAL
@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("T,block,top_k", [(97, 16, 2), (128, 8, 5), (64, 64 // 3, 1)])
def test_matches_reference(causal, rep, T, block, top_k):
    q, k, v = qkv(T=T)
    kw = dict(block=block, top_k=top_k, causal=causal, representative=rep)
    dense = topk_block_mask(q, k, **kw).to_dense()
    assert_same_fwd_bwd(topk_block_attention(q, k, v, **kw), reference_with_mask(q, k, v, dense), (q, k, v))


@CAUSAL
@pytest.mark.parametrize("rep", REPS)
def test_selection_is_brute_force_topk(causal, rep):
    q, k, _ = qkv(T=100, Hq=4, Hkv=2)
    bm = topk_block_mask(q, k, block=12, top_k=3, causal=causal, representative=rep)
    assert bm.kv_indices.shape[:2] == (2, 4)  # per batch and per query head
    assert _selected(bm) == _brute_force(q.detach(), k.detach(), 12, 3, causal, rep)


@pytest.mark.parametrize("rep", REPS)
def test_never_selects_future_blocks(rep):
    q, k, _ = qkv(T=160)
    bm = topk_block_mask(q, k, block=16, top_k=4, causal=True, representative=rep)
    for b in _selected(bm):
        for h in b:
            for i, s in enumerate(h):
                assert max(s) == i and i in s, f"query block {i} selected {sorted(s)}"
                assert len(s) == 1 + min(4, i)  # early blocks take every past block
    dense = bm.to_dense()
    assert not torch.triu(dense, diagonal=1).any()


@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("t0", [40, 48, 95])
def test_causal_no_lookahead(rep, t0):
    """Also checks the pooled query: t0 inside a block must not see the block's later queries."""
    q, k, v = qkv(T=128)
    assert_no_lookahead(topk_block_attention, q, k, v, t0, block=16, top_k=2, causal=True, representative=rep)


def test_all_past_blocks_is_causal_attention():
    q, k, v = qkv(T=96)
    o = topk_block_attention(q, k, v, block=16, top_k=5, causal=True)
    assert_same_fwd_bwd(o, attention(q, k, v, causal=True, backend="reference"), (q, k, v))


def test_attention_mass_kept():
    q, k, _ = qkv(T=96, B=1)
    bm = topk_block_mask(q, k, block=16, top_k=2, causal=True)
    mass = attention_mass_kept(q, k, bm, causal=True)
    s = torch.einsum("bihd,bjhd->bhij", q.detach(), k.detach().repeat_interleave(2, 2)) / 4.0
    full = torch.tril(torch.ones(96, 96, dtype=torch.bool))
    p = torch.softmax(s.masked_fill(~full, float("-inf")), -1)
    expect = (p * bm.to_dense()).sum(-1)
    torch.testing.assert_close(mass, expect, rtol=1e-5, atol=1e-6)
    assert (mass[..., :32] > 1 - 1e-5).all()  # the first two blocks see every past block
    assert (mass[..., 48:] < 1 - 1e-3).any()  # later ones lose mass
    all_past = topk_block_mask(q, k, block=16, top_k=5, causal=True)
    torch.testing.assert_close(attention_mass_kept(q, k, all_past), torch.ones_like(mass))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(block=16, top_k=6), "top_k"),  # 6 blocks, 5 candidates for the last one
        (dict(block=16, top_k=0), "top_k"),
        (dict(block=0, top_k=1), "block"),
        (dict(block=16, top_k=1, representative="median"), "representative"),
        (dict(block=16, top_k=1, causal=None), "causal"),
    ],
)
def test_bad_input(kw, match):
    q, k, v = qkv(T=96)
    with pytest.raises((ValueError, TypeError), match=match):
        topk_block_attention(q, k, v, **kw)


def test_bad_shapes():
    q, k, v = qkv(T=96)
    with pytest.raises(ValueError, match="seq_q"):
        topk_block_attention(q[:, :50], k, v, block=16, top_k=1)
    with pytest.raises(ValueError, match="head_dim"):
        topk_block_attention(q, k[..., :8], v, block=16, top_k=1)


@pytest.mark.parametrize("T", [64, 97, 256])
def test_registry_entry(T):
    m = REGISTRY["topk_block"]
    assert m.content_based
    q, k, v = qkv(T=T, B=1)
    for causal in m.causal_modes:
        p = m.make_params(T)
        dense = m.dense_mask(q, k, causal=causal, **p)
        torch.testing.assert_close(
            m.attend(q, k, v, causal=causal, **p), reference_with_mask(q, k, v, dense), rtol=1e-5, atol=1e-5
        )


def test_docstring_examples():
    run_doctests(topk_mod)


def test_bfloat16_follows_the_flash_attention_rule():
    """Selection runs in float32 on the bf16 inputs; the attention's error is at most 2x the
    reference's own bf16 error (+ atol) against the float32 reference on the same selection."""
    q, k, v = (x.detach().bfloat16() for x in qkv(T=97))
    bm = topk_block_mask(q, k, block=16, top_k=2, causal=True)
    dense = bm.to_dense()
    o = topk_block_attention(q, k, v, block=16, top_k=2, causal=True)
    ref32 = reference_with_mask(q.float(), k.float(), v.float(), dense)
    ref16 = attention(
        q, k, v, mask_mod=lambda b, h, i, j: dense[b % dense.shape[0], h, i, j], backend="reference"
    )  # the reference backend computes in float32 and rounds the output once
    assert_lowp_close(o, ref16, ref32)  # the helper's atol 1e-3 (was 1e-2): measured e_fast == e_ref
