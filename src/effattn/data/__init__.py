"""effattn.data: a deterministic byte-level text corpus that needs no download.

:func:`byte_corpus` concatenates the ``.py`` source files of the running Python's standard library
(``sysconfig.get_paths()["stdlib"]``, without ``site-packages``), sorted by relative path, each file
followed by a blank line; bytes are tokens (vocabulary 256). The split is by file: a file belongs to
``"validation"`` when the first byte of the SHA-256 of its relative path is ``< 26`` (about 10% of the
files), else to ``"train"``, so no file is in both and the split is the same on every machine with the
same Python version. The corpus is built once and cached under ``cache_dir`` (default
``$EFFATTN_CACHE`` or ``~/.cache/effattn``), keyed by the Python version and the list of files and their
sizes. Only the standard library and torch are used.

Example::

    >>> from effattn.data import byte_corpus
    >>> val = byte_corpus("validation", max_bytes=1000)
    >>> val.dtype, tuple(val.shape)
    (torch.uint8, (1000,))
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from effattn._checks import check_int

__all__ = ["SPLITS", "byte_corpus", "corpus_files", "sample_windows"]

SPLITS = ("train", "validation")
SEPARATOR = b"\n\n"
_VALIDATION_BELOW = 26  # first byte of sha256(relative path) < 26: ~10% of files


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _split_of(rel: str) -> str:
    return "validation" if hashlib.sha256(rel.encode()).digest()[0] < _VALIDATION_BELOW else "train"


def corpus_files(split: str) -> list[str]:
    """Relative paths (posix, sorted) of the standard-library ``.py`` files in ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = _stdlib()
    rels = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts or "__pycache__" in parts:
            continue
        rels.append(path.relative_to(root).as_posix())
    return sorted(r for r in rels if _split_of(r) == split)


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("EFFATTN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "effattn"


def _build(split: str, cache_dir: str | os.PathLike | None) -> Path:
    root, files = _stdlib(), corpus_files(split)
    key = hashlib.sha256()
    for rel in files:
        key.update(f"{rel}:{(root / rel).stat().st_size}\n".encode())
    version = "{}.{}.{}".format(*sys.version_info[:3])
    target = _cache_root(cache_dir) / "byte_corpus" / f"py{version}-{key.hexdigest()[:16]}" / f"{split}.bin"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as out:
        for rel in files:
            out.write((root / rel).read_bytes())
            out.write(SEPARATOR)
    os.replace(tmp, target)  # atomic: a concurrent builder never sees half a file
    return target


def byte_corpus(split: str, max_bytes: int | None = None, cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """The ``split`` (``"train"`` or ``"validation"``) of the standard-library byte corpus, ``uint8 [n]``.

    ``max_bytes`` keeps the first bytes only (the corpus order is fixed, so it is the same prefix every
    time). See the module docstring for the split rule and the cache.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_int("max_bytes", max_bytes, minimum=1, allow_none=True)
    path = _build(split, cache_dir)
    with open(path, "rb") as f:
        data = f.read() if max_bytes is None else f.read(max_bytes)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def sample_windows(
    data: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows of ``data``: inputs ``[batch, seq_len]`` and next-byte targets (int64).

    >>> import torch
    >>> x, y = sample_windows(torch.arange(100, dtype=torch.uint8), 2, 8, torch.Generator().manual_seed(0))
    >>> bool((y == x + 1).all())
    True
    """
    check_int("batch", batch, minimum=1)
    check_int("seq_len", seq_len, minimum=1)
    if data.dim() != 1 or data.numel() < seq_len + 1:
        raise ValueError(f"data must be 1-D with at least seq_len + 1 = {seq_len + 1} tokens, got {tuple(data.shape)}")
    start = torch.randint(0, data.numel() - seq_len, (batch,), generator=generator)
    idx = start[:, None] + torch.arange(seq_len + 1)
    win = data[idx].long()
    return win[:, :-1], win[:, 1:]
