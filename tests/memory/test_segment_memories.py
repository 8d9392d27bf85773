"""Infini-attention and recurrent memory tokens: segment-parallel == token-by-token, carried state,
padding, the parts of the rule (local attention, memory retrieval, gate), truncated backprop, gradcheck,
bounded state, bad input."""

from __future__ import annotations

import pytest
import torch

from effattn.exact import attention
from effattn.memory import RecurrentMemoryAttention, infini_attention, infini_attention_reference


def qkv(B=2, T=11, H=2, D=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("T", [1, 8, 11])
def test_infini_parallel_equals_reference_and_carried_state(delta, T):
    q, k, v = qkv(T=T)
    gate = torch.tensor([0.3, -1.0])
    a, sa = infini_attention(q, k, v, gate, segment=4, delta=delta, output_final_state=True)
    b, sb = infini_attention_reference(q, k, v, gate, segment=4, delta=delta, output_final_state=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for n in ("M", "z", "count"):
        torch.testing.assert_close(sa[n], sb[n], rtol=1e-5, atol=1e-6)
    if T > 5:
        y1, s = infini_attention(q[:, :5], k[:, :5], v[:, :5], gate, segment=4, delta=delta, output_final_state=True)
        y2, _ = infini_attention(q[:, 5:], k[:, 5:], v[:, 5:], gate, segment=4, delta=delta, initial_state=s)
        torch.testing.assert_close(torch.cat([y1, y2], 1), b, rtol=1e-5, atol=1e-6)


def test_infini_rule_parts():
    q, k, v = qkv(B=1, T=8)
    # gate -> -inf: local causal attention inside each segment only
    y, _ = infini_attention(q, k, v, torch.full((2,), -1e4), segment=4)
    local = torch.cat([attention(q[:, s : s + 4], k[:, s : s + 4], v[:, s : s + 4], causal=True) for s in (0, 4)], 1)
    torch.testing.assert_close(y, local, rtol=1e-5, atol=1e-6)
    # gate -> +inf: the memory read; zero in the first segment, sigma(Q) M / sigma(Q) z in the second
    y, _ = infini_attention(q, k, v, torch.full((2,), 1e4), segment=4)
    assert y[:, :4].abs().max() == 0
    sig = torch.nn.functional.elu
    sk, sq = sig(k[:, :4]) + 1, sig(q[:, 4:]) + 1
    M = torch.einsum("bnhd,bnhv->bhdv", sk, v[:, :4])
    z = sk.sum(1)
    expect = torch.einsum("bthd,bhdv->bthv", sq, M) / torch.einsum("bthd,bhd->bth", sq, z)[..., None]
    torch.testing.assert_close(y[:, 4:], expect, rtol=1e-5, atol=1e-6)


def test_infini_padding_and_bounded_state():
    q, k, v = qkv(B=2, T=10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :3] = False
    kk = k.clone()
    kk[1, :3] = float("nan")
    y, st = infini_attention(q, kk, v, torch.zeros(2), segment=4, delta=True, valid=valid, output_final_state=True)
    y1, st1 = infini_attention(
        q[1:, 3:], k[1:, 3:], v[1:, 3:], torch.zeros(2), segment=4, delta=True, output_final_state=True
    )
    torch.testing.assert_close(y[1:, 3:], y1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st["M"][1:], st1["M"], rtol=1e-5, atol=1e-6)
    for T in (3, 50):
        _, s = infini_attention(*qkv(T=T), torch.zeros(2), segment=4, output_final_state=True)
        assert [tuple(s[n].shape) for n in ("M", "z", "k", "v", "count")] == [
            (2, 2, 4, 4),
            (2, 2, 4),
            (2, 4, 2, 4),
            (2, 4, 2, 4),
            (2,),
        ]


def test_infini_gradcheck_and_bad_input():
    q, k, v = qkv(B=1, T=5, H=1, D=2, dtype=torch.float64)
    args = [x.clone().requires_grad_() for x in (q, k, v)] + [
        torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    ]
    for delta in (False, True):

        def fn(q, k, v, g, delta=delta):
            return infini_attention(q, k, v, g, segment=2, delta=delta)[0]

        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="gate"):
        infini_attention(q, k, v, torch.zeros(3), segment=2)
    with pytest.raises(ValueError, match="segment"):
        infini_attention(q, k, v, torch.zeros(1), segment=0)
    with pytest.raises(ValueError, match="k must"):
        infini_attention(q, k[:, :3], v, torch.zeros(1), segment=2)


def test_rmt_segments_equal_tokens_and_memory_carries_information():
    torch.manual_seed(0)
    layer = RecurrentMemoryAttention(16, 2, num_memory=3, segment=4).eval()
    x = torch.randn(2, 13, 16)
    y, st = layer(x)
    ys, s = [], None
    for t in range(13):
        o, s = layer(x[:, t : t + 1], s)
        ys.append(o)
    torch.testing.assert_close(torch.cat(ys, 1), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s["mem"], st["mem"], rtol=1e-5, atol=1e-6)
    # a change in segment 0 reaches segment 2 only through the memory tokens
    x2 = x.clone()
    x2[:, :4] = torch.randn(2, 4, 16)
    y2, _ = layer(x2)
    assert (y2[:, 8:] - y[:, 8:]).abs().max() > 1e-4
    assert tuple(st["mem"].shape) == (2, 3, 16) and tuple(st["k"].shape) == (2, 4, 2, 8)


def test_rmt_truncated_backprop():
    torch.manual_seed(0)
    x = torch.randn(1, 12, 16, requires_grad=True)
    for bptt, reaches in ((None, True), (1, False)):
        layer = RecurrentMemoryAttention(16, 2, num_memory=2, segment=4, bptt_segments=bptt).train()
        x.grad = None
        layer(x)[0][:, 8:].sum().backward()  # the loss of segment 2
        assert (x.grad[:, :4].abs().sum() > 0) == reaches


def test_rmt_bad_input():
    with pytest.raises(ValueError, match="segment"):
        RecurrentMemoryAttention(16, 2, segment=0)
    with pytest.raises(ValueError, match="heads"):
        RecurrentMemoryAttention(15, 2)
    with pytest.raises(ValueError, match="x must"):
        RecurrentMemoryAttention(16, 2)(torch.randn(2, 5, 15))


@pytest.mark.parametrize("conv_size", [0, 4])
def test_infini_mixer_conv_binds_the_previous_tokens(conv_size, monkeypatch):
    """The Infini-attention mixer's ``conv_size``: d k_t / d x_s != 0 exactly for s in (t - K, t] with a
    kernel-K convolution on q and k, only s = t without one (the paper's block); the state carries the conv
    inputs, and a state without them is refused."""
    import effattn.nn.mixers.infini_attention as module

    torch.manual_seed(0)
    mixer = module.InfiniAttentionMixer(16, 2, segment=4, conv_size=conv_size).double()
    seen = []

    def spy(q, k, v, gate, **kw):
        seen.append(k)
        return infini_attention(q, k, v, gate, **kw)

    monkeypatch.setattr(module, "infini_attention", spy)
    x = torch.randn(1, 11, 16, dtype=torch.float64, requires_grad=True)
    _, state = mixer(x)
    t = 7
    (g,) = torch.autograd.grad((seen[0][0, t] * torch.linspace(-1, 1, 16).view(2, 8)).sum(), x)
    touched = [s for s in range(11) if g[0, s].abs().max() > 0]
    assert touched == (list(range(t - 3, t + 1)) if conv_size else [t])
    if conv_size:
        assert [tuple(c.shape) for c in state["conv"]] == [(1, 3, 16), (1, 3, 16)]
        with pytest.raises(ValueError, match="conv_size=4"):
            mixer(x[:, :1], {key: val for key, val in state.items() if key != "conv"})
    else:
        assert "conv" not in state
    with pytest.raises(ValueError, match="conv_size"):
        module.InfiniAttentionMixer(16, 2, conv_size=-1)
