"""RoPE inside the segments of Titans MAC, Infini-attention and RMT (issue #18): ``rope=False`` gives the
outputs of the layers without positions (recorded before RoPE was added), a query's output depends on the
order of the earlier keys, and decoding, split calls, left padding, causality and gradients hold with RoPE."""

from __future__ import annotations

import pytest
import torch

from effattn.exact import RotaryEmbedding
from effattn.memory import RecurrentMemoryAttention, infini_attention, infini_attention_reference
from effattn.nn.mixers.infini_attention import InfiniAttentionMixer
from effattn.nn.mixers.rmt import RMTMixer
from effattn.nn.mixers.titans import TitansMAC, segment_attention

MIXERS = {
    "titans_mac": lambda **kw: TitansMAC(16, 2, segment=4, **kw),
    "infini_attention": lambda **kw: InfiniAttentionMixer(16, 2, segment=4, **kw),
    "rmt": lambda **kw: RMTMixer(16, 2, segment=4, **kw),
}


def _mixer(name, seed=1, **kw):
    torch.manual_seed(seed)
    return MIXERS[name](**kw).eval()


def _x(B=2, T=11, seed=2):
    return torch.randn(B, T, 16, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- rope=False: today's outputs
def _fingerprint(y):
    y = y.detach().double()
    w = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
    return [float(y.sum()), float(y.square().sum()), float((y * w).sum())]


# recorded at commit 1c1610b (before RoPE), inputs as in test_rope_false_gives_the_layers_without_positions
RECORDED = {
    "seg": [-43.577660329, 111.106178346, -1.854813671],
    "seg_valid": [-46.384874731, 96.935316201, -3.120707839],
    "infini_attention": [-1.358773509, 55.488691599, -1.9182025],
    "infini_attention_reference_valid": [-8.023893642, 55.54057311, -0.723730939],
    "infini": [0.2625727, 4.629469959, -2.596336081],
    "infini_valid": [1.308041069, 5.427364792, -3.323531614],
    "rma": [0.648031519, 8.217701635, -3.422191051],
    "rma_valid": [1.380565472, 8.026265292, -3.768011572],
}


def test_rope_false_gives_the_layers_without_positions():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 11, 2, 8).unbind(0)
    p = torch.randn(3, 2, 8)
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[0, :3] = False
    g = torch.randn(2)
    got = {
        "seg": segment_attention(q, [k, v], [v, k], p, p, 4)[0],
        "seg_valid": segment_attention(q, [k, v], [v, k], p, p, 4, valid=valid)[0],
        "infini_attention": infini_attention(q, k, v, g, segment=4)[0],
        "infini_attention_reference_valid": infini_attention_reference(q, k, v, g, segment=4, valid=valid, delta=True)[
            0
        ],
    }
    x = torch.randn(2, 11, 16)
    for name, make in [
        ("infini", lambda: InfiniAttentionMixer(16, 2, segment=4, rope=False)),
        ("rma", lambda: RecurrentMemoryAttention(16, 2, segment=4, num_memory=2, rope=False, start_memory="learned")),
    ]:
        torch.manual_seed(1)
        m = make().eval()
        got[name], got[name + "_valid"] = m(x)[0], m(x, valid=valid)[0]
    for name, ref in RECORDED.items():
        assert _fingerprint(got[name]) == pytest.approx(ref, rel=1e-6, abs=1e-6), name


def test_mac_rope_false_passes_no_rotation():
    mixer, x = _mixer("titans_mac", rope=False), _x()
    assert mixer.rope is None and _mixer("titans_mac").rope is not None  # on by default
    B, T, H, D = 2, 11, 2, 8
    m, _ = mixer.memory(x)
    m = m * torch.rsqrt(m.square().mean(-1, keepdim=True) + 1e-5)  # the retrievals, RMS-normalised
    q = mixer.q_proj(x).view(B, T, H, D)
    ks = [mixer.k_proj(a).view(B, T, H, D) for a in (m, x)]
    vs = [mixer.v_proj(a).view(B, T, H, D) for a in (m, x)]
    o, _ = segment_attention(q, ks, vs, mixer.persistent_k, mixer.persistent_v, 4)
    torch.testing.assert_close(mixer(x)[0], mixer.o_proj(o.reshape(B, T, -1)), rtol=0, atol=0)


# ----------------------------------------------------------------------------- order of the keys
def _swap(x, i=1, j=2):
    y = x.clone()
    y[:, [i, j]] = x[:, [j, i]]
    return y


def _ops(rope):
    """Each op as ``f(q, k, v) -> o`` on one segment of 4 tokens."""
    p = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(1)
    rma = RecurrentMemoryAttention(16, 2, segment=4, num_memory=2, rope=rope is not None)
    heads = lambda x: x.reshape(*x.shape[:2], 16)  # noqa: E731
    return {
        "segment_attention": lambda q, k, v: segment_attention(q, [k], [v], p, p, 4, rope=rope)[0],
        "infini_attention": lambda q, k, v: infini_attention(q, k, v, torch.zeros(2), segment=4, rope=rope)[0],
        "infini_attention_reference": lambda q, k, v: infini_attention_reference(
            q, k, v, torch.zeros(2), segment=4, rope=rope
        )[0],
        "rmt": lambda q, k, v: rma(heads(q))[0],  # rmt projects x = q itself; k, v are swapped with it
    }


