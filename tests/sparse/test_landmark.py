"""Landmark attention (effattn.sparse.landmark) against a dense float64 grouped softmax built here, the
retrieval form against the same reference restricted to the top-k landmarks, decode == full, no
future leakage; the ``landmark`` mixer's training/retrieval modes."""

import pytest
import torch

from effattn.nn import build_mixer
from effattn.sparse import LandmarkDecodeState, landmark_attention, landmark_decode_state, step_landmark_attention
from tests.helpers import assert_fp32_close


def dense_landmark(q, k, v, lms, block, top_k=None, bias=None):
    """The grouped softmax as one dense float64 weight matrix ``W [B, H, T, T]``, written from the paper's
    definition: own-block tokens ``j <= t`` and the landmarks of the (retrieved) earlier blocks share one
    softmax; a landmark's weight is spread over its block by the block's own softmax."""
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    q, k, v, lms = (x.double() for x in (q, k, v, lms))
    k, v, lms = (x.repeat_interleave(G, 2) for x in (k, v, lms))
    S = torch.einsum("bthd,bshd->bhts", q, k) / D**0.5
    L = torch.einsum("bthd,brhd->bhtr", q, lms) / D**0.5
    if bias is not None:  # a per-head offset on the landmark logits (the mixer's learned c_h)
        L = L + bias.double().view(1, Hq, 1, 1)
    t = torch.arange(T).view(T, 1)
    j = torch.arange(T).view(1, T)
    nb = lms.shape[1]
    own = (j // block == t // block) & (j <= t)
    seen = torch.arange(nb).view(1, nb) < t // block  # landmarks of complete earlier blocks
    seen = seen.expand(B, Hq, T, nb)
    if top_k is not None:
        ranked = L.masked_fill(~seen, float("-inf")).argsort(-1, descending=True)
        rank = ranked.argsort(-1)
        seen = seen & (rank < top_k)
    top = torch.softmax(torch.cat([S.masked_fill(~own, float("-inf")), L.masked_fill(~seen, float("-inf"))], -1), -1)
    W = top[..., :T].clone()
    inner = S[..., : nb * block].reshape(B, Hq, T, nb, block).softmax(-1)
    W[..., : nb * block] += (top[..., T:, None] * inner).reshape(B, Hq, T, nb * block)
    return torch.einsum("bhts,bshd->bthd", W, v), W


def inputs(B=2, T=37, Hq=4, Hkv=2, D=8, block=5, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g)
    k, v = (torch.randn(B, T, Hkv, D, generator=g) for _ in range(2))
    lms = 2 * torch.randn(B, T // block, Hkv, D, generator=g)  # spread landmark scores: retrieval matters
    return [x.requires_grad_(grad) for x in (q, k, v, lms)]


@pytest.mark.parametrize("T,block,Hq,Hkv", [(1, 4, 2, 2), (37, 5, 4, 2), (63, 8, 2, 1), (40, 8, 2, 2), (17, 1, 2, 2)])
@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_matches_dense_grouped_softmax(T, block, Hq, Hkv, top_k):
    q, k, v, lms = inputs(T=T, block=block, Hq=Hq, Hkv=Hkv, grad=True)
    o = landmark_attention(q, k, v, lms, block=block, top_k=top_k)
    ref, W = dense_landmark(q, k, v, lms, block, top_k)
    assert torch.allclose(W.sum(-1), torch.ones((), dtype=W.dtype))  # a distribution per query
    assert not bool(W.triu(1).any())  # the reference reads no later key
    assert_fp32_close(o, ref)
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v, lms), do, allow_unused=True)
    want = torch.autograd.grad(ref, (q, k, v, lms), do.double(), allow_unused=True)
    for g, w, n in zip(got, want, ("q", "k", "v", "landmarks")):
        if g is None or w is None:  # no landmark is ever read (T < 2 blocks)
            assert (g is None or not g.any()) and (w is None or not w.any())
            continue
        assert_fp32_close(g, w, 1e-4, "d" + n)


