"""Non-finite keys and values at masked positions never reach a row that cannot see them.

For every mask kind and backend: NaN, +inf and -inf planted in keys and values at chosen positions;
the rows whose mask hides every planted position must equal a clean run (outputs, lse and the
gradients of q, k, v), and the rows that may see one are NaN (see ``effattn.exact.nonfinite``).
"""

from __future__ import annotations

import pytest
import torch

from effattn import attention, create_block_mask, decode_attention, explain
from effattn.exact import causal_mask, sliding_window_mask

B, T, H, HKV, D = 2, 67, 4, 2, 16
POISON = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
BAD_POS = (40, 41, 66)  # planted keys/values (batch 0: keys and values; batch 1: values only, one channel)


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, T, H, D, generator=g),
        torch.randn(B, T, HKV, D, generator=g),
        torch.randn(B, T, HKV, D, generator=g),
    )


def _plant(k, v, value):
    k, v = k.clone(), v.clone()
    for p in BAD_POS:
        k[0, p] = value
        v[0, p, 0] = value
        v[1, p, 1, 3] = value
    return k, v


def _left_pad_mask():
    pad = torch.tensor([5, 0])
    return lambda b, h, i, j: (j >= pad[b]) & (j <= i)


_CU = torch.tensor([0, 30, 41, 67])  # three packed documents; the planted keys sit in documents 2 and 3

# name -> (attention() keyword arguments, dense visibility [B|1, H|1, T_q, T_k] built from plain index grids)
_i = torch.arange(T).view(T, 1)
_j = torch.arange(T).view(1, T)
_doc = torch.bucketize(torch.arange(T), _CU[1:], right=True)
MASKS = {
    "causal": ({"causal": True}, _j <= _i),
    "window": ({"causal": True, "window": 8}, (_j <= _i) & (_i - _j < 8)),
    "window_two_sided": ({"window": (5, 3)}, (_i - _j <= 5) & (_j - _i <= 3)),
    "mask_mod_window": ({"mask_mod": sliding_window_mask(6, 0)}, (_j <= _i) & (_i - _j <= 6)),
    "block_mask": (
        {"block_mask": create_block_mask(causal_mask(), 1, 1, T, T, q_block=16, kv_block=16)},
        _j <= _i,
    ),
    "varlen_documents": ({"cu_seqlens": _CU, "causal": True}, (_doc[:, None] == _doc[None, :]) & (_j <= _i)),
    "left_padding": (
        {"mask_mod": _left_pad_mask()},
        (_j >= torch.tensor([5, 0]).view(2, 1, 1, 1)) & (_j <= _i),
    ),
    "alibi_sinks_softcap": (
        {"causal": True, "alibi_slopes": torch.linspace(0.1, 0.5, H), "sinks": torch.zeros(H), "softcap": 5.0},
        _j <= _i,
    ),
}


def _visible_bad_rows(vis: torch.Tensor) -> torch.Tensor:
    """``[B, T, H]`` True where the row's mask lets it see a planted position: batch 0 planted in every kv
    head, batch 1 in kv head 1 only (query heads 2 and 3)."""
    vis = vis.expand(B, H, T, T)
    bad = torch.zeros(B, HKV, 1, T, dtype=torch.bool)
    bad[0, :, :, list(BAD_POS)] = True
    bad[1, 1, :, list(BAD_POS)] = True
    return (vis & bad.repeat_interleave(H // HKV, 1)).any(-1).transpose(1, 2)


def _batch_rows(name, kw, q, k, v, backend):
    """``(o, lse)`` of one call (``lse`` None on sdpa, which returns none); varlen needs B = 1, so it runs
    each batch row as its own packed call."""
    lse_kw = {"return_lse": backend != "sdpa"}
    if "cu_seqlens" in kw:
        outs = [
            _pair(attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], backend=backend, **lse_kw, **kw))
            for b in range(B)
        ]
        o = torch.cat([o for o, _ in outs])
        return o, None if outs[0][1] is None else torch.cat([lse for _, lse in outs])
    return _pair(attention(q, k, v, backend=backend, **lse_kw, **kw))


def _pair(res):
    return res if isinstance(res, tuple) else (res, None)


@pytest.mark.parametrize("poison", sorted(POISON))
@pytest.mark.parametrize("backend", ["tiled", "sdpa", "reference", "auto"])
@pytest.mark.parametrize("name", sorted(MASKS))
def test_masked_nonfinite_never_leaks(name, backend, poison):
    kw, vis = MASKS[name]
    q, k, v = _qkv()
    if backend != "auto" and (refused := explain(q[:1], k[:1], v[:1], **kw).reasons[backend]):
        pytest.skip(f"{backend} declares it cannot run {name}: {refused[0]}")
    k_bad, v_bad = _plant(k, v, POISON[poison])
    sees = _visible_bad_rows(vis)
    assert sees.any() and (~sees).any()

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, q, k_bad, v_bad)]
    o_clean, lse_clean = _batch_rows(name, kw, *leaves[:3], backend)
    o_bad, lse_bad = _batch_rows(name, kw, *leaves[3:], backend)
    clean_rows = ~sees  # [B, T, H]
    torch.testing.assert_close(o_bad[clean_rows], o_clean[clean_rows], atol=1e-6, rtol=1e-5)
    assert torch.isnan(o_bad[sees]).all()
    if lse_bad is not None:
        torch.testing.assert_close(lse_bad.transpose(1, 2)[clean_rows], lse_clean.transpose(1, 2)[clean_rows])
        assert torch.isnan(lse_bad.transpose(1, 2)[sees]).all()

    # gradients of a loss over the rows that cannot see a planted position: equal to the clean run's
    do = torch.randn(o_clean.shape, generator=torch.Generator().manual_seed(5)) * clean_rows[..., None]
    g_clean = torch.autograd.grad((o_clean * do).sum(), leaves[:3])
    g_bad = torch.autograd.grad((o_bad.nan_to_num(0.0) * do).sum(), leaves[3:])
    bad_kv = torch.zeros(B, T, HKV, 1, dtype=torch.bool)
    bad_kv[0, list(BAD_POS)] = True
    bad_kv[1, list(BAD_POS), 1] = True
    for n, gc, gb in zip("qkv", g_clean, g_bad):
        assert torch.isfinite(gb).all(), f"d{n} not finite"
        if n == "q":
            torch.testing.assert_close(gb, gc, atol=1e-5, rtol=1e-4, msg="dq")
        else:  # the planted keys/values get a zero gradient; every other key the clean run's
            torch.testing.assert_close(gb.masked_fill(bad_kv, 0), gc.masked_fill(bad_kv, 0), atol=1e-5, rtol=1e-4)


