"""Decode attention, merging of partial states, BlockMask construction, and input errors."""

import doctest

import pytest
import torch

import effattn.exact.api
import effattn.exact.decode
from effattn import BlockMask, attention, create_block_mask, decode_attention, merge_attention_states
from effattn.exact import (
    and_masks,
    causal_mask,
    document_ids_from_cu_seqlens,
    document_mask,
    global_local_mask,
    or_masks,
    prefix_lm_mask,
    sliding_window_mask,
    streaming_mask,
)
from tests.helpers import assert_fp32_close


# ----------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("t_new", [1, 3])
@pytest.mark.parametrize("kw", [{}, {"window": 20}, {"softcap": 4.0}], ids=["plain", "window", "softcap"])
def test_decode_any_split_count_equals_one_shot_and_attention(t_new, kw):
    B, Tmax, Hq, Hkv, D = 3, 150, 4, 2, 24
    q = torch.randn(B, t_new, Hq, D)
    kc, vc = torch.randn(B, Tmax, Hkv, D), torch.randn(B, Tmax, Hkv, D)
    lens = torch.tensor([150, 77, t_new])
    one = decode_attention(q, kc, vc, lens, num_splits=1, **kw)
    for splits in (2, 3, 7, 150):
        assert_fp32_close(decode_attention(q, kc, vc, lens, num_splits=splits, **kw), one, 1e-5)
    for b in range(B):  # the same as attention() over that sequence's valid cache
        n = int(lens[b])
        ref = attention(
            q[b : b + 1],
            kc[b : b + 1, :n],
            vc[b : b + 1, :n],
            causal=True,
            backend="reference",
            **({"window": kw["window"]} if "window" in kw else {}),
            **({"softcap": kw["softcap"]} if "softcap" in kw else {}),
        )
        assert_fp32_close(one[b : b + 1], ref, 1e-5)


def test_decode_with_sinks_matches_attention():
    q, kc, vc = torch.randn(1, 1, 2, 16), torch.randn(1, 90, 2, 16), torch.randn(1, 90, 2, 16)
    sinks = torch.randn(2)
    o = decode_attention(q, kc, vc, num_splits=4, sinks=sinks)
    ref = attention(q, kc, vc, causal=True, sinks=sinks, backend="reference")
    assert_fp32_close(o, ref, 1e-5)


def test_merge_is_associative_and_matches_full_attention():
    q, k, v = torch.randn(2, 5, 3, 16), torch.randn(2, 60, 3, 16), torch.randn(2, 60, 3, 16)
    parts = [(0, 13), (13, 40), (40, 60)]
    outs, lses = zip(*(attention(q, k[:, a:b], v[:, a:b], return_lse=True, backend="tiled") for a, b in parts))
    full, full_lse = attention(q, k, v, return_lse=True, backend="reference")
    o_all, lse_all = merge_attention_states(outs, lses)
    o_ab, lse_ab = merge_attention_states(outs[:2], lses[:2])
    o_left, lse_left = merge_attention_states([o_ab, outs[2]], [lse_ab, lses[2]])
    o_bc, lse_bc = merge_attention_states(outs[1:], lses[1:])
    o_right, lse_right = merge_attention_states([outs[0], o_bc], [lses[0], lse_bc])
    for o, lse in ((o_all, lse_all), (o_left, lse_left), (o_right, lse_right)):
        assert_fp32_close(o, full, 1e-5)
        assert_fp32_close(lse, full_lse, 1e-5)


def test_merge_of_empty_parts_gives_zero():
    outs = torch.randn(2, 1, 4, 2, 8)
    lses = torch.full((2, 1, 2, 4), float("-inf"))
    lses[0, :, :, :2] = 0.5
    o, lse = merge_attention_states(outs, lses)
    assert torch.isfinite(o).all()
    assert torch.equal(o[:, 2:], torch.zeros_like(o[:, 2:]))
    assert torch.allclose(o[:, :2], outs[0, :, :2])
    assert torch.all(lse[..., 2:] == float("-inf"))


