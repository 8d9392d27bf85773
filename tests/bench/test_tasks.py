"""MQAR and ListOps generators: the data satisfy their definitions (checked independently)."""

from __future__ import annotations

import statistics

import pytest
import torch

from effattn.bench.tasks.listops import (
    CLOSE,
    OPERATORS,
    PAD_ID,
    TOKEN_IDS,
    VOCAB_SIZE,
    detokenize,
    evaluate,
    generate_expressions,
    make_listops,
    tokenize,
)
from effattn.bench.tasks.mqar import IGNORE_INDEX, make_mqar

# ------------------------------------------------------------------------------------------------
# MQAR
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,T,pairs,vocab,rnq", [(16, 32, 4, 64, True), (8, 64, 16, 128, False), (5, 8, 2, 10, True)])
def test_mqar_definition(n, T, pairs, vocab, rnq):
    x, y = make_mqar(n, T, pairs, vocab, seed=3, random_non_queries=rnq)
    assert x.shape == y.shape == (n, T) and x.dtype == y.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < vocab
    half = vocab // 2
    for i in range(n):
        keys, values = x[i, 0 : 2 * pairs : 2].tolist(), x[i, 1 : 2 * pairs : 2].tolist()
        assert all(1 <= k < half for k in keys) and len(set(keys)) == pairs  # lower half, distinct
        assert all(half <= v < vocab for v in values) and len(set(values)) == pairs  # upper half, distinct
        pair = dict(zip(keys, values))
        q_pos = (y[i] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(q_pos) == pairs
        assert all(p >= 2 * pairs and (p - 2 * pairs) % 2 == 0 for p in q_pos)  # even offsets after the pairs
        queried = [int(x[i, p]) for p in q_pos]
        assert sorted(queried) == sorted(keys)  # every key queried exactly once
        assert [int(y[i, p]) for p in q_pos] == [pair[k] for k in queried]  # label = the paired value
        assert (y[i, : 2 * pairs] == IGNORE_INDEX).all()
        if not rnq:  # fillers stay 0 without random_non_queries
            rest = torch.ones(T, dtype=torch.bool)
            rest[: 2 * pairs] = False
            rest[q_pos] = False
            assert (x[i, rest] == 0).all()


def test_mqar_deterministic_and_seeded():
    a = make_mqar(6, 32, 4, 64, seed=7)
    b = make_mqar(6, 32, 4, 64, seed=7)
    c = make_mqar(6, 32, 4, 64, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_mqar_power_law_prefers_short_gaps():
    _, y = make_mqar(400, 128, 4, 256, seed=0)
    pos = (y != IGNORE_INDEX).nonzero()[:, 1] - 8
    gaps = pos // 2
    assert float((gaps < 10).float().mean()) > 0.3  # uniform over 60 slots would give ~1/6


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(input_seq_len=31, num_kv_pairs=4, vocab_size=64), "even"),
        (dict(input_seq_len=32, num_kv_pairs=4, vocab_size=32), "vocab_size"),
        (dict(input_seq_len=32, num_kv_pairs=9, vocab_size=64), "num_kv_pairs"),
        (dict(input_seq_len=32, num_kv_pairs=0, vocab_size=64), "num_kv_pairs"),
    ],
)
def test_mqar_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        make_mqar(2, seed=0, **kw)


# ------------------------------------------------------------------------------------------------
# ListOps
# ------------------------------------------------------------------------------------------------


def _value_recursive(tokens: list[str]) -> int:
    """A second evaluator, written independently: recursive descent over the token list."""

    def parse(i: int) -> tuple[int, int]:
        tok = tokens[i]
        if tok not in OPERATORS:
            return int(tok), i + 1
        args, i = [], i + 1
        while tokens[i] != CLOSE:
            val, i = parse(i)
            args.append(val)
        fn = {
            "[MIN": min,
            "[MAX": max,
            "[MED": lambda a: int(statistics.median(a)),
            "[SM": lambda a: sum(a) % 10,
        }[tok]
        return fn(args), i + 1

    val, end = parse(0)
    assert end == len(tokens)
    return val


def _depth_and_max_args(tokens: list[str]) -> tuple[int, int]:
    depth = best = 0
    counts: list[int] = []
    most = 0
    for tok in tokens:
        if counts and tok != CLOSE:
            counts[-1] += 1
        if tok in OPERATORS:
            depth += 1
            best = max(best, depth)
            counts.append(0)
        elif tok == CLOSE:
            depth -= 1
            most = max(most, counts.pop())
    return best + 1, most


def test_listops_evaluator_by_hand():
    assert evaluate("[MAX 2 9 [MIN 4 7 ] 0 ]".split()) == 9
    assert evaluate("[MED 1 2 3 4 ]".split()) == 2  # median 2.5 truncated, as LRA
    assert evaluate("[SM 8 [MAX 5 7 ] 6 ]".split()) == 1
    assert evaluate(["7"]) == 7


@pytest.mark.parametrize("min_len,max_len,depth,args", [(5, 40, 4, 4), (20, 80, 10, 10), (50, 120, 6, 5)])
def test_listops_labels_and_limits(min_len, max_len, depth, args):
    x, y = make_listops(40, min_len, max_len, depth, args, seed=1)
    assert x.shape == (40, max_len) and y.shape == (40,)
    assert int(x.max()) < VOCAB_SIZE and int(y.min()) >= 0 and int(y.max()) <= 9
    for i in range(40):
        toks = detokenize(x[i])
        assert min_len <= len(toks) <= max_len
        n = len(toks)
        assert (x[i, n:] == PAD_ID).all() and (x[i, :n] != PAD_ID).all()  # right padding only
        d, most = _depth_and_max_args(toks)
        assert d <= depth and 2 <= most <= args
        assert int(y[i]) == _value_recursive(toks)


def test_listops_label_spread_and_determinism():
    a = make_listops(200, 10, 60, 6, 6, seed=5)
    b = make_listops(200, 10, 60, 6, 6, seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert len(set(a[1].tolist())) == 10  # every class occurs


def test_listops_tokenize_roundtrip_and_errors():
    exprs = generate_expressions(5, 3, 30, 5, 5, seed=0)
    ids = tokenize(exprs)
    assert [detokenize(r) for r in ids] == exprs
    assert set(TOKEN_IDS.values()) == set(range(1, VOCAB_SIZE))
    with pytest.raises(ValueError, match="min_len"):
        make_listops(2, min_len=10, max_len=5)
    with pytest.raises(ValueError, match="length"):
        tokenize(exprs, length=2)


def test_docstring_examples():
    import doctest

    from effattn.bench.tasks import listops, mqar

    for mod in (mqar, listops):
        res = doctest.testmod(mod)
        assert res.attempted > 0 and res.failed == 0, mod.__name__
