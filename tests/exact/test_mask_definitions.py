"""Mask and score rules checked against definitions written out here, not borrowed from the library.

Each rule is a plain formula over index grids (``i`` = the query's position, ``j`` = the key's), taken
from the rule's docstring and paper. Two checks per rule: the library's rule evaluated on the grid
equals the formula, and ``attention()`` on every backend that runs it equals a dense float64 softmax
built in this file from the formula (so a wrongly defined rule cannot pass by agreeing with itself).
``T_q < T_k`` (offset > 0) and ``T_q > T_k`` (offset < 0: the first queries see no key when causal)
are both covered.
"""

from __future__ import annotations

import math

import pytest
import torch

from effattn import attention, explain
from effattn.exact import (
    alibi,
    alibi_slopes,
    causal_mask,
    dilated_mask,
    document_mask,
    global_local_mask,
    prefix_lm_mask,
    relative_position_bias,
    sliding_window_mask,
    streaming_mask,
    tanh_softcap,
)

H, HKV, D = 4, 2, 16
SHAPES = [(37, 37), (13, 50), (50, 21)]  # (T_q, T_k): square, T_q < T_k, T_q > T_k


def _grid(Tq, Tk):
    off = Tk - Tq
    i = (torch.arange(Tq) + off).view(Tq, 1)  # query positions, bottom-right aligned
    j = torch.arange(Tk).view(1, Tk)
    return i, j, off


# name -> (library rule factory (offset) -> mask_mod, formula (i, j) -> bool grid)
MASK_RULES = {
    "causal": (lambda off: causal_mask(off), lambda i, j: j <= i),
    "window_left7": (lambda off: sliding_window_mask(7, 0, off), lambda i, j: (i - 7 <= j) & (j <= i)),
    "window_3_4": (lambda off: sliding_window_mask(3, 4, off), lambda i, j: (i - 3 <= j) & (j <= i + 4)),
    "prefix_lm_9": (lambda off: prefix_lm_mask(9, off), lambda i, j: (j < 9) | (j <= i)),
    "streaming_w6_s2": (lambda off: streaming_mask(6, 2, off), lambda i, j: (j <= i) & ((j < 2) | (i - j < 6))),
    # dilated: `window` keys at distances 0, d, ..., (window - 1) d behind (and ahead when not causal)
    "dilated_causal_4x3": (
        lambda off: dilated_mask(4, 3, off, causal=True),
        lambda i, j: ((i - j) % 3 == 0) & (i - j >= 0) & (i - j <= 3 * 3),
    ),
    "dilated_both_3x2": (
        lambda off: dilated_mask(3, 2, off, causal=False),
        lambda i, j: ((i - j) % 2 == 0) & ((i - j).abs() <= 2 * 2),
    ),
    # Longformer: global positions see and are seen by all; otherwise |i - j| < w (non-causal int window)
    "global_local_3_5": (
        lambda off: global_local_mask(3, 5, off),
        lambda i, j: (i < 3) | (j < 3) | ((i - j).abs() < 5),
    ),
    "global_local_causal_3_5": (
        lambda off: global_local_mask(3, 5, off, causal=True),
        lambda i, j: (j <= i) & ((i < 3) | (j < 3) | (i - j < 5)),
    ),
}


def _dense_reference(q, k, v, allowed, bias=None, cap=None, scale=None):
    """softmax(q k^T * scale [+ softcap] [+ bias], masked by ``allowed [Tq, Tk]``) v in float64; rows
    with no allowed key give zeros."""
    G = q.shape[2] // k.shape[2]
    qf, kf, vf = q.double(), k.double().repeat_interleave(G, 2), v.double().repeat_interleave(G, 2)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    if bias is not None:
        s = s + bias.double()
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vf)


def _qkv(Tq, Tk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, Tq, H, D, generator=g),
        torch.randn(2, Tk, HKV, D, generator=g),
        torch.randn(2, Tk, HKV, D, generator=g),
    )


def _backends(q, k, v, **kw):
    """Every backend that accepts the call (its declaration says so), plus auto."""
    runnable = [b for b, reasons in explain(q, k, v, **kw).reasons.items() if not reasons]
    return sorted(set(runnable) | {"auto"})


@pytest.mark.parametrize("Tq,Tk", SHAPES)
@pytest.mark.parametrize("name", sorted(MASK_RULES))
def test_mask_rule_matches_its_definition(name, Tq, Tk):
    make, formula = MASK_RULES[name]
    i, j, off = _grid(Tq, Tk)
    expected = formula(i, j)
    got = make(off)(torch.zeros(()), torch.zeros(()), torch.arange(Tq).view(Tq, 1), j)
    assert torch.equal(got.expand(Tq, Tk), expected), name
    q, k, v = _qkv(Tq, Tk)
    ref = _dense_reference(q, k, v, expected)
    for backend in _backends(q, k, v, mask_mod=make(off)):
        out = attention(q, k, v, mask_mod=make(off), backend=backend)
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5, msg=f"{name} on {backend}")


@pytest.mark.parametrize("Tq,Tk", SHAPES)
@pytest.mark.parametrize("kind", ["causal", "window", "window_pair"])
def test_keyword_masks_match_definitions(kind, Tq, Tk):
    """``causal=`` and ``window=`` keywords (int: the ``w`` keys ending at the query when causal,
    ``|i - j| < w`` otherwise; pair ``(left, right)``: ``i - left <= j <= i + right``)."""
    i, j, _ = _grid(Tq, Tk)
    kw, allowed = {
        "causal": ({"causal": True}, j <= i),
        "window": ({"causal": True, "window": 5}, (j <= i) & (i - j < 5)),
        "window_pair": ({"window": (4, 2)}, (i - 4 <= j) & (j <= i + 2)),
    }[kind]
    q, k, v = _qkv(Tq, Tk, 1)
    ref = _dense_reference(q, k, v, allowed)
    for backend in _backends(q, k, v, **kw):
        torch.testing.assert_close(attention(q, k, v, backend=backend, **kw).double(), ref, atol=2e-6, rtol=1e-5)


