"""Pathfinder: are two dots joined by a dashed path? The spatial long-range task of Long Range Arena.

Linsley et al. 2018, "Learning long-range spatial dependencies with horizontally-gated recurrent units"
(the task); Tay et al. 2021, "Long Range Arena: A Benchmark for Efficient Transformers" (32 x 32 images
read as 1024 pixel tokens, binary label). Generated here, deterministic from a seed, no download.

An image holds two **paths** (snakes of ``path_length`` dashes: each dash ``dash`` pixels long, one
pixel of gap before the next, the heading turned by at most ``max_turn`` radians per dash) and
``distractors`` short snakes of ``distractor_length`` dashes. Two **markers** (3 x 3 squares) sit on
path ends: label 1 (connected) puts them on the two ends of the first path, label 0 on one end of each
path. Everything is drawn at intensity 255 on 0.

What makes the label well defined: within a snake every pixel is within Chebyshev distance 2 of the
next (dashes one pixel apart), and pixels of different snakes (markers included) are kept at distance
>= 3 (a dash that would come closer is redrawn). So the connected components of the drawn pixels
under "neighbours within distance 2" (jumping a dash gap) are exactly the snakes, and the label is
whether the two markers lie in one component; the tests check it by flood fill on the image.

Difficulty (:data:`DIFFICULTY`): Linsley's generator varies the contour length (6, 9 and 14 paddles in
the easy, intermediate and hard sets; LRA trains on the 32 x 32 images). Paddle size, gap, curvature
and the number of distractors at 32 x 32 are this generator's own choices (not the paper's pixel
settings), stated in :data:`DIFFICULTY`. Tokens: the pixel value (vocabulary 256).

Example::

    >>> x, y = make_pathfinder(4, difficulty="easy", seed=0)
    >>> tuple(x.shape), x.dtype, sorted(set(y.tolist())) <= [0, 1]
    ((4, 1024), torch.int64, True)
"""

from __future__ import annotations

import math
import random

import torch

from effattn._checks import check_float, check_int, check_positive_int

__all__ = ["DIFFICULTY", "VOCAB_SIZE", "NUM_CLASSES", "make_pathfinder", "pathfinder_image"]

VOCAB_SIZE = 256
NUM_CLASSES = 2
INK = 255
SEPARATION = 3  # Chebyshev distance kept between pixels of different snakes
LINK = 2  # a snake's consecutive pixels are within this distance (dash gap of one pixel)
MAX_TRIES = 200  # attempts per image; a snake gets SNAKE_TRIES starts
SNAKE_TRIES = 30

# contour length in dashes as Linsley et al.'s easy / intermediate / hard sets; the rest is ours
DIFFICULTY: dict[str, dict] = {
    "easy": dict(path_length=6, distractors=2, distractor_length=2, dash=2, max_turn=0.6),
    "intermediate": dict(path_length=9, distractors=3, distractor_length=2, dash=2, max_turn=0.6),
    "hard": dict(path_length=14, distractors=4, distractor_length=2, dash=2, max_turn=0.6),
}


def _segment(x: float, y: float, angle: float, n: int) -> list[tuple[int, int]]:
    """The rounded pixels ``(row, col)`` of ``n`` unit steps from ``(x, y)`` along ``angle``."""
    dx, dy = math.cos(angle), math.sin(angle)
    return [(round(y + t * dy), round(x + t * dx)) for t in range(n)]


class _Canvas:
    """Who owns each pixel, and for each pixel the owners within distance ``SEPARATION - 1`` (so a
    placement test is one look-up per pixel)."""

    def __init__(self, size: int):
        self.size = size
        self.owner = [[-1] * size for _ in range(size)]
        self.near: list[list[set[int]]] = [[set() for _ in range(size)] for _ in range(size)]

    def free(self, pixels, who: int) -> bool:
        s = self.size
        for r, c in pixels:
            if not (0 <= r < s and 0 <= c < s):
                return False
            near = self.near[r][c]
            if near and (len(near) > 1 or who not in near):
                return False
        return True

    def put(self, pixels, who: int, ink: bool = True) -> None:
        """Claim ``pixels`` for ``who`` (drawn when ``ink``; else only kept clear of other snakes)."""
        s, d = self.size, SEPARATION - 1
        for r, c in pixels:
            if ink:
                self.owner[r][c] = who
            for rr in range(max(0, r - d), min(s, r + d + 1)):
                for cc in range(max(0, c - d), min(s, c + d + 1)):
                    self.near[rr][cc].add(who)


