"""Passkey generator: the needle sits at the requested depth, labels are the key, shapes and seeds."""

from __future__ import annotations

import doctest

import pytest
import torch

import effattn.bench.tasks.passkey as passkey
from effattn.bench.tasks.passkey import (
    BOS,
    DIGIT_BASE,
    FILLER_BASE,
    IGNORE_INDEX,
    KEY,
    QUERY,
    digit_token,
    make_passkey,
    needle_position,
)


@pytest.mark.parametrize(
    "n,T,nd,depth,filler",
    [(6, 64, 5, None, "random"), (3, 97, 3, 0.0, "repeat"), (4, 40, 8, 1.0, "random"), (5, 200, 1, 0.37, "repeat")],
)
def test_passkey_definition(n, T, nd, depth, filler):
    b = make_passkey(n, T, nd, depth=depth, filler=filler, seed=5)
    assert b.prompts.shape == (n, T) and b.inputs.shape == b.labels.shape == (n, T + nd - 1)
    assert b.keys.shape == (n, nd) and b.needle_pos.shape == b.depths.shape == (n,)
    assert torch.equal(b.inputs[:, :T], b.prompts)
    for i in range(n):
        p, pos = b.prompts[i].tolist(), int(b.needle_pos[i])
        assert pos == needle_position(T, nd, float(b.depths[i]))
        if depth is not None:
            assert float(b.depths[i]) == depth
        assert p[0] == BOS and p[-1] == QUERY and p[pos] == KEY
        assert p.count(KEY) == 1 and p.count(QUERY) == 1 and p.count(BOS) == 1
        key = b.keys[i].tolist()
        assert p[pos + 1 : pos + 1 + nd] == key
        assert key == [digit_token(j, key[j] - DIGIT_BASE - 10 * j) for j in range(nd)]  # place-tagged digits
        assert all(0 <= key[j] - DIGIT_BASE - 10 * j < 10 for j in range(nd))
        rest = p[1:pos] + p[pos + 1 + nd : -1]
        assert all(FILLER_BASE <= t < 128 for t in rest)  # filler never a digit or a marker
        assert len(rest) == T - nd - 3
        # teacher forcing: the answer digits follow the prompt, each label is the next digit
        assert b.inputs[i, T:].tolist() == key[:-1]
        lab = b.labels[i].tolist()
        assert lab[T - 1 :] == key and all(x == IGNORE_INDEX for x in lab[: T - 1])


def test_depth_extremes_and_linear_placement():
    T, nd = 50, 4
    assert needle_position(T, nd, 0.0) == 1  # right after BOS
    assert needle_position(T, nd, 1.0) + nd == T - 2  # last digit right before QUERY
    pos = [needle_position(1000, 5, d / 10) for d in range(11)]
    assert all(b > a for a, b in zip(pos, pos[1:]))
    assert abs(needle_position(1000, 5, 0.5) - (1 + (1000 - 8) / 2)) <= 1


def test_random_depths_cover_the_range_and_seeds():
    b = make_passkey(200, 64, seed=1)
    assert float(b.depths.min()) < 0.1 and float(b.depths.max()) > 0.9
    a, c, d = make_passkey(5, 64, seed=2), make_passkey(5, 64, seed=2), make_passkey(5, 64, seed=3)
    assert torch.equal(a.inputs, c.inputs) and not torch.equal(a.inputs, d.inputs)
    r = make_passkey(2, 64, filler="repeat", sentence_len=8, seed=0)
    body = r.prompts[0, 1:20].tolist()
    assert all(body[i] == body[i + 8] for i in range(8) if body[i] >= FILLER_BASE and body[i + 8] >= FILLER_BASE)


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_examples=0),
        dict(context_len=8),
        dict(num_digits=9),
        dict(vocab_size=80),
        dict(depth=1.5),
        dict(filler="zeros"),
    ],
)
def test_bad_arguments_raise(kw):
    args = dict(num_examples=2, context_len=64)
    args.update(kw)
    with pytest.raises(ValueError):
        make_passkey(**args)


def test_docstring_example():
    assert doctest.testmod(passkey).failed == 0
