"""Long Range Arena tasks beyond ListOps: Pathfinder (labels by flood fill on the image, determinism,
shapes, difficulty) and document retrieval (balance, determinism, pairs as stated)."""

from __future__ import annotations

import pytest
import torch

from effattn.bench.tasks import make_pathfinder, make_retrieval
from effattn.bench.tasks.pathfinder import DIFFICULTY
from effattn.bench.tasks.retrieval import read_document, retrieval_pairs
from effattn.data import corpus_files


def _component(img: torch.Tensor, start: tuple[int, int], reach: int = 2) -> set[tuple[int, int]]:
    """Ink pixels reachable from ``start`` through ink pixels at Chebyshev distance <= ``reach``
    (a dashed path's one-pixel gaps are jumped; the generator keeps other snakes >= 3 away)."""
    ink = img > 0
    S = img.shape[0]
    seen, todo = {start}, [start]
    while todo:
        r, c = todo.pop()
        for rr in range(max(0, r - reach), min(S, r + reach + 1)):
            for cc in range(max(0, c - reach), min(S, c + reach + 1)):
                if ink[rr, cc] and (rr, cc) not in seen:
                    seen.add((rr, cc))
                    todo.append((rr, cc))
    return seen


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTY))
def test_pathfinder_labels_match_flood_fill(difficulty):
    x, y, marks = make_pathfinder(24, difficulty=difficulty, seed=3, return_markers=True)
    for img, label, m in zip(x.view(-1, 32, 32), y, marks):
        a, b = (tuple(p.tolist()) for p in m)
        assert img[a] == 255 and img[b] == 255
        comp = _component(img, a)
        assert (b in comp) == bool(label)
        # markers are 3 x 3 squares of ink
        for r, c in (a, b):
            assert bool((img[max(0, r - 1) : r + 2, max(0, c - 1) : c + 2] == 255).all())


def test_pathfinder_snakes_are_the_components():
    """Flood fill splits each image into exactly 2 paths + ``distractors`` snakes (the separation that
    makes the label well defined), for several distractor counts."""
    for distractors in (0, 1, 3):
        x, _ = make_pathfinder(6, difficulty="intermediate", distractors=distractors, seed=distractors)
        for img in x.view(-1, 32, 32):
            ink = {(r, c) for r, c in (img > 0).nonzero().tolist()}
            n = 0
            while ink:
                ink -= _component(img, next(iter(ink)))
                n += 1
            assert n == 2 + distractors


def test_pathfinder_determinism_shapes_balance():
    x, y = make_pathfinder(11, difficulty="easy", seed=5)
    x2, y2 = make_pathfinder(11, difficulty="easy", seed=5)
    x3, _ = make_pathfinder(11, difficulty="easy", seed=6)
    assert x.shape == (11, 1024) and x.dtype == torch.long and y.shape == (11,)
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert int(y.sum()) == 5  # half connected, the odd one unconnected
    assert set(x.unique().tolist()) == {0, 255}
    assert make_pathfinder(3, difficulty="easy", size=20, seed=0)[0].shape == (3, 400)


def test_pathfinder_difficulty_lengthens_the_path():
    """The marked path's pixel count grows with the difficulty's contour length (6 / 9 / 14 dashes)."""
    sizes = {}
    for d in ("easy", "intermediate", "hard"):
        x, y, marks = make_pathfinder(16, difficulty=d, seed=1, return_markers=True)
        sizes[d] = sum(len(_component(img, tuple(m[0].tolist()))) for img, m in zip(x.view(-1, 32, 32), marks)) / 16
    assert sizes["easy"] < sizes["intermediate"] < sizes["hard"], sizes


def test_pathfinder_errors():
    with pytest.raises(ValueError, match="difficulty must be one of"):
        make_pathfinder(2, difficulty="extreme")
    with pytest.raises(ValueError, match="unknown Pathfinder settings"):
        make_pathfinder(2, curvature=1.0)
    with pytest.raises(ValueError, match="num_examples"):
        make_pathfinder(0)
    with pytest.raises(ValueError, match="max_turn"):
        make_pathfinder(2, max_turn=-0.1)


def test_retrieval_balanced_deterministic_and_as_stated():
    a, b, y = make_retrieval(21, doc_len=128, split="validation", seed=2)
    a2, b2, y2 = make_retrieval(21, doc_len=128, split="validation", seed=2)
    assert a.shape == b.shape == (21, 128) and y.shape == (21,) and a.dtype == torch.long
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(y, y2)
    assert int(y.sum()) == 10
    assert not torch.equal(make_retrieval(21, doc_len=128, split="validation", seed=3)[0], a)
    pairs = retrieval_pairs(21, doc_len=128, split="validation", seed=2)
    files = set(corpus_files("validation"))
    for i, p in enumerate(pairs):
        assert p.label == int(y[i])
        assert (p.file_a == p.file_b) == bool(p.label) and {p.file_a, p.file_b} <= files
        if p.label:  # two windows of one file that do not overlap
            assert abs(p.offset_a - p.offset_b) >= 128
        assert bytes(a[i].tolist()) == read_document(p.file_a, p.offset_a, 128)
        assert bytes(b[i].tolist()) == read_document(p.file_b, p.offset_b, 128)


def test_retrieval_errors():
    with pytest.raises(ValueError, match="split must be one of"):
        make_retrieval(2, split="test")
    with pytest.raises(ValueError, match="doc_len"):
        make_retrieval(2, doc_len=0)
    with pytest.raises(ValueError, match="need 2"):
        make_retrieval(2, doc_len=10**8)
