"""Titans MAL/MAG mixers: persistent memory tokens (decode == forward, they change the output and learn, no
future leakage, padding) and the state accounting (state_size == the bytes of the state a call leaves)."""

from __future__ import annotations

import pytest
import torch

from effattn.nn.mixers._base import state_nbytes
from effattn.nn.mixers.titans import TitansMAG, TitansMAL

MIXERS = {"mal": TitansMAL, "mag": TitansMAG}


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_persistent_tokens_decode_equals_forward_and_they_learn(kind):
    torch.manual_seed(0)
    mixer = MIXERS[kind](16, 2, window=4, depth=2, num_persistent=3).eval()
    x = torch.randn(2, 9, 16)
    full, _ = mixer(x)
    y, st = mixer(x[:, :5])  # prefill, then token by token
    outs = [y]
    for t in range(5, 9):
        y, st = mixer(x[:, t : t + 1], st)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    # the persistent tokens open every sequence: other values give other outputs, and they get a gradient
    with torch.no_grad():
        mixer.persistent.add_(torch.randn_like(mixer.persistent))
    changed, _ = mixer(x)
    assert (changed - full).abs().max() > 1e-3
    mixer(x)[0].square().sum().backward()
    assert mixer.persistent.grad is not None and mixer.persistent.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_persistent_tokens_no_future_leakage_and_padding(kind):
    torch.manual_seed(1)
    mixer = MIXERS[kind](16, 2, window=3, depth=1, num_persistent=2).eval()
    x = torch.randn(1, 7, 16)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(1, 3, 16)
    torch.testing.assert_close(mixer(x2)[0][:, :4], mixer(x)[0][:, :4], atol=1e-6, rtol=1e-6)
    # a left-padded row equals the unpadded one, whatever the padding holds
    pad = torch.cat([torch.full((1, 2, 16), 1e3), x], 1)
    valid = torch.tensor([[False, False] + [True] * 7])
    torch.testing.assert_close(mixer(pad, valid=valid)[0][:, 2:], mixer(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(MIXERS))
@pytest.mark.parametrize("persistent", [0, 2])
def test_state_size_is_the_state_a_call_leaves(kind, persistent):
    mixer = MIXERS[kind](16, 2, window=5, depth=2, num_persistent=persistent).eval()
    for T in (1, 3, 11):
        with torch.no_grad():
            _, state = mixer(torch.randn(2, T, 16))
        assert mixer.state_size(2, T) == state_nbytes(state), (T, mixer.state_size(2, T), state_nbytes(state))


def test_bad_num_persistent():
    with pytest.raises(ValueError, match="num_persistent"):
        TitansMAG(16, 2, num_persistent=-1)


# --- the persistent tokens are a prefix every query sees (SW-Attn*, Titans sections 3.3 and 4.2-4.3) ---


def _dense_reference(mixer, x):
    """The paper's equations written densely over x~ = [p | x]: the memory reads x~ in one call; query t
    sees every persistent key (unrotated query, as at relative distance 0) and the x keys of its window
    (RoPE at positions 0..T-1); MAL: y = m + o_proj(a) over z = x~ + m~, MAG: y = o_proj(a) * sigmoid(m)."""
    B, T, _ = x.shape
    P, attn, H, D = mixer.num_persistent, mixer.attn, mixer.heads, mixer.head_dim
    xt = torch.cat([mixer.persistent.expand(B, -1, -1), x], 1)
    m_all, _ = mixer.memory(xt)
    z = xt + m_all if isinstance(mixer, TitansMAL) else xt
    q = attn.q_proj(z).view(B, P + T, H, D)
    k = attn.k_proj(z).view(B, P + T, H, D)
    v = attn.v_proj(z).view(B, P + T, H, D)
    pos = torch.arange(T)
    qx, kx = attn.rope.apply(q[:, P:], pos), attn.rope.apply(k[:, P:], pos)
    s_p = torch.einsum("bthd,bjhd->bhtj", q[:, P:], k[:, :P])
    s_x = torch.einsum("bthd,bjhd->bhtj", qx, kx)
    t, j = pos[:, None], pos[None]
    s_x = s_x.masked_fill(~((j <= t) & (t - j < attn.window)), float("-inf"))
    w = torch.softmax(torch.cat([s_p, s_x], -1) / D**0.5, -1)
    a = attn.o_proj(torch.einsum("bhtj,bjhd->bthd", w, v).reshape(B, T, H * D))
    m = m_all[:, P:]
    return m + a if isinstance(mixer, TitansMAL) else a * torch.sigmoid(m)


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_persistent_prefix_matches_dense_reference(kind):
    torch.manual_seed(2)
    mixer = MIXERS[kind](24, 3, window=4, depth=2, num_persistent=3).eval()
    x = torch.randn(2, 23, 24, requires_grad=True)
    y, ref = mixer(x)[0], _dense_reference(mixer, x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # gradients too: the persistent tokens, the input and the attention's projections
    g = torch.randn_like(y)
    params = [mixer.persistent, mixer.attn.q_proj.weight, mixer.attn.k_proj.weight]
    got = torch.autograd.grad(y, [x, *params], g)
    want = torch.autograd.grad(ref, [x, *params], g)
    for a, b in zip(got, want):
        assert ((a - b).norm() / b.norm()).item() < 1e-4


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_persistent_prefix_float64_gradcheck_and_dense_reference(kind):
    # attention and RoPE compute float64 input in float64 (effattn.exact.compute_dtype), so the whole mixer is
    # float64: it equals the dense SW-Attn* equations to 1e-12, gradients included (a float32 step in attention's
    # forward, backward or LSE merge fails this), and passes gradcheck in x and the persistent tokens
    torch.manual_seed(8)
    mixer = MIXERS[kind](8, 2, window=3, depth=1, num_persistent=2).double().eval()
    x = torch.randn(1, 7, 8, dtype=torch.float64, requires_grad=True)
    y, ref = mixer(x)[0], _dense_reference(mixer, x)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(y)
    params = [mixer.persistent, mixer.attn.q_proj.weight, mixer.attn.k_proj.weight]
    for a, b in zip(torch.autograd.grad(y, [x, *params], g), torch.autograd.grad(ref, [x, *params], g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    p = mixer.persistent.detach().clone().requires_grad_(True)

    def run(x, p):
        return torch.func.functional_call(mixer, {"persistent": p}, (x,))[0]

    # fast mode (one random projection; the full Jacobian takes ~20 s) at tolerances float64 meets and a float32
    # step misses (RoPE's float32 rotation, which the dense reference shares, fails here)
    assert torch.autograd.gradcheck(run, (x, p), fast_mode=True, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_persistent_keys_stay_visible_far_past_the_window(kind):
    # with the memory's output projection zeroed (m = 0) only the attention can carry the persistent tokens
    # to a late position: there they must still change the output and receive a gradient (the code that let
    # them slide out of the window gave the same output and no gradient)
    torch.manual_seed(3)
    mixer = MIXERS[kind](16, 2, window=4, depth=1, num_persistent=3).eval()
    with torch.no_grad():
        mixer.memory.o_proj.weight.zero_()
    x = torch.randn(1, 41, 16)  # T >> window + P
    last = mixer(x)[0][:, -1]
    last.square().sum().backward()
    grad = mixer.persistent.grad
    assert grad is not None and grad.abs().amax() > 1e-4 * last.detach().abs().amax()
    with torch.no_grad():
        mixer.persistent[1] += torch.randn(16)
        assert (mixer(x)[0][:, -1] - last).abs().amax() > 1e-3


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_persistent_prefix_split_calls_and_decode_equal_one_call(kind):
    torch.manual_seed(4)
    mixer = MIXERS[kind](16, 2, window=3, depth=2, num_persistent=2).eval()
    x = torch.randn(2, 21, 16)
    with torch.no_grad():
        full, _ = mixer(x)
        for cuts in ([1, 2, 9, 10, 17], list(range(1, 21))):  # uneven pieces; token by token
            outs, st = [], None
            for a, b in zip([0] + cuts, cuts + [21]):
                y, st = mixer(x[:, a:b], st)
                outs.append(y)
            torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_persistent_prefix_padding_never_reaches_valid_rows(kind):
    torch.manual_seed(5)
    mixer = MIXERS[kind](16, 2, window=3, depth=2, num_persistent=2).eval()
    x = torch.randn(2, 17, 16)
    with torch.no_grad():
        ref0, ref1 = mixer(x[:1])[0], mixer(x[1:, 4:])[0]  # each row on its own
        padded = x.clone()
        padded[1, :4] = float("nan")  # row 1 left-padded by 4, whatever the padding holds
        valid = torch.ones(2, 17, dtype=torch.bool)
        valid[1, :4] = False
        y, st = mixer(padded[:, :9], valid=valid[:, :9])  # then continue unpadded, token by token
        outs = [y]
        for t in range(9, 17):
            y, st = mixer(padded[:, t : t + 1], st)
            outs.append(y)
        got = torch.cat(outs, 1)
    torch.testing.assert_close(got[:1], ref0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1:, 4:], ref1, atol=1e-5, rtol=1e-5)


def test_persistent_window_attention_without_prefix_is_sliding_window_attention():
    from effattn.nn import Attention
    from effattn.nn.mixers.titans import PersistentWindowAttention

    torch.manual_seed(6)
    layer = PersistentWindowAttention(16, 2, window=5)
    plain = Attention(16, 2, window=5)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 13, 16)
    assert torch.equal(layer(x)[0], plain(x)[0])  # the same calls: P = 0 behaves as before
    with pytest.raises(ValueError, match="tokens must have shape"):
        layer.persistent_kv(torch.randn(3, 8))


def test_bad_state_names_what_is_expected():
    mixer = TitansMAL(16, 2, window=4, num_persistent=2)
    _, (ms, cache, _) = mixer(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="persistent K/V"):
        mixer(torch.randn(1, 1, 16), (ms, cache))


def test_lm_with_persistent_prefix_decodes_as_it_runs_whole():
    from effattn.nn import LM, LMConfig

    torch.manual_seed(7)
    kw = dict(window=3, depth=1, chunk_size=4, num_persistent=2)
    cfg = LMConfig(vocab_size=32, dim=16, n_layers=2, heads=2, mixers="titans_mal,titans_mag")
    cfg.mixer_kwargs = {"titans_mal": kw, "titans_mag": kw}
    lm = LM(cfg).eval()
    ids = torch.randint(0, 32, (2, 15))
    with torch.no_grad():
        full, _ = lm(ids)
        outs, st = [], None
        for a, b in ((0, 6), (6, 7), (7, 8), (8, 15)):
            y, st = lm(ids[:, a:b], st)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert lm.state_size(15, batch=2) == state_nbytes(st)