def test_alibi_slopes_definition():
    """Press et al. 2022: for n a power of two, slope_h = 2^(-8 h / n), h = 1..n; otherwise the slopes of
    the largest power of two c < n, then every other slope of 2c."""
    for n in (1, 2, 4, 8, 16):
        expected = torch.tensor([2 ** (-8 * h / n) for h in range(1, n + 1)])
        torch.testing.assert_close(alibi_slopes(n).float(), expected.float())
    n, c = 12, 8
    expected = [2 ** (-8 * h / c) for h in range(1, c + 1)] + [2 ** (-8 * h / (2 * c)) for h in range(1, 2 * c + 1)][
        0::2
    ][: n - c]
    torch.testing.assert_close(alibi_slopes(n).float(), torch.tensor(expected).float())


@pytest.mark.parametrize("Tq,Tk", SHAPES)
@pytest.mark.parametrize("kind", ["alibi", "softcap", "relative_bias", "alibi_softcap_window"])
def test_score_rules_match_definitions(kind, Tq, Tk):
    """ALiBi: ``s - slope_h |i - j|``; softcap: ``cap tanh(s / cap)`` before any bias; relative bias:
    ``s + table[h, clamp(j - i, -m, m) + m]``."""
    i, j, off = _grid(Tq, Tk)
    q, k, v = _qkv(Tq, Tk, 2)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    table = torch.randn(H, 2 * 5 + 1, generator=torch.Generator().manual_seed(4))
    dist = (i - j).abs().double()
    causal = j <= i
    if kind == "alibi":
        cases = [({"causal": True, "alibi_slopes": slopes}, {"causal": True, "score_mod": alibi(slopes, off)})]
        bias, cap, allowed = -slopes.double().view(H, 1, 1) * dist, None, causal
    elif kind == "softcap":
        cases = [({"softcap": 1.5}, {"score_mod": tanh_softcap(1.5)})]
        bias, cap, allowed = None, 1.5, torch.ones(Tq, Tk, dtype=torch.bool)
    elif kind == "relative_bias":
        cases = [({"score_mod": relative_position_bias(table, 5, off)},)]
        rel = (j - i).clamp(-5, 5) + 5
        bias, cap, allowed = table[:, rel], None, torch.ones(Tq, Tk, dtype=torch.bool)
    else:
        cases = [({"causal": True, "window": 6, "alibi_slopes": slopes, "softcap": 2.0},)]
        bias, cap, allowed = -slopes.double().view(H, 1, 1) * dist, 2.0, causal & (i - j < 6)
    ref = _dense_reference(q, k, v, allowed, bias=bias, cap=cap)
    for forms in cases:
        for kw in forms:
            for backend in _backends(q, k, v, **kw):
                out = attention(q, k, v, backend=backend, **kw)
                torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5, msg=f"{kind} {kw} {backend}")


def test_documents_definition():
    """Packed documents: ``doc(i) == doc(j)``, with ``doc`` from the offsets ``cu_seqlens``."""
    cu = [0, 7, 8, 30, 41]
    T = cu[-1]
    doc = torch.tensor([d for d in range(len(cu) - 1) for _ in range(cu[d + 1] - cu[d])])
    allowed = doc.view(T, 1) == doc.view(1, T)
    q, k, v = (x[:1] for x in _qkv(T, T, 3))
    for causal in (False, True):
        want = allowed & (torch.arange(T).view(1, T) <= torch.arange(T).view(T, 1)) if causal else allowed
        ref = _dense_reference(q, k, v, want)
        kw = {"cu_seqlens": torch.tensor(cu), "causal": causal}
        for backend in _backends(q, k, v, **kw):
            torch.testing.assert_close(attention(q, k, v, backend=backend, **kw).double(), ref, atol=2e-6, rtol=1e-5)
        out = attention(q, k, v, mask_mod=document_mask(doc) if not causal else None, causal=causal)
        if not causal:
            torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "tiled", "sdpa"])
def test_more_queries_than_keys_causal(backend):
    """T_q > T_k, causal, bottom-right: the first T_q - T_k queries see no key and give zeros (and a
    -inf lse); the rest see keys 0..(i - (T_q - T_k))."""
    Tq, Tk = 50, 21
    q, k, v = _qkv(Tq, Tk, 5)
    q.requires_grad_(True)
    if explain(q, k, v, causal=True).reasons.get(backend):
        pytest.skip(f"{backend} does not run T_q > T_k causal")
    o, lse = attention(q, k, v, causal=True, return_lse=True, backend=backend)
    i, j, _ = _grid(Tq, Tk)
    ref = _dense_reference(q.detach(), k, v, j <= i)
    torch.testing.assert_close(o.double(), ref, atol=2e-6, rtol=1e-5)
    assert torch.equal(o[:, : Tq - Tk], torch.zeros_like(o[:, : Tq - Tk]))
    assert bool((lse[:, :, : Tq - Tk] == float("-inf")).all())
    (dq,) = torch.autograd.grad(o.square().sum(), q)
    assert torch.isfinite(dq).all() and torch.equal(dq[:, : Tq - Tk], torch.zeros_like(dq[:, : Tq - Tk]))