# ------------------------------------------------------------------------------- block masks
MASKS = {
    "causal": lambda Tq, Tk: causal_mask(Tk - Tq),
    "window": lambda Tq, Tk: sliding_window_mask(9, 3, Tk - Tq),
    "document": lambda Tq, Tk: document_mask(document_ids_from_cu_seqlens(torch.tensor([0, 17, 18, 50, Tq]), Tq)),
    "prefix": lambda Tq, Tk: prefix_lm_mask(20, Tk - Tq),
    "global_local": lambda Tq, Tk: global_local_mask(5, 6, Tk - Tq, causal=True),
    "streaming": lambda Tq, Tk: streaming_mask(8, 2, Tk - Tq),
    "and_or": lambda Tq, Tk: or_masks(
        and_masks(causal_mask(Tk - Tq), sliding_window_mask(4, 0, Tk - Tq)), prefix_lm_mask(3)
    ),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_analytic_tile_classification_equals_exact_evaluation(name):
    Tq = Tk = 75
    m = MASKS[name](Tq, Tk)
    analytic = create_block_mask(m, 1, 1, Tq, Tk, q_block=8, kv_block=16)
    exact = create_block_mask(lambda b, h, q, kv: m(b, h, q, kv), 1, 1, Tq, Tk, q_block=8, kv_block=16)
    dense = m(None, None, torch.arange(Tq)[:, None], torch.arange(Tk)[None, :])
    assert torch.equal(analytic.to_dense()[0, 0], dense)
    assert torch.equal(exact.to_dense()[0, 0], dense)
    # the analytic path may be conservative but never lists fewer tiles than exist
    assert torch.equal(analytic.kv_counts, exact.kv_counts)
    assert analytic.density() < 1.0 or name == "prefix"


def test_from_kv_indices_runs_on_the_engine_and_matches_dense_reference():
    T, blk = 96, 16
    nq = T // blk
    idx = torch.tensor([[[[0, 2], [1, 0], [2, 0], [3, 1], [4, 0], [5, 2]]]])  # [1, 1, 6, 2]
    counts = torch.tensor([[[1, 2, 1, 2, 2, 2]]])
    bm = BlockMask.from_kv_indices(idx, T, T, q_block=blk, kv_block=blk, kv_counts=counts, mask_mod=causal_mask())
    assert bm.kv_indices.shape == (1, 1, nq, 2)
    dense = bm.to_dense()[0, 0]
    q, k, v = (torch.randn(1, T, 2, 16, requires_grad=True) for _ in range(3))
    o = attention(q, k, v, block_mask=bm, backend="tiled")
    ref = attention(q, k, v, mask_mod=lambda b, h, qi, ki: dense[qi, ki], backend="reference")
    assert_fp32_close(o, ref, 1e-5)
    do = torch.randn_like(o)
    for g, g_ref in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        assert_fp32_close(g, g_ref, 1e-4)
    o_ref_backend = attention(q, k, v, block_mask=bm, backend="reference")
    assert_fp32_close(o_ref_backend, ref, 1e-5)


def test_per_head_block_mask_with_gqa():
    T, blk, H = 64, 16, 4
    gen = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(H * 4)]).view(1, H, 4, 2)
    bm = BlockMask.from_kv_indices(idx, T, T, q_block=blk, kv_block=blk)
    q = torch.randn(2, T, H, 8, requires_grad=True)
    k, v = (torch.randn(2, T, 2, 8, requires_grad=True) for _ in range(2))
    o = attention(q, k, v, block_mask=bm, backend="tiled")
    dense = bm.to_dense()[0]
    ref = attention(q, k, v, mask_mod=lambda b, h, qi, ki: dense[h, qi, ki], backend="reference")
    assert_fp32_close(o, ref, 1e-5)
    do = torch.randn_like(o)
    for g, g_ref in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        assert_fp32_close(g, g_ref, 1e-4)


def test_block_mask_validation():
    with pytest.raises(ValueError, match="kv_indices"):
        BlockMask.from_kv_indices(torch.zeros(2, 3, dtype=torch.long), 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        BlockMask.from_kv_indices(torch.tensor([[[[0], [5]]]]), 32, 32, q_block=16, kv_block=16)
    with pytest.raises(ValueError, match="twice"):
        BlockMask.from_kv_indices(torch.tensor([[[[1, 1], [0, 1]]]]), 32, 32, q_block=16, kv_block=16)
    with pytest.raises(ValueError, match="query blocks"):
        BlockMask.from_kv_indices(torch.tensor([[[[0]]]]), 32, 32, q_block=16, kv_block=16)
    with pytest.raises(TypeError, match="bool"):
        create_block_mask(lambda b, h, q, kv: (q - kv).float(), 1, 1, 16, 16)


def test_sliding_window_block_mask_is_sparse():
    bm = create_block_mask(and_masks(causal_mask(), sliding_window_mask(255)), 1, 1, 4096, 4096)
    assert bm.kv_indices.shape[-1] <= 5
    assert bm.density() < 0.08


# ------------------------------------------------------------------------------- bad input
def _qkv(B=1, T=8, H=4, Hkv=2, D=16):
    return torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)


