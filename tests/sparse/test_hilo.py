"""HiLo attention: engine vs its dense reference, the two head groups, causality, bad input."""

import pytest
import torch

from effattn import attention
from effattn.sparse import REGISTRY, hilo_attention, hilo_reference, local_attention
from effattn.sparse import hilo as hilo_mod
from tests.sparse._blockwise_checks import assert_no_lookahead, assert_same_fwd_bwd, qkv, run_doctests

CAUSAL = pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])


def _pooled(x, pool, complete_only):
    """Average pools of ``pool`` tokens by an explicit loop (ragged tail averaged, or dropped)."""
    T = x.shape[1]
    n = T // pool if complete_only else -(-T // pool)
    return torch.stack([x[:, g * pool : (g + 1) * pool].mean(1) for g in range(n)], 1)


def _pooled_attention(q, k, v, pool, causal):
    """Every query against the pooled keys/values; causal: only groups complete at the query."""
    kp, vp = _pooled(k, pool, causal), _pooled(v, pool, causal)
    if not causal:
        return attention(q, kp, vp, backend="reference")
    t, g = torch.arange(q.shape[1]), torch.arange(kp.shape[1])
    ok = (g.view(1, -1) + 1) * pool - 1 <= t.view(-1, 1)
    return attention(q, kp, vp, mask_mod=lambda b, h, i, j: ok[i, j], backend="reference")


@CAUSAL
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("T,window,pool", [(97, 10, 7), (64, 16, 4), (5, 3, 8)])
def test_matches_reference(causal, alpha, T, window, pool):
    q, k, v = qkv(T=T)
    kw = dict(alpha=alpha, window=window, pool=pool, causal=causal)
    assert_same_fwd_bwd(hilo_attention(q, k, v, **kw), hilo_reference(q, k, v, **kw), (q, k, v))


@pytest.mark.parametrize("grid,window,pool", [((12, 8), 4, 2), ((16, 16), 8, 4)])
def test_matches_reference_2d(grid, window, pool):
    q, k, v = qkv(T=grid[0] * grid[1])
    kw = dict(alpha=0.5, window=window, pool=pool, grid=grid)
    assert_same_fwd_bwd(hilo_attention(q, k, v, **kw), hilo_reference(q, k, v, **kw), (q, k, v))


@CAUSAL
def test_alpha_0_is_local_attention(causal):
    q, k, v = qkv(T=97)
    o = hilo_attention(q, k, v, alpha=0, window=12, pool=4, causal=causal)
    if causal:
        ref = local_attention(q, k, v, window=12, causal=True)
    else:
        t = torch.arange(97)
        same = t.view(-1, 1) // 12 == t.view(1, -1) // 12
        ref = attention(q, k, v, mask_mod=lambda b, h, i, j: same[i, j], backend="reference")
    assert_same_fwd_bwd(o, ref, (q, k, v))


@CAUSAL
def test_alpha_1_is_pooled_attention(causal):
    q, k, v = qkv(T=97)
    o = hilo_attention(q, k, v, alpha=1, window=12, pool=6, causal=causal)
    assert_same_fwd_bwd(o, _pooled_attention(q, k, v, 6, causal), (q, k, v))


def test_head_split_last_heads_are_lofi():
    """alpha=0.5 of 4 heads (GQA 2 key heads): heads 0-1 Hi-Fi with key head 0, heads 2-3 Lo-Fi with key head 1."""
    q, k, v = qkv(T=60)
    o = hilo_attention(q, k, v, alpha=0.5, window=10, pool=5)
    hi = hilo_attention(q[:, :, :2], k[:, :, :1], v[:, :, :1], alpha=0, window=10, pool=5)
    lo = _pooled_attention(q[:, :, 2:], k[:, :, 1:], v[:, :, 1:], 5, False)
    torch.testing.assert_close(o[:, :, :2], hi, rtol=0, atol=0)
    torch.testing.assert_close(o[:, :, 2:], lo, rtol=1e-5, atol=1e-6)


def test_causal_lofi_first_tokens_are_empty():
    """Before the first pool is complete, a Lo-Fi head has nothing to attend to: zeros."""
    q, k, v = qkv(T=40)
    o = hilo_attention(q, k, v, alpha=1, window=4, pool=8, causal=True)
    assert (o[:, :7] == 0).all() and (o[:, 7:].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("t0", [23, 40])
def test_causal_no_lookahead(alpha, t0):
    q, k, v = qkv(T=96)
    assert_no_lookahead(hilo_attention, q, k, v, t0, alpha=alpha, window=16, pool=8, causal=True)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=0.25), "alpha"),  # 1 Lo-Fi head of 4 with 2 query heads per key head
        (dict(alpha=0.5, window=0), "window"),
        (dict(alpha=0.5, pool=0), "pool"),
        (dict(alpha=0.5, window=4, pool=2, grid=(8, 12), causal=True), "grid"),
        (dict(alpha=0.5, window=4, pool=3, grid=(8, 12)), "pool"),
        (dict(alpha=0.5, window=4, pool=2, grid=(9, 12)), "grid"),
        (dict(alpha=0.5, causal=0), "causal"),
    ],
)
def test_bad_input(kw, match):
    q, k, v = qkv(T=96)
    with pytest.raises((ValueError, TypeError), match=match):
        hilo_attention(q, k, v, **kw)


def test_registry_entry():
    m = REGISTRY["hilo"]
    q, k, v = qkv(T=97, B=1)
    for causal in m.causal_modes:
        p = m.make_params(97)
        assert m.dense_mask(q, k, causal=causal, **p) is None  # pooled keys: compared with hilo_reference
        torch.testing.assert_close(
            m.attend(q, k, v, causal=causal, **p), hilo_reference(q, k, v, causal=causal, **p), rtol=1e-5, atol=1e-5
        )


def test_docstring_examples():
    run_doctests(hilo_mod)