def _snake(rng: random.Random, canvas: _Canvas, who: int, dashes: int, dash: int, max_turn: float, ends: bool):
    """Pixels of one dashed snake (a list of dashes), placed on ``canvas`` as owner ``who``; ``None``
    when no placement was found in :data:`SNAKE_TRIES` attempts."""
    s = canvas.size
    for _ in range(SNAKE_TRIES):
        x, y = rng.uniform(2, s - 3), rng.uniform(2, s - 3)
        angle = rng.uniform(0, 2 * math.pi)
        out: list[list[tuple[int, int]]] = []
        for _ in range(dashes):
            # candidate headings within the curvature limit; prefer those whose straight continuation
            # for two more dashes is free too (a greedy walk would run into borders and other snakes)
            cands = [angle + rng.uniform(-max_turn, max_turn) for _ in range(12)]
            cands = [a for a in cands if canvas.free(_segment(x, y, a, dash), who)]
            if not cands:
                break
            step = dash + 1
            room = [
                a
                for a in cands
                if canvas.free(_segment(x + step * math.cos(a), y + step * math.sin(a), a, 2 * step), who)
            ]
            a = (room or cands)[0]
            out.append(_segment(x, y, a, dash))
            angle = a
            x, y = x + step * math.cos(a), y + step * math.sin(a)  # one pixel of gap
        if len(out) == dashes:
            marks = [_square(out[0][0], canvas.size), _square(out[-1][-1], canvas.size)] if ends else []
            if not all(canvas.free(e, who) for e in marks):
                continue
            for px in out:
                canvas.put(px, who)
            for e in marks:  # room for a marker at either end, drawn only where one is placed
                canvas.put(e, who, ink=False)
            return out, angle
    return None


def _square(center: tuple[int, int], size: int) -> list[tuple[int, int]]:
    """The 3 x 3 marker around ``center``, clipped to the canvas."""
    r, c = center
    return [(r + i, c + j) for i in (-1, 0, 1) for j in (-1, 0, 1) if 0 <= r + i < size and 0 <= c + j < size]


def pathfinder_image(
    rng: random.Random,
    connected: bool,
    *,
    size: int = 32,
    path_length: int = 14,
    distractors: int = 4,
    distractor_length: int = 2,
    dash: int = 2,
    max_turn: float = 0.6,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """One image ``[size, size]`` (uint8, 0 or 255) and the two marker centres ``(row, col)``.

    ``connected``: markers on the two ends of path 0; else on an end of path 0 and an end of path 1.
    Drawn by rejection: a snake or marker that would come within distance ``< 3`` of another one is
    redrawn, the whole image when that fails."""
    for _ in range(MAX_TRIES):
        canvas = _Canvas(size)
        snakes = []
        for who, n in enumerate([path_length, path_length] + [distractor_length] * distractors):
            got = _snake(rng, canvas, who, n, dash, max_turn, who < 2)
            if got is None:
                break
            snakes.append(got[0])
        else:
            ends = [(s[0][0], s[-1][-1]) for s in snakes[:2]]  # first pixel of a snake, last pixel
            pick = (
                [(0, ends[0][0]), (0, ends[0][1])]
                if connected
                else [(0, ends[0][rng.randrange(2)]), (1, ends[1][rng.randrange(2)])]
            )
            for who, c in pick:  # their room was kept clear when the path was placed
                canvas.put(_square(c, size), who)
            img = torch.tensor(canvas.owner, dtype=torch.int16).ne(-1).to(torch.uint8) * INK
            return img, [c for _, c in pick]
    raise RuntimeError(
        f"could not place {2 + distractors} snakes on a {size}x{size} canvas; lower path_length or distractors"
    )


def make_pathfinder(
    num_examples: int,
    *,
    difficulty: str = "hard",
    size: int = 32,
    seed: int = 0,
    return_markers: bool = False,
    **overrides,
) -> tuple[torch.Tensor, ...]:
    """``num_examples`` Pathfinder examples: ``(pixels [N, size * size] long in 0..255, labels [N] long)``,
    exactly half connected (label 1; the extra one of an odd count is 0), order shuffled; the same for
    the same arguments. ``difficulty`` picks a row of :data:`DIFFICULTY`; ``overrides`` replace its
    entries (``path_length``, ``distractors``, ``distractor_length``, ``dash``, ``max_turn``).
    ``return_markers``: also the marker centres ``[N, 2, 2]`` (row, col)."""
    check_positive_int("num_examples", num_examples)
    check_int("size", size, minimum=12)
    if difficulty not in DIFFICULTY:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTY)}, got {difficulty!r}")
    unknown = set(overrides) - set(DIFFICULTY["hard"])
    if unknown:
        raise ValueError(f"unknown Pathfinder settings {sorted(unknown)}; known: {sorted(DIFFICULTY['hard'])}")
    kw = {**DIFFICULTY[difficulty], **overrides}
    for name in ("path_length", "dash", "distractor_length"):
        check_positive_int(name, kw[name])
    check_int("distractors", kw["distractors"], minimum=0)
    check_float("max_turn", kw["max_turn"], 0.0, math.pi)
    rng = random.Random(seed)
    labels = [1] * (num_examples // 2) + [0] * (num_examples - num_examples // 2)
    rng.shuffle(labels)
    drawn = [pathfinder_image(rng, bool(lab), size=size, **kw) for lab in labels]
    x = torch.stack([img for img, _ in drawn]).view(num_examples, -1).long()
    y = torch.tensor(labels, dtype=torch.long)
    return (x, y, torch.tensor([m for _, m in drawn], dtype=torch.long)) if return_markers else (x, y)