@pytest.mark.parametrize("top_k", [None, 2])
def test_landmark_bias(top_k):
    """A per-head offset on the landmark logits: equal to the dense reference with it (forward and the
    bias's gradient), the retrieval unchanged by it, and with zero offset the paper's form."""
    q, k, v, lms = inputs(T=41, block=5, grad=True)
    bias = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    o = landmark_attention(q, k, v, lms, block=5, top_k=top_k, landmark_bias=bias)
    ref, _ = dense_landmark(q, k, v, lms, 5, top_k, bias)
    assert_fp32_close(o, ref)
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, lms, bias), do)
    want = torch.autograd.grad(ref, (q, lms, bias), do.double())
    for g, w, n in zip(got, want, ("q", "landmarks", "bias")):
        assert_fp32_close(g, w, 1e-4, "d" + n)
    plain = landmark_attention(q, k, v, lms, block=5, top_k=top_k)
    assert torch.equal(landmark_attention(q, k, v, lms, block=5, top_k=top_k, landmark_bias=0.0), plain)
    assert not torch.allclose(o, plain, atol=1e-3)
    with pytest.raises(ValueError, match="landmark_bias"):
        landmark_attention(q, k, v, lms, block=5, landmark_bias=torch.zeros(3))


def test_block_weights_are_the_landmark_softmax():
    """The defining property, checked on the reference itself: the total weight a query gives to an
    earlier block equals that block's landmark probability in the top-level softmax, whatever the keys."""
    q, k, v, lms = inputs(B=1, T=30, Hq=2, Hkv=2, block=6)
    _, W = dense_landmark(q, k, v, lms, 6)
    t = 25  # block 4 (tokens 24, 25 visible); blocks 0..3 earlier
    for h in range(2):
        own = torch.einsum("d,jd->j", q[0, t, h].double(), k[0, 24:26, h].double()) / 8**0.5
        lm = torch.einsum("d,rd->r", q[0, t, h].double(), lms[0, :4, h].double()) / 8**0.5
        p = torch.softmax(torch.cat([own, lm]), 0)
        per_block = W[0, h, t, :24].view(4, 6).sum(-1)
        assert torch.allclose(per_block, p[2:]) and torch.allclose(W[0, h, t, 24:26], p[:2])


def test_top_k_at_least_blocks_is_the_training_form():
    q, k, v, lms = inputs(T=50, block=7)
    full = landmark_attention(q, k, v, lms, block=7)
    assert torch.equal(landmark_attention(q, k, v, lms, block=7, top_k=7), full)
    assert not torch.allclose(landmark_attention(q, k, v, lms, block=7, top_k=2), full, atol=1e-3)


def test_retrieval_reads_only_the_selected_blocks():
    """Values of blocks no query retrieves may hold anything (NaN included): the retrieval form never
    reads them. Block 1's landmark is made the lowest for every later query, so with top_k = 1 the
    queries of blocks 2 and 3 never read block 1."""
    q, k, v, lms = inputs(B=1, T=32, Hq=2, Hkv=2, block=8)
    q, lms = q.clone(), 0.1 * lms
    q[..., 0] = 5 + q[..., 0].abs()  # every query points along channel 0 ...
    lms[..., 0] = 10.0
    lms[:, 1, :, 0] = -10.0  # ... so block 1's landmark scores far below the others for every query
    o = landmark_attention(q, k, v, lms, block=8, top_k=1)
    v2 = v.clone()
    v2[:, 8:16] = float("nan")
    o2 = landmark_attention(q, k, v2, lms, block=8, top_k=1)
    assert torch.isfinite(o2[:, 16:]).all() and torch.equal(o[:, 16:], o2[:, 16:])  # block 1's own rows read it


