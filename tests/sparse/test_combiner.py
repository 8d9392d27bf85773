"""Combiner: engine vs its dense reference, reduction to full attention, reachability, causality."""

import pytest
import torch

from effattn import attention
from effattn.sparse import REGISTRY, combiner_attention, combiner_reference
from effattn.sparse import combiner as combiner_mod
from tests.sparse._blockwise_checks import assert_no_lookahead, assert_same_fwd_bwd, qkv, run_doctests

CAUSAL = pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])


@CAUSAL
@pytest.mark.parametrize("T,block", [(97, 7), (97, 16), (128, 64), (130, 64), (64, 5)])
def test_matches_reference(causal, T, block):
    q, k, v = qkv(T=T)
    assert_same_fwd_bwd(
        combiner_attention(q, k, v, block=block, causal=causal),
        combiner_reference(q, k, v, block=block, causal=causal),
        (q, k, v),
    )


@CAUSAL
def test_matches_explicit_formula(causal):
    """One query at a time: softmax over [own-block keys | summaries of the other (earlier) blocks]."""
    q, k, v = qkv(B=1, T=30, Hq=2, Hkv=1, D=8)
    block, scale = 7, 8**-0.5
    o = combiner_attention(q, k, v, block=block, causal=causal)
    qd, kd, vd = q.detach().double(), k.detach().double(), v.detach().double()
    n = 5
    for t in range(30):
        i = t // block
        own = range(i * block, min((i + 1) * block, t + 1 if causal else 30))
        others = range(i) if causal else [j for j in range(n) if j != i]
        keys = [kd[0, j, 0] for j in own] + [kd[0, j * block : (j + 1) * block, 0].mean(0) for j in others]
        vals = [vd[0, j, 0] for j in own] + [vd[0, j * block : (j + 1) * block, 0].mean(0) for j in others]
        for h in range(2):
            p = torch.softmax(torch.stack(keys) @ qd[0, t, h] * scale, 0)
            torch.testing.assert_close(o[0, t, h].double(), p @ torch.stack(vals), rtol=1e-5, atol=1e-6)


@CAUSAL
@pytest.mark.parametrize("block", [1, 97, 200])
def test_block_1_or_whole_sequence_is_full_attention(causal, block):
    """block = 1: every summary is a token; one block: all keys are local. Both are exact attention."""
    q, k, v = qkv(T=97)
    o = combiner_attention(q, k, v, block=block, causal=causal)
    assert_same_fwd_bwd(o, attention(q, k, v, causal=causal, backend="reference"), (q, k, v))


@CAUSAL
def test_every_position_is_reachable(causal):
    """d o_t / d v_j != 0 for every visible j (directly or through a summary) and == 0 for the future."""
    q, k, v = qkv(B=1, T=50, Hq=1, Hkv=1)
    o = combiner_attention(q, k, v, block=8, causal=causal)
    for t in (0, 13, 49):
        (gv,) = torch.autograd.grad(o[0, t].sum(), v, retain_graph=True)
        reached = gv[0, :, 0].abs().sum(-1) > 0
        want = torch.arange(50) <= t if causal else torch.ones(50, dtype=torch.bool)
        assert torch.equal(reached, want), f"t={t}"


@pytest.mark.parametrize("t0", [20, 32, 77])
def test_causal_no_lookahead(t0):
    q, k, v = qkv(T=96)
    assert_no_lookahead(combiner_attention, q, k, v, t0, block=16, causal=True)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q, k, v: combiner_attention(q, k, v, block=0), "block"),
        (lambda q, k, v: combiner_attention(q, k, v, block=8.0), "block"),
        (lambda q, k, v: combiner_attention(q[:, :40], k, v, block=8), "seq_q"),
        (lambda q, k, v: combiner_attention(q, k, v[:, :, :1].expand(-1, -1, 3, -1), block=8), "heads"),
        (lambda q, k, v: combiner_attention(q, k, v, block=8, causal="no"), "causal"),
    ],
)
def test_bad_input(call, match):
    q, k, v = qkv(T=96)
    with pytest.raises((ValueError, TypeError), match=match):
        call(q, k, v)


def test_registry_entry():
    m = REGISTRY["combiner"]
    q, k, v = qkv(T=97, B=1)
    for causal in m.causal_modes:
        p = m.make_params(97)
        assert m.dense_mask(q, k, causal=causal, **p) is None  # summary keys: compared with combiner_reference
        torch.testing.assert_close(
            m.attend(q, k, v, causal=causal, **p), combiner_reference(q, k, v, causal=causal, **p), rtol=1e-5, atol=1e-5
        )


def test_docstring_examples():
    run_doctests(combiner_mod)


# ---------------------------------------------------------------------------------- Combiner-Axial


@CAUSAL
@pytest.mark.parametrize("T,width", [(97, 10), (63, 8), (23, 5), (30, 1), (17, 17)])
def test_axial_matches_reference(causal, T, width):
    from effattn.sparse import combiner_axial_attention, combiner_axial_reference

    q, k, v = qkv(T=T)
    assert_same_fwd_bwd(
        combiner_axial_attention(q, k, v, width=width, causal=causal),
        combiner_axial_reference(q, k, v, width=width, causal=causal),
        (q, k, v),
    )


@CAUSAL
def test_axial_matches_explicit_formula(causal):
    """One query at a time: softmax over [own-row keys | per column, the mean of that column's other
    (causal: earlier) rows]."""
    from effattn.sparse import combiner_axial_attention

    q, k, v = qkv(B=1, T=22, Hq=2, Hkv=1, D=8)
    W, scale = 5, 8**-0.5
    o = combiner_axial_attention(q, k, v, width=W, causal=causal)
    qd, kd, vd = q.detach().double(), k.detach().double(), v.detach().double()
    for t in range(22):
        r, c = divmod(t, W)
        own = [j for j in range(r * W, min(r * W + W, 22)) if not causal or j <= t]
        keys, vals = [kd[0, j, 0] for j in own], [vd[0, j, 0] for j in own]
        for c2 in range(W):
            region = [r2 * W + c2 for r2 in range(5) if (r2 < r if causal else r2 != r) and r2 * W + c2 < 22]
            if region:
                keys.append(kd[0, region, 0].mean(0))
                vals.append(vd[0, region, 0].mean(0))
        for h in range(2):
            p = torch.softmax(torch.stack(keys) @ qd[0, t, h] * scale, 0)
            torch.testing.assert_close(o[0, t, h].double(), p @ torch.stack(vals), atol=1e-5, rtol=1e-5)


@CAUSAL
def test_axial_one_row_is_full_attention_and_no_lookahead(causal):
    from effattn.sparse import combiner_axial_attention

    q, k, v = qkv(T=29)
    full = attention(q, k, v, causal=causal, backend="reference")
    assert_same_fwd_bwd(combiner_axial_attention(q, k, v, width=29, causal=causal), full, (q, k, v))
    if causal:
        for t0 in (1, 12, 28):
            assert_no_lookahead(combiner_axial_attention, q, k, v, t0, width=6, causal=True)
