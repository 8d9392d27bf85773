"""Static patterns: local, dilated, strided, BigBird, axial against the reference; their properties."""

import pytest
import torch

from effattn import attention
from effattn.sparse import (
    REGISTRY,
    axial_attention,
    bigbird_attention,
    bigbird_mask,
    dilated_attention,
    local_attention,
    strided_attention,
)
from effattn.sparse import static as static_mod
from tests.sparse._blockwise_checks import (
    assert_no_lookahead,
    assert_same_fwd_bwd,
    qkv,
    reference_with_mask,
    run_doctests,
)

CAUSAL = pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])


def _pairs(T):
    i = torch.arange(T).view(-1, 1)
    return i, i.view(1, -1)


@CAUSAL
@pytest.mark.parametrize("window", [1, 13, 200])
def test_local_matches_reference(causal, window):
    q, k, v = qkv(T=97)
    i, j = _pairs(97)
    dense = (i - j < window) & (j - i < (1 if causal else window))
    assert_same_fwd_bwd(
        local_attention(q, k, v, window=window, causal=causal), reference_with_mask(q, k, v, dense), (q, k, v)
    )


def test_local_bottom_right_alignment():
    """T_q != T_k: query i sits at key position i + T_k - T_q (the library's convention)."""
    q, _, _ = qkv(T=40)
    _, k, v = qkv(T=97, seed=3)
    o = local_attention(q, k, v, window=(9, 4), causal=False)
    ref = attention(q, k, v, window=(9, 4), backend="reference")
    assert_same_fwd_bwd(o, ref, (q, k, v))


@CAUSAL
@pytest.mark.parametrize("window,dilation", [(5, 3), (4, 1), (3, 40)])
def test_dilated_matches_reference(causal, window, dilation):
    q, k, v = qkv(T=97)
    i, j = _pairs(97)
    d = i - j
    dense = (d % dilation == 0) & (d <= (window - 1) * dilation) & (d >= (0 if causal else -(window - 1) * dilation))
    assert_same_fwd_bwd(
        dilated_attention(q, k, v, window=window, dilation=dilation, causal=causal),
        reference_with_mask(q, k, v, dense),
        (q, k, v),
    )


@CAUSAL
@pytest.mark.parametrize("T,stride", [(97, 10), (128, 16), (64, 1), (50, 64)])
def test_strided_matches_reference(causal, T, stride):
    """Band of ``stride`` plus the summary columns j = stride - 1 (mod stride); a column that is also in
    the band is counted once (the appended copy is masked), so the engine equals the dense union."""
    q, k, v = qkv(T=T)
    i, j = _pairs(T)
    band = (i - j < stride) & (j - i < (1 if causal else stride))
    column = (j % stride == stride - 1) & ((j <= i) if causal else torch.ones_like(band))
    assert_same_fwd_bwd(
        strided_attention(q, k, v, stride=stride, causal=causal), reference_with_mask(q, k, v, band | column), (q, k, v)
    )


def test_strided_two_hops_reach_the_past():
    """Sparse Transformer's point: every earlier key is at most two hops away."""
    T, stride = 100, 10
    m = REGISTRY["strided"].dense_mask(torch.zeros(1, T, 1, 4), torch.zeros(1, T, 1, 4), causal=True, stride=stride)
    m = m[0, 0].float()
    two_hops = (m @ m) > 0
    assert torch.equal(two_hops, torch.tril(torch.ones(T, T, dtype=torch.bool)))
    assert m.sum() < 0.3 * T * (T + 1) / 2  # and it is sparse


@CAUSAL
@pytest.mark.parametrize("T,block,g,w,r", [(97, 8, 1, 3, 2), (256, 16, 2, 1, 3), (64, 16, 0, 2, 0)])
def test_bigbird_matches_reference(causal, T, block, g, w, r):
    q, k, v = qkv(T=T)
    kw = dict(block=block, num_global_blocks=g, num_window_blocks=w, num_random_blocks=r, causal=causal, seed=5)
    dense = bigbird_mask(q, k, **kw).to_dense()
    assert dense.shape == (1, 4, T, T)  # random blocks per head
    assert_same_fwd_bwd(bigbird_attention(q, k, v, **kw), reference_with_mask(q, k, v, dense), (q, k, v))


def _tiles(bm):
    """Selected tiles as a bool [Bm, Hm, n, n] table."""
    Bm, Hm, n, nk = bm.shape
    valid = torch.arange(bm.kv_indices.shape[-1]) < bm.kv_counts[..., None]
    return torch.zeros(Bm, Hm, n, nk, dtype=torch.int64).scatter_add(-1, bm.kv_indices, valid.long()) > 0