def test_issue_example_rows():
    """The report's case: k[:, 200] = NaN, causal: only rows 200-255 are NaN (tiled gave all rows before)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 256, 2, 32, generator=g) for _ in range(3))
    k[:, 200] = float("nan")
    for backend in ("tiled", "sdpa", "reference"):
        o = attention(q, k, v, causal=True, backend=backend)
        bad_rows = torch.isnan(o).any(-1).any(-1)[0].nonzero().flatten()
        assert bad_rows.tolist() == list(range(200, 256)), backend
        if backend == "sdpa":  # declares no window support
            continue
        o = attention(q, k, v, causal=True, window=16, backend=backend)
        bad_rows = torch.isnan(o).any(-1).any(-1)[0].nonzero().flatten()
        assert bad_rows.tolist() == list(range(200, 216)), backend


@pytest.mark.parametrize("poison", sorted(POISON))
def test_decode_unused_and_masked_slots(poison):
    """decode_attention: garbage past each sequence's length and outside the window never matters."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, 3, H, D, generator=g)
    k, v = torch.randn(B, 50, HKV, D, generator=g), torch.randn(B, 50, HKV, D, generator=g)
    lens = torch.tensor([40, 31])
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[0, 40:] = POISON[poison]  # unused slots of sequence 0
    v_bad[1, 31:, 1] = POISON[poison]  # unused slots of sequence 1
    v_bad[1, 2] = POISON[poison]  # outside the window of 10 of sequence 1's queries
    for window in (None, 10):
        clean = decode_attention(q, k, v, lens, window=window, num_splits=3)
        out = decode_attention(q, k_bad, v_bad, lens, window=window, num_splits=3)
        if window is None:  # sequence 1 sees position 2: all its rows are NaN; sequence 0's are clean
            torch.testing.assert_close(out[0], clean[0], atol=0, rtol=0)
            assert torch.isnan(out[1]).all()
        else:
            torch.testing.assert_close(out, clean, atol=0, rtol=0)


@pytest.mark.parametrize("poison", sorted(POISON))
def test_paged_decode_unused_slots(poison):
    """paged_decode_attention: garbage in the unused tail of a sequence's last block and in free blocks of
    the pool never reaches a query; a real token with a non-finite value poisons only its own sequence."""
    from effattn.kv import PagedKVCache, paged_decode_attention

    g = torch.Generator().manual_seed(3)
    cache = PagedKVCache(num_blocks=8, block_size=4, kv_heads=HKV, head_dim=D)
    a, b = cache.allocate(), cache.allocate()
    cache.append(a, torch.randn(10, HKV, D, generator=g), torch.randn(10, HKV, D, generator=g))
    cache.append(b, torch.randn(5, HKV, D, generator=g), torch.randn(5, HKV, D, generator=g))
    q = torch.randn(2, H, D, generator=g)
    clean = paged_decode_attention(q, cache, [a, b], partition_blocks=1)
    # the same tokens in a pool whose every other slot holds garbage
    cache = PagedKVCache(num_blocks=8, block_size=4, kv_heads=HKV, head_dim=D)
    cache.key_blocks.fill_(POISON[poison])
    cache.value_blocks.fill_(POISON[poison])
    g = torch.Generator().manual_seed(3)
    a, b = cache.allocate(), cache.allocate()
    ka, va = torch.randn(10, HKV, D, generator=g), torch.randn(10, HKV, D, generator=g)
    cache.append(a, ka, va)
    kb, vb = torch.randn(5, HKV, D, generator=g), torch.randn(5, HKV, D, generator=g)
    cache.append(b, kb, vb)
    out = paged_decode_attention(q, cache, [a, b], partition_blocks=1)
    torch.testing.assert_close(out, clean, atol=1e-6, rtol=1e-5)
    vb_bad = vb.clone()
    vb_bad[2, 1] = POISON[poison]  # a real token of sequence b, kv head 1
    c = cache.allocate()
    cache.append(c, kb, vb_bad)
    out = paged_decode_attention(q, cache, [a, c], partition_blocks=1)
    torch.testing.assert_close(out[0], clean[0], atol=1e-6, rtol=1e-5)
    assert torch.isnan(out[1, H // HKV :]).all() and torch.isfinite(out[1, : H // HKV]).all()