@pytest.mark.parametrize("op", ["segment_attention", "infini_attention", "infini_attention_reference", "rmt"])
def test_rope_makes_a_query_see_the_order_of_earlier_keys(op):
    q, k, v = torch.randn(3, 1, 4, 2, 8, generator=torch.Generator().manual_seed(3)).unbind(0)
    if op == "rmt":
        k = v = q
    outs = {}
    for rope in (None, RotaryEmbedding(8)):
        f = _ops(rope)[op]
        a, b = f(q, k, v), f(_swap(q), _swap(k), _swap(v))
        outs[rope is None] = (a, b)
    (a0, b0), (a1, b1) = outs[True], outs[False]
    # token 3 attends to tokens 0..3 by content only without RoPE: swapping tokens 1 and 2 leaves it
    torch.testing.assert_close(b0[:, 3], a0[:, 3], rtol=1e-5, atol=1e-6)
    assert (b1[:, 3] - a1[:, 3]).abs().max() > 1e-3
    torch.testing.assert_close(b1[:, 0], a1[:, 0], rtol=1e-5, atol=1e-6)  # token 0 sees neither


@pytest.mark.parametrize("name", ["infini_attention", "rmt"])
def test_mixer_output_depends_on_the_order_with_rope_only(name):
    x = _x(B=1, T=4)
    for rope in (False, True):
        mixer = _mixer(name, rope=rope)
        d = (mixer(_swap(x))[0][:, 3] - mixer(x)[0][:, 3]).abs().max()
        assert (d > 1e-3) if rope else (d < 1e-5), (rope, float(d))


