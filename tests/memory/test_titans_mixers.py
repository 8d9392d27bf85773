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