@CAUSAL
def test_bigbird_structure_and_seed(causal):
    q, k, _ = qkv(T=256)
    kw = dict(block=8, num_global_blocks=2, num_window_blocks=3, num_random_blocks=3, causal=causal)
    a, b, c = (_tiles(bigbird_mask(q, k, seed=s, **kw))[0] for s in (11, 11, 12))
    assert torch.equal(a, b), "same seed must give the same blocks"
    assert not torch.equal(a, c), "another seed should draw other random blocks"
    assert not torch.equal(a[0], a[1]), "heads draw their own random blocks"
    n = 32
    i, j = _pairs(n)
    glob = (j < 2) | (i < 2)
    win = ((i - j >= 0) & (i - j <= 2)) if causal else ((i - j).abs() <= 1)
    fixed = (glob | win) & ((j <= i) if causal else True)
    assert (a | ~fixed).all(), "global and window blocks are always selected"
    random = a & ~fixed
    count = random.sum(-1)
    eligible = (~fixed & ((j < i) if causal else True)).sum(-1)
    assert torch.equal(count, torch.minimum(eligible, torch.tensor(3)).expand_as(count))
    if causal:
        assert not (random & ~(j < i)).any(), "random blocks must lie strictly in the past"
        assert not (a & (j > i)).any()


def _axial_reference(q, k, v, rows, cols, causal):
    """Row then column attention written as two dense-masked reference calls on the flat sequence."""
    t = torch.arange(rows * cols)
    r, c = t // cols, t % cols
    same_row = (r.view(-1, 1) == r.view(1, -1)) & ((c.view(1, -1) <= c.view(-1, 1)) if causal else True)
    same_col = (c.view(-1, 1) == c.view(1, -1)) & ((r.view(1, -1) <= r.view(-1, 1)) if causal else True)
    o_row = attention(q, k, v, mask_mod=lambda b, h, i, j: same_row[i, j], backend="reference")
    G = q.shape[2] // k.shape[2]
    return attention(
        q, k.repeat_interleave(G, 2), o_row, mask_mod=lambda b, h, i, j: same_col[i, j], backend="reference"
    )


@CAUSAL
@pytest.mark.parametrize("grid", [(8, 12), (1, 30), (13, 1), (5, 7)])
def test_axial_equals_two_reference_calls(causal, grid):
    rows, cols = grid
    q, k, v = qkv(T=rows * cols)
    assert_same_fwd_bwd(
        axial_attention(q, k, v, grid=grid, causal=causal), _axial_reference(q, k, v, rows, cols, causal), (q, k, v)
    )


def test_axial_reaches_every_value():
    """Non-causal: every value influences every output after the two passes."""
    q, k, v = qkv(B=1, T=6 * 5, Hq=1, Hkv=1)
    o = axial_attention(q, k, v, grid=(6, 5))
    (gv,) = torch.autograd.grad(o[0, 0].sum(), v)
    assert (gv.abs().sum(-1) > 0).all()


@pytest.mark.parametrize(
    "fn,kw",
    [
        (local_attention, dict(window=9)),
        (dilated_attention, dict(window=4, dilation=3)),
        (strided_attention, dict(stride=8)),
        (bigbird_attention, dict(block=8, num_random_blocks=3, seed=2)),
        (axial_attention, dict(grid=(8, 12))),
    ],
    ids=["local", "dilated", "strided", "bigbird", "axial"],
)
@pytest.mark.parametrize("t0", [37, 64])
def test_causal_no_lookahead(fn, kw, t0):
    q, k, v = qkv(T=96)
    assert_no_lookahead(fn, q, k, v, t0, causal=True, **kw)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q, k, v: local_attention(q, k, v, window=0), "window"),
        (lambda q, k, v: dilated_attention(q, k, v, window=3, dilation=0), "dilation"),
        (lambda q, k, v: dilated_attention(q, k[:, :50], v[:, :50], window=3, dilation=2), "seq_q"),
        (lambda q, k, v: strided_attention(q, k, v, stride=0), "stride"),
        (lambda q, k, v: strided_attention(q, k[:, :50], v[:, :50], stride=4), "seq_q"),
        (lambda q, k, v: bigbird_attention(q, k, v, block=0), "block"),
        (lambda q, k, v: bigbird_attention(q, k, v, block=16, num_random_blocks=9), "num_random_blocks"),
        (lambda q, k, v: bigbird_attention(q, k, v, block=16, num_window_blocks=0), "num_window_blocks"),
        (lambda q, k, v: bigbird_attention(q, k, v, block=16, seed=1.5), "seed"),
        (lambda q, k, v: axial_attention(q, k, v, grid=(7, 7)), "grid"),
        (lambda q, k, v: axial_attention(q, k, v, grid=(8, 12), causal=1), "causal"),
        (lambda q, k, v: local_attention(q, k[..., :8], v, window=4), "head_dim"),
    ],
)
def test_bad_input(call, match):
    q, k, v = qkv(T=96)
    with pytest.raises((ValueError, TypeError), match=match):
        call(q, k, v)


@pytest.mark.parametrize("name", ["local", "dilated", "strided", "bigbird", "axial"])
@pytest.mark.parametrize("T", [64, 97])
def test_registry_entries(name, T):
    """Registered with params valid at small T; where a dense mask exists it states exactly what runs."""
    m = REGISTRY[name]
    assert not m.content_based
    q, k, v = qkv(T=T, B=1)
    for causal in m.causal_modes:
        p = m.make_params(T)
        o = m.attend(q, k, v, causal=causal, **p)
        dense = m.dense_mask(q, k, causal=causal, **p)
        if name == "axial":
            assert dense is None
            continue
        torch.testing.assert_close(o, reference_with_mask(q, k, v, dense), rtol=1e-5, atol=1e-5)


def test_docstring_examples():
    run_doctests(static_mod)