def test_segment_attention_rope_matches_the_formula():
    """Token ``t`` at segment position ``i``: softmax over ``[q_t . K_p, R_i q_t . R_j k_j (j <= i, each stream)]``."""
    rope, N = RotaryEmbedding(8), 4
    q, k1, k2, v1, v2 = torch.randn(5, 1, 6, 2, 8, generator=torch.Generator().manual_seed(6)).unbind(0)
    pk, pv = torch.randn(2, 3, 2, 8).unbind(0)
    o, _ = segment_attention(q, [k1, k2], [v1, v2], pk, pv, N, rope=rope)
    rot = lambda x, i: rope.apply(x[None, None], torch.tensor([i]))[0, 0]  # noqa: E731  [H, D] at position i
    for t in range(6):
        i, s0 = t % N, t - t % N
        keys = [pk[j] for j in range(3)] + [rot(k[0, s0 + j], j) for k in (k1, k2) for j in range(i + 1)]
        vals = [pv[j] for j in range(3)] + [v[0, s0 + j] for v in (v1, v2) for j in range(i + 1)]
        qs = [q[0, t]] * 3 + [rot(q[0, t], i)] * (2 * (i + 1))
        sc = torch.stack([(a * b).sum(-1) for a, b in zip(qs, keys)], -1) / 8**0.5  # [H, n]
        ref = torch.einsum("hn,nhd->hd", torch.softmax(sc, -1), torch.stack(vals))
        torch.testing.assert_close(o[0, t], ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- state, padding, causality
def test_parallel_forms_equal_token_forms_with_rope():
    rope = RotaryEmbedding(8)
    q, k, v = torch.randn(3, 2, 11, 2, 8, generator=torch.Generator().manual_seed(4)).unbind(0)
    p = torch.randn(3, 2, 8)
    ones = torch.ones(2, 11, dtype=torch.bool)  # valid given: the token-by-token path
    a, sa = segment_attention(q, [k, v], [v, k], p, p, 4, rope=rope)
    b, sb = segment_attention(q, [k, v], [v, k], p, p, 4, valid=ones, rope=rope)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    seen = torch.arange(8) % 4 < 3  # the filled slots of both streams' buffers (the rest is never read)
    torch.testing.assert_close(sa["k"][:, seen], sb["k"][:, seen], rtol=1e-5, atol=1e-6)
    for delta in (False, True):
        kw = dict(segment=4, delta=delta, rope=rope, output_final_state=True)
        a, sa = infini_attention(q, k, v, torch.tensor([0.3, -1.0]), **kw)
        b, sb = infini_attention_reference(q, k, v, torch.tensor([0.3, -1.0]), **kw)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for n in ("M", "z", "count"):
            torch.testing.assert_close(sa[n], sb[n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sa["k"][:, :3], sb["k"][:, :3], rtol=1e-5, atol=1e-6)  # unrotated keys
        torch.testing.assert_close(sa["k"][:, :3], k[:, 8:], rtol=0, atol=0)
    torch.manual_seed(1)
    rma, x = RecurrentMemoryAttention(16, 2, segment=4, num_memory=2).eval(), _x()
    (a, sa), (b, sb) = rma(x), rma(x, valid=torch.ones(2, 11, dtype=torch.bool))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sa["mem"], sb["mem"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(MIXERS))
def test_decode_and_split_calls_equal_the_full_forward(name):
    mixer, x = _mixer(name), _x()
    full, _ = mixer(x)
    st, ys = None, []
    for t in range(x.shape[1]):
        y, st = mixer(x[:, t : t + 1], st)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-4, atol=1e-5)
    for cut in (3, 6):  # inside a segment, then a call that starts inside one
        y1, st = mixer(x[:, :cut])
        y2, st = mixer(x[:, cut:9], st)
        y3, _ = mixer(x[:, 9:], st)
        torch.testing.assert_close(torch.cat([y1, y2, y3], 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(MIXERS))
def test_left_padded_rows_equal_unpadded(name):
    mixer, x = _mixer(name), _x()
    pads = (3, 0)
    xp = torch.randn(2, 3 + 11, 16) * 5  # junk in the padding
    valid = torch.zeros(2, 14, dtype=torch.bool)
    for b, n in enumerate(pads):
        xp[b, n : n + 11] = x[b]
        valid[b, n : n + 11] = True
    yp, _ = mixer(xp, valid=valid)
    for b, n in enumerate(pads):
        torch.testing.assert_close(yp[b, n : n + 11], mixer(x[b : b + 1])[0][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(MIXERS))
def test_no_future_leakage(name):
    mixer, x = _mixer(name), _x()
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 5, 16)
    y, y2 = mixer(x)[0], mixer(x2)[0]
    torch.testing.assert_close(y2[:, :6], y[:, :6], rtol=0, atol=0)
    assert (y2[:, 6:] - y[:, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(MIXERS))
def test_gradients_flow(name):
    mixer = _mixer(name).train()
    x = _x().requires_grad_()
    mixer(x)[0].square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    named = dict(mixer.named_parameters())
    qk = [n for n in named if n.endswith(("q_proj.weight", "k_proj.weight")) and "memory." not in n]
    assert len(qk) == 2
    for n in qk:
        assert torch.isfinite(named[n].grad).all() and named[n].grad.abs().sum() > 0, n


def test_infini_attention_rope_gradcheck():
    q, k, v = (t.requires_grad_() for t in torch.randn(3, 1, 6, 1, 4, dtype=torch.float64).unbind(0))
    gate = torch.zeros(1, dtype=torch.float64)
    rope = RotaryEmbedding(4)
    for f in (infini_attention, infini_attention_reference):
        assert torch.autograd.gradcheck(lambda q, k, v, f=f: f(q, k, v, gate, segment=4, rope=rope)[0], (q, k, v))


def test_rmt_layout_positions_written_out():
    """RMT's layout with RoPE: memory keys at 0..m-1, segment token i at m + i (one attention over both), the
    write queries at m + N + j; checked against the formula on one segment and the memory it writes."""
    torch.manual_seed(3)
    m, N, H, D = 2, 4, 2, 8
    rma = RecurrentMemoryAttention(H * D, H, segment=N, num_memory=m).eval()  # it computes in float32
    x = torch.randn(1, N, H * D)
    rope = RotaryEmbedding(D)

    def heads(z):
        return z.reshape(1, -1, H, D)

    mem = rma.memory_init[None]
    q, k, v = (heads(p(x)) for p in (rma.q_proj, rma.k_proj, rma.v_proj))
    km, vm = rope.apply(heads(rma.k_proj(mem)), torch.arange(m)), heads(rma.v_proj(mem))
    qr, kr = rope.apply(q, m + torch.arange(N)), rope.apply(k, m + torch.arange(N))
    s = torch.einsum("bihd,bjhd->bhij", qr, torch.cat([km, kr], 1)) / D**0.5
    see = torch.cat([torch.ones(N, m, dtype=torch.bool), torch.ones(N, N, dtype=torch.bool).tril()], 1)
    o = torch.einsum("bhij,bjhd->bihd", s.masked_fill(~see, float("-inf")).softmax(-1), torch.cat([vm, v], 1))
    y, st = rma(x)
    torch.testing.assert_close(y, rma.o_proj(o.flatten(2)), rtol=1e-5, atol=1e-6)
    qm = rope.apply(heads(rma.q_proj(mem + rma.write_pos)), m + N + torch.arange(m))
    sw = torch.einsum("bihd,bjhd->bhij", qm, torch.cat([km, kr], 1)) / D**0.5
    w = torch.einsum("bhij,bjhd->bihd", sw.softmax(-1), torch.cat([vm, v], 1))
    torch.testing.assert_close(st["mem"], rma.mem_norm(mem + rma.o_proj(w.flatten(2))), rtol=1e-5, atol=1e-6)
