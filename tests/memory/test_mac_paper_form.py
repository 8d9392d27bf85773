"""Titans MAC in the paper's form (``TitansMAC(paper_form=True)``, Titans eqs. 21-25): retrieval from the memory
the previous segment left, the memory written with the attention output, the output gated by the memory."""

from __future__ import annotations

import pytest
import torch

from effattn.nn.mixers.titans import TitansMAC


def _mixer(seed=0, **kw):
    torch.manual_seed(seed)
    return TitansMAC(16, 2, segment=4, num_persistent=2, paper_form=True, **kw).double().eval()


def _record(mixer):
    """Wrap ``o_proj`` (called once per span with the attention output) and ``memory.read`` to record the
    attention outputs ``y`` and the retrievals ``h`` the forward uses; returns them and the unwrapped read."""
    ys, hs = [], []
    mixer.o_proj.register_forward_hook(lambda mod, inp, out: ys.append(out.detach()))
    read = mixer.memory.read

    def recording_read(q, state=None):
        h = read(q, state)
        hs.append(h.detach())
        return h

    mixer.memory.read = recording_read
    return ys, hs, read


def test_memory_is_written_with_the_attention_output_and_read_from_the_previous_segment():
    mixer = _mixer()
    x = torch.randn(2, 14, 16, dtype=torch.float64)
    ys, hs, read = _record(mixer)
    _, (ms, _) = mixer(x)
    y = torch.cat(ys, 1)
    assert y.shape == (2, 14, 16) and len(hs) == 4  # segments of 4: three whole, one of 2
    # M_s = M_{s-1}(y_s): the memory run on the attention outputs alone ends where the mixer's does
    _, direct = mixer.memory(y)
    for a, b in zip(ms["A"], direct["A"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # h of segment s = M*_{s-1}(W_h x_s): the memory after the attention outputs of the segments before it
    for s, h in enumerate(hs):
        prev = None if s == 0 else mixer.memory(y[:, : 4 * s])[1]
        q = mixer.h_proj(x[:, 4 * s : 4 * s + 4]).view(2, -1, 2, 8)
        torch.testing.assert_close(h, read(q, prev), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(hs[1], hs[2])  # the memory moved between segments


def test_split_calls_and_decoding_equal_one_call():
    mixer = _mixer()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    full, _ = mixer(x)
    for cut in (1, 3, 4, 6):
        y1, st = mixer(x[:, :cut])
        y2, _ = mixer(x[:, cut:], st)
        torch.testing.assert_close(torch.cat([y1, y2], 1), full, rtol=1e-9, atol=1e-9)
    st, steps = None, []
    for t in range(11):
        y, st = mixer(x[:, t : t + 1], st)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)


def test_no_future_leakage_and_padding_never_reaches_valid_tokens():
    mixer = _mixer()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    base, _ = mixer(x)
    x2 = x.clone()
    x2[:, 6] += 1.0
    moved, _ = mixer(x2)
    torch.testing.assert_close(moved[:, :6], base[:, :6], rtol=0, atol=0)
    assert not torch.allclose(moved[:, 6:], base[:, 6:])
    pad = torch.full((1, 3, 16), float("nan"), dtype=torch.float64)
    xp = torch.cat([pad, x], 1)
    valid = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)], 1)
    yp, _ = mixer(xp, valid=valid)
    torch.testing.assert_close(yp[:, 3:], base, rtol=1e-9, atol=1e-9)


def test_gradients_reach_the_retrieval_gate_and_memory_parameters():
    mixer = _mixer().train()
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    mixer(x)[0].square().sum().backward()
    for name in ("h_proj.weight", "out.weight", "memory.gate_proj.weight", "memory.weights.0", "memory.k_proj.weight"):
        g = dict(mixer.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_gradcheck_tiny():
    torch.manual_seed(1)
    mixer = TitansMAC(4, 1, segment=2, num_persistent=1, depth=1, paper_form=True, conv_size=2).double()
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mixer(t)[0], (x,), eps=1e-6, atol=1e-5)


def test_bad_options():
    with pytest.raises(ValueError, match="chunk_size must be None or the segment"):
        TitansMAC(16, 2, segment=4, chunk_size=8, paper_form=True)
    with pytest.raises(ValueError, match="paper_form must be a bool"):
        TitansMAC(16, 2, paper_form="yes")
    assert TitansMAC(16, 2, segment=4, paper_form=True).memory.chunk_size == 4
    assert TitansMAC(16, 2, segment=4).memory.chunk_size == 16  # the default form keeps its chunk
    assert not hasattr(TitansMAC(16, 2), "h_proj")


def test_segment_attention_computes_in_float64_for_float64():
    from effattn.nn.mixers.titans import segment_attention

    q = torch.randn(1, 5, 1, 4, dtype=torch.float64, requires_grad=True)
    p = torch.randn(1, 1, 4, dtype=torch.float64)
    o, st = segment_attention(q, [q], [q], p, p, 2)
    assert o.dtype == st["k"].dtype == torch.float64
    assert torch.autograd.gradcheck(lambda t: segment_attention(t, [t], [t], p, p, 2)[0], (q,))