def test_decode_equals_full():
    q, k, v, lms = inputs(B=2, T=29, block=4)
    for top_k in (None, 2):
        full = landmark_attention(q, k, v, lms, block=4, top_k=top_k)
        st, outs = None, []
        for t in range(29):
            new = (t + 1) // 4 - t // 4
            lm = lms[:, t // 4 : t // 4 + 1] if new else None
            o, st = step_landmark_attention(
                q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], st, block=4, top_k=top_k, landmarks=lm
            )
            outs.append(o)
        assert_fp32_close(torch.cat(outs, 1), full, name=f"decode top_k={top_k}")
        # prefill of 10 (state from landmark_decode_state), then a chunk of 13 crossing block edges, then 6
        st = landmark_decode_state(k[:, :10], v[:, :10], lms[:, :2], block=4)
        o1, st = step_landmark_attention(
            q[:, 10:23], k[:, 10:23], v[:, 10:23], st, block=4, top_k=top_k, landmarks=lms[:, 2:5]
        )
        o2, st = step_landmark_attention(
            q[:, 23:], k[:, 23:], v[:, 23:], st, block=4, top_k=top_k, landmarks=lms[:, 5:7]
        )
        assert_fp32_close(torch.cat([o1, o2], 1), full[:, 10:], name="chunked continuation")
        assert isinstance(st, LandmarkDecodeState) and st.landmarks.shape[1] == 7 and st.nbytes > 0


@pytest.mark.parametrize("top_k", [None, 1])
def test_no_future_leakage(top_k):
    q, k, v, lms = inputs(B=1, T=40, block=6)
    t = 20  # block 3; landmarks of blocks >= 3 are not complete before t + 1 = 21 ... block 3 ends at 23
    o = landmark_attention(q, k, v, lms, block=6, top_k=top_k)
    q2, k2, v2, l2 = (x.clone() for x in (q, k, v, lms))
    for x in (q2, k2, v2):
        x[:, t + 1 :] = 5 * torch.randn_like(x[:, t + 1 :])
    l2[:, 3:] = 5 * torch.randn_like(l2[:, 3:])
    o2 = landmark_attention(q2, k2, v2, l2, block=6, top_k=top_k)
    assert torch.equal(o[:, : t + 1], o2[:, : t + 1])
    assert not torch.allclose(o[:, t + 1 :], o2[:, t + 1 :])


def test_bad_input():
    q, k, v, lms = inputs(T=20, block=4)
    with pytest.raises(ValueError, match="landmarks"):
        landmark_attention(q, k, v, lms[:, :3], block=4)
    with pytest.raises(ValueError, match="seq_q"):
        landmark_attention(q[:, :8], k, v, lms, block=4)
    with pytest.raises(ValueError, match="top_k"):
        landmark_attention(q, k, v, lms, block=4, top_k=0)
    with pytest.raises(ValueError, match="landmarks"):  # tokens 0..7 complete two blocks
        step_landmark_attention(q[:, :8], k[:, :8], v[:, :8], None, block=4)
    with pytest.raises(TypeError, match="state"):
        step_landmark_attention(q[:, :1], k[:, :1], v[:, :1], (k, v), block=4)


def test_mixer_modes_and_retrieval():
    """Training mode reads every block (the grouped softmax); evaluation retrieves top_k, and a top_k at
    least the number of blocks gives the training output; decode == full with retrieval (the registry
    tests run the defaults, where top_k covers every block of their short inputs)."""
    torch.manual_seed(0)
    mixer = build_mixer("landmark", dim=32, heads=2, block=3, top_k=1)
    x = torch.randn(2, 23, 32)
    y_train = mixer.train()(x)[0]
    y_eval = mixer.eval()(x)[0]
    assert not torch.allclose(y_train, y_eval, atol=1e-4)
    mixer.top_k = 7
    assert_fp32_close(mixer(x)[0], y_train)
    mixer.top_k = 2
    y, ys, st = mixer(x)[0], [], None
    for t in range(23):
        o, st = mixer(x[:, t : t + 1], st)
        ys.append(o)
    assert_fp32_close(torch.cat(ys, 1), y)
    y_pre, st = mixer(x[:, :11])
    y_rest, _ = mixer(x[:, 11:], st)
    assert_fp32_close(torch.cat([y_pre, y_rest], 1), y)
