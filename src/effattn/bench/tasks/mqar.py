"""MQAR: multi-query associative recall, as defined by Zoology.

Arora et al., "Zoology: Measuring and Improving Recall in Efficient Language Models" (2023).
An example is ``num_kv_pairs`` key-value pairs ``k_1 v_1 k_2 v_2 ...`` followed by a stretch in
which every key appears once more as a query, at even offsets ``2 g`` drawn without replacement with
a power-law preference for small gaps, ``p(g) ∝ a g^(a-1)`` for ``g = 1 .. (T - 2 n) / 2``
(``a = power_a``). The model must emit, at each query position, the value that was paired with the
key. Keys come from the lower half of the vocabulary (``1 .. vocab_size // 2 - 1``; 0 is the
filler), values from the upper half (``vocab_size // 2 .. vocab_size - 1``); with
``random_non_queries`` the filler positions get uniform random tokens of the whole vocabulary.
Labels are ``-100`` everywhere except at the query positions (the cross-entropy ignore index).

Example::

    >>> inputs, labels = make_mqar(4, input_seq_len=32, num_kv_pairs=4, vocab_size=64, seed=0)
    >>> tuple(inputs.shape), int((labels != -100).sum())
    ((4, 32), 16)
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100


def make_mqar(
    num_examples: int,
    input_seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate MQAR examples: ``(inputs [N, T] long, labels [N, T] long)``.

    Deterministic given ``seed`` (a private ``numpy.random.RandomState``; global RNGs untouched).
    Raises ``ValueError`` where Zoology's generator asserts: ``input_seq_len`` even,
    ``vocab_size > input_seq_len``, ``num_kv_pairs * 4 <= input_seq_len``, and enough distinct keys
    (``num_kv_pairs <= vocab_size // 2 - 1``) and values for the pairs.
    """
    for name, val in (("num_examples", num_examples), ("input_seq_len", input_seq_len), ("num_kv_pairs", num_kv_pairs)):
        if not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if input_seq_len % 2:
        raise ValueError(f"input_seq_len must be even, got {input_seq_len}")
    if vocab_size <= input_seq_len:
        raise ValueError(
            f"vocab_size must exceed input_seq_len, got vocab_size={vocab_size}, input_seq_len={input_seq_len}"
        )
    if num_kv_pairs * 4 > input_seq_len:
        raise ValueError(
            f"num_kv_pairs * 4 must be <= input_seq_len, got num_kv_pairs={num_kv_pairs}, input_seq_len={input_seq_len}"
        )
    key_hi = vocab_size // 2
    if num_kv_pairs > key_hi - 1 or num_kv_pairs > vocab_size - key_hi:
        raise ValueError(
            f"num_kv_pairs={num_kv_pairs} exceeds the {key_hi - 1} distinct keys of vocab_size={vocab_size}"
        )
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0, got {power_a!r}")

    rng = np.random.RandomState(seed)
    n, T = num_examples, input_seq_len
    context = 2 * num_kv_pairs
    keys = np.stack([rng.choice(np.arange(1, key_hi), size=num_kv_pairs, replace=False) for _ in range(n)])
    values = np.stack([rng.choice(np.arange(key_hi, vocab_size), size=num_kv_pairs, replace=False) for _ in range(n)])

    space = (T - context) // 2  # query slots: even offsets after the pairs
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    p /= p.sum()
    gaps = np.stack([rng.choice(space, size=num_kv_pairs, replace=False, p=p) for _ in range(n)])

    inputs = np.zeros((n, T), dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    query_pos = context + 2 * gaps
    np.put_along_axis(inputs, query_pos, keys, axis=1)
    labels = np.full((n, T), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, query_pos, values, axis=1)

    inputs_t = torch.from_numpy(inputs)
    if random_non_queries:
        filler = torch.from_numpy(rng.randint(0, vocab_size, size=(n, T)).astype(np.int64))
        inputs_t = torch.where(inputs_t == 0, filler, inputs_t)
    return inputs_t, torch.from_numpy(labels)