def test_bad_input_errors_name_the_argument():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must have rank 4"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"heads_q \(4\) must be a multiple of heads_kv \(3\)"):
        attention(q, torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16))
    with pytest.raises(ValueError, match="head_dim differ"):
        attention(q, torch.randn(1, 8, 2, 12), v)
    with pytest.raises(TypeError, match="k has dtype torch.float64"):
        attention(q, k.double(), v)
    with pytest.raises(TypeError, match="floating"):
        attention(q.long(), k, v)
    with pytest.raises(ValueError, match="scale must be a finite"):
        attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="window must be >= 1"):
        attention(q, k, v, window=-1)
    with pytest.raises(ValueError, match="window as a pair"):
        attention(q, k, v, window=(-2, 3))
    with pytest.raises(TypeError, match=r"mask_mod must have the signature \(b, h, q_idx, kv_idx\)"):
        attention(q, k, v, mask_mod=lambda q_idx, kv_idx: q_idx >= kv_idx)
    with pytest.raises(TypeError, match="score_mod must have the signature"):
        attention(q, k, v, score_mod=lambda s: s)
    with pytest.raises(ValueError, match="alibi_slopes must be a tensor of shape"):
        attention(q, k, v, alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="sinks must be a tensor of shape"):
        attention(q, k, v, sinks=torch.ones(4, 1))
    with pytest.raises(ValueError, match="softcap must be"):
        attention(q, k, v, softcap=0.0)
    with pytest.raises(ValueError, match="batch must be 1"):
        attention(*_qkv(B=2), cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        attention(q, k, v, cu_seqlens=torch.tensor([0, 3, 7]))
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="backend='sdpa' cannot run this call: window"):
        attention(q, k, v, window=4, backend="sdpa")
    with pytest.raises(ValueError, match="block_mask already carries the mask"):
        attention(q, k, v, causal=True, block_mask=create_block_mask(None, 1, 1, 8, 8))
    with pytest.raises(ValueError, match="block_mask is for"):
        attention(q, k, v, block_mask=create_block_mask(None, 1, 1, 9, 8))


def test_reference_refuses_huge_inputs_and_names_tiled():
    q = torch.randn(1, 12000, 1, 1).expand(1, 12000, 1, 1)
    with pytest.raises(ValueError, match="use backend='tiled'"):
        attention(q, q, q, backend="reference")


def test_decode_bad_input():
    q, kc = torch.randn(2, 1, 2, 8), torch.randn(2, 20, 2, 8)
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):
        decode_attention(q, kc, kc, torch.tensor([25, 3]))
    with pytest.raises(ValueError, match="cache_seqlens must be an int tensor"):
        decode_attention(q, kc, kc, torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q, kc, kc, num_splits=0)
    with pytest.raises(ValueError, match="lses must have shape"):
        merge_attention_states(torch.zeros(2, 1, 3, 2, 4), torch.zeros(2, 1, 3, 2))


@pytest.mark.parametrize("module", [effattn.exact.api, effattn.exact.decode])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_merge_gradient_is_finite_for_rows_empty_everywhere():
    outs = torch.randn(2, 1, 3, 2, 4, requires_grad=True)
    lses = torch.full((2, 1, 2, 3), float("-inf"))
    lses[0, :, :, 0] = 0.3
    lses.requires_grad_(True)
    o, lse = merge_attention_states(outs, lses)
    (o.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert torch.isfinite(outs.grad).all() and torch.isfinite(lses.grad).all()


@pytest.mark.parametrize("per", ["batch", "head"])
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_ragged_block_masks_with_score_mod_sinks_and_gqa(per, tiles, monkeypatch):
    """Per-batch and per-head block masks run as items sorted by key-list length (the engine's ragged
    schedule): ragged and empty lists, partial tiles, a tail block, a score_mod, sinks and GQA rows."""
    from effattn.exact import tiled

    if tiles == "small":
        monkeypatch.setattr(tiled, "TILE_ELEMENTS", 2048)  # many groups and key chunks
    B, T, H, Hkv, blk = 2, 90, 4, 2, 16
    nq = -(-T // blk)
    gen = torch.Generator().manual_seed(5)
    Bm, Hm = (B, 1) if per == "batch" else (1, H)
    idx = torch.stack([torch.randperm(nq, generator=gen)[:4] for _ in range(Bm * Hm * nq)]).view(Bm, Hm, nq, 4)
    counts = torch.randint(0, 5, (Bm, Hm, nq), generator=gen)
    partial = torch.rand(Bm, Hm, nq, 4, generator=gen) < 0.5
    bm = BlockMask.from_kv_indices(
        idx,
        T,
        T,
        q_block=blk,
        kv_block=blk,
        kv_counts=counts,
        mask_mod=lambda b, h, i, j: (i + j) % 3 != 0,
        kv_partial=partial,
    )
    dense = bm.to_dense()
    q = torch.randn(B, T, H, 8, requires_grad=True)
    k, v = (torch.randn(B, T, Hkv, 8, requires_grad=True) for _ in range(2))
    sinks = torch.randn(H, requires_grad=True)
    soft = lambda s, b, h, i, j: 5.0 * torch.tanh(s / 5.0) - 0.01 * (h + 1) * (i - j).abs() + 0.1 * b  # noqa: E731
    o = attention(q, k, v, block_mask=bm, score_mod=soft, sinks=sinks, backend="tiled")
    ref = attention(
        q,
        k,
        v,
        mask_mod=lambda b, h, i, j: dense[b % Bm, h % Hm, i, j],
        score_mod=soft,
        sinks=sinks,
        backend="reference",
    )
    assert_fp32_close(o, ref, 1e-5)
    do = torch.randn_like(o)
    inputs = (q, k, v, sinks)
    for g, g_ref in zip(torch.autograd.grad(o, inputs, do), torch.autograd.grad(ref, inputs, do)):
        assert_fp32_close(g, g_ref, 1e-4)
