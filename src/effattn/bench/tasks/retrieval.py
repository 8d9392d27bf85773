"""Document retrieval: are two byte-level documents related? The structure of Long Range Arena's
retrieval task (Tay et al. 2021, "Long Range Arena: A Benchmark for Efficient Transformers"; there:
pairs of ACL Anthology papers of up to 4,000 bytes each, related = one cites the other, read by a
two-tower encoder whose two document vectors are combined).

Built offline from text that ships with Python: the standard library's ``.py`` files of one
:func:`effattn.data.corpus_files` split (train / validation: disjoint files). A document is a window
of ``doc_len`` bytes of one file. Related (label 1): two non-overlapping windows of the **same** file
(same module); unrelated (label 0): windows of two **different** files. Only files of at least
``2 * doc_len`` bytes take part, so every file can give a related pair. Exactly half of the pairs are
related (the extra one of an odd count is unrelated), in shuffled order; everything follows from
``seed``. Tokens: the byte values (vocabulary 256).

What differs from LRA (choices stated): the relation is "same module" instead of a citation link, and
the documents are source code; the task's shape (two long byte sequences, one binary label, a model
that must compare content across them) is LRA's.

Example::

    >>> a, b, y = make_retrieval(4, doc_len=64, split="validation", seed=0)
    >>> tuple(a.shape), tuple(b.shape), int(y.sum())
    ((4, 64), (4, 64), 2)
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from effattn._checks import check_positive_int
from effattn.data import SPLITS, corpus_files

__all__ = ["RetrievalPair", "VOCAB_SIZE", "make_retrieval", "read_document", "retrieval_pairs"]

VOCAB_SIZE = 256


@dataclass(frozen=True)
class RetrievalPair:
    """One pair: file (relative path) and byte offset of each document, and the label."""

    file_a: str
    offset_a: int
    file_b: str
    offset_b: int
    label: int


@lru_cache(maxsize=4)
def _files(split: str, min_bytes: int) -> tuple[tuple[str, int], ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for rel in corpus_files(split):
        n = (root / rel).stat().st_size
        if n >= min_bytes:
            out.append((rel, n))
    return tuple(out)


def read_document(rel: str, offset: int, doc_len: int) -> bytes:
    """``doc_len`` bytes of the standard-library file ``rel`` from ``offset``."""
    with open(Path(sysconfig.get_paths()["stdlib"]) / rel, "rb") as f:
        f.seek(offset)
        data = f.read(doc_len)
    if len(data) != doc_len:
        raise ValueError(f"{rel} has no {doc_len} bytes at offset {offset}")
    return data


def retrieval_pairs(num_pairs: int, *, doc_len: int = 1024, split: str = "train", seed: int = 0) -> list[RetrievalPair]:
    """The pairs (files and offsets), balanced and deterministic (see the module docstring)."""
    check_positive_int("num_pairs", num_pairs)
    check_positive_int("doc_len", doc_len)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    files = _files(split, 2 * doc_len)
    if len(files) < 2:
        raise ValueError(f"the {split!r} split has {len(files)} files of >= 2 * doc_len = {2 * doc_len} bytes; need 2")
    rng = random.Random(seed)
    labels = [1] * (num_pairs // 2) + [0] * (num_pairs - num_pairs // 2)
    rng.shuffle(labels)
    out = []
    for label in labels:
        if label:
            rel, n = files[rng.randrange(len(files))]
            # two windows that do not overlap: the first in [0, n - 2L], the second after it
            a = rng.randrange(n - 2 * doc_len + 1)
            b = rng.randrange(a + doc_len, n - doc_len + 1)
            if rng.random() < 0.5:
                a, b = b, a
            out.append(RetrievalPair(rel, a, rel, b, 1))
        else:
            i, j = rng.sample(range(len(files)), 2)
            (ra, na), (rb, nb) = files[i], files[j]
            out.append(RetrievalPair(ra, rng.randrange(na - doc_len + 1), rb, rng.randrange(nb - doc_len + 1), 0))
    return out


def make_retrieval(
    num_pairs: int, *, doc_len: int = 1024, split: str = "train", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(doc_a [N, doc_len], doc_b [N, doc_len], labels [N])`` (long; bytes as tokens) of
    :func:`retrieval_pairs`."""
    pairs = retrieval_pairs(num_pairs, doc_len=doc_len, split=split, seed=seed)

    def docs(which: str) -> torch.Tensor:
        rows = [read_document(getattr(p, f"file_{which}"), getattr(p, f"offset_{which}"), doc_len) for p in pairs]
        return torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).view(len(pairs), doc_len).long()

    return docs("a"), docs("b"), torch.tensor([p.label for p in pairs], dtype=torch.long)
