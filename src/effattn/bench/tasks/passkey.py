"""Passkey retrieval over generated tokens: a short key hidden at a chosen depth in long filler.

After Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for
Transformers" (2023), whose prompt hides "The pass key is 71432. Remember it." in repeated filler
sentences and ends with "What is the pass key?". Here every piece is a token of a small generated
vocabulary, so a tiny model can be trained on it from scratch:

    [BOS] f f f ... f [KEY] d_1 .. d_n f f ... f [QUERY]   ->   d_1 .. d_n

- ``BOS`` (id 0) opens every sequence (the attention sink StreamingLLM keeps);
- ``KEY`` (id 1) is "the pass key is", ``QUERY`` (id 2) is "what is the pass key?";
- ``d_1 .. d_n`` is an ``n``-digit number (``num_digits`` <= 8, any of the ``10^n``), each digit
  written as a token that also names its place: ``digit_token(j, v) = DIGIT_BASE + 10 j + v`` (ids
  3 .. 82). A plain digit alphabet needs a two-layer induction circuit (find the token *after* the
  previous digit), which a tiny model trained for minutes on a CPU does not form reliably; with
  place-tagged digits, answer step ``j`` is one content lookup ("the place-``j`` digit"), so the
  benchmark measures which tokens a KV policy keeps, not whether the model learned induction;
- ``f`` is filler from ids ``FILLER_BASE = 83 .. vocab_size - 1``, never a digit or a marker:
  ``filler="random"`` draws every filler token uniformly, ``filler="repeat"`` repeats one fixed
  random "sentence" of ``sentence_len`` tokens (the original's repeated sentences).

The prompt is exactly ``context_len`` tokens and ends with ``QUERY``. The needle (``KEY`` and its
digits, ``n + 1`` tokens) starts at ``needle_pos = 1 + round(depth * (context_len - n - 3))``: depth 0
puts it right after ``BOS``, depth 1 right before ``QUERY``. For training, :func:`make_passkey`
returns the prompt followed by the first ``n - 1`` answer digits (teacher forcing), with labels
(the next token) at the last ``n`` positions only and ``IGNORE_INDEX`` elsewhere.

Example::

    >>> b = make_passkey(3, context_len=64, num_digits=4, seed=0)
    >>> tuple(b.inputs.shape), tuple(b.prompts.shape), tuple(b.keys.shape)
    ((3, 67), (3, 64), (3, 4))
    >>> bool((b.prompts[:, -1] == QUERY).all()), int((b.labels != IGNORE_INDEX).sum())
    (True, 12)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from effattn._checks import check_positive_int
from effattn.bench.tasks.mqar import IGNORE_INDEX

BOS, KEY, QUERY = 0, 1, 2
DIGIT_BASE = 3
MAX_DIGITS = 8
FILLER_BASE = DIGIT_BASE + 10 * MAX_DIGITS  # 83
DEFAULT_VOCAB_SIZE = 128
FILLERS = ("random", "repeat")

__all__ = [
    "BOS",
    "KEY",
    "QUERY",
    "DIGIT_BASE",
    "FILLER_BASE",
    "MAX_DIGITS",
    "IGNORE_INDEX",
    "digit_token",
    "PasskeyBatch",
    "make_passkey",
    "needle_position",
]


@dataclass
class PasskeyBatch:
    """One batch of passkey examples.

    ``inputs``/``labels`` ``[N, context_len + num_digits - 1]`` (teacher-forced training rows),
    ``prompts`` ``[N, context_len]`` (what a model is given at evaluation), ``keys`` ``[N, num_digits]``
    (the answer token ids), ``needle_pos`` ``[N]`` (index of the ``KEY`` token), ``depths`` ``[N]``.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    prompts: torch.Tensor
    keys: torch.Tensor
    needle_pos: torch.Tensor
    depths: torch.Tensor


def digit_token(place: int, value: int | np.ndarray):
    """Token id of digit ``value`` (0-9) at place ``place`` (0-based) of the key."""
    return DIGIT_BASE + 10 * place + value


def needle_position(context_len: int, num_digits: int, depth: float) -> int:
    """Index of the ``KEY`` token for ``depth`` in [0, 1]: ``1 + round(depth * (context_len - num_digits - 3))``."""
    return 1 + int(round(float(depth) * (context_len - num_digits - 3)))


def make_passkey(
    num_examples: int,
    context_len: int,
    num_digits: int = 5,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    depth: float | None = None,
    filler: str = "random",
    sentence_len: int = 16,
    seed: int = 0,
) -> PasskeyBatch:
    """Generate ``num_examples`` passkey prompts of ``context_len`` tokens (see the module docstring).

    ``depth``: needle depth in [0, 1] for every example, or ``None`` for a uniform random depth per
    example. Deterministic given ``seed`` (a private ``numpy.random.RandomState``; global RNGs are
    untouched); the ``repeat`` filler sentence is drawn from the same generator.
    """
    for name, val in (("num_examples", num_examples), ("context_len", context_len), ("num_digits", num_digits)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if num_digits > MAX_DIGITS:
        raise ValueError(f"num_digits must be <= {MAX_DIGITS}, got {num_digits}")
    if context_len < num_digits + 4:
        raise ValueError(
            f"context_len must be >= num_digits + 4 (BOS, KEY, digits, one filler, QUERY), got "
            f"context_len={context_len}, num_digits={num_digits}"
        )
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= FILLER_BASE:
        raise ValueError(f"vocab_size must exceed {FILLER_BASE} (markers and place-tagged digits), got {vocab_size!r}")
    if depth is not None and not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth must be in [0, 1] or None, got {depth!r}")
    if filler not in FILLERS:
        raise ValueError(f"filler must be one of {FILLERS}, got {filler!r}")
    if filler == "repeat":
        check_positive_int("sentence_len", sentence_len)

    rng = np.random.RandomState(seed)
    n, T = num_examples, context_len
    num_filler = vocab_size - FILLER_BASE
    if filler == "random":
        prompts = rng.randint(0, num_filler, size=(n, T)) + FILLER_BASE
    else:
        sentence = rng.randint(0, num_filler, size=sentence_len) + FILLER_BASE
        prompts = np.tile(np.resize(sentence, T), (n, 1))
    depths = rng.uniform(0.0, 1.0, size=n) if depth is None else np.full(n, float(depth))
    keys = digit_token(np.arange(num_digits), rng.randint(0, 10, size=(n, num_digits)))
    needle = np.array([needle_position(T, num_digits, d) for d in depths], dtype=np.int64)

    prompts[:, 0] = BOS
    prompts[:, -1] = QUERY
    rows = np.arange(n)
    prompts[rows, needle] = KEY
    for j in range(num_digits):
        prompts[rows, needle + 1 + j] = keys[:, j]

    inputs = np.concatenate([prompts, keys[:, :-1]], axis=1).astype(np.int64)
    labels = np.full_like(inputs, IGNORE_INDEX)
    labels[:, T - 1 :] = keys
    return PasskeyBatch(
        inputs=torch.from_numpy(inputs),
        labels=torch.from_numpy(labels),
        prompts=torch.from_numpy(prompts.astype(np.int64)),
        keys=torch.from_numpy(keys.astype(np.int64)),
        needle_pos=torch.from_numpy(needle),
        depths=torch.from_numpy(depths),
    )
