"""effattn.data.byte_corpus: deterministic, split by file, cached."""

import doctest
import sysconfig
from pathlib import Path

import pytest
import torch

import effattn.data as data_mod
from effattn.data import byte_corpus, corpus_files, sample_windows


def test_split_by_file_is_disjoint_and_deterministic():
    train, val = corpus_files("train"), corpus_files("validation")
    assert train and val and not set(train) & set(val)
    assert 0.03 < len(val) / (len(train) + len(val)) < 0.2
    assert corpus_files("validation") == val


def test_corpus_cached_and_prefix(tmp_path):
    a = byte_corpus("validation", cache_dir=tmp_path)
    files = list(tmp_path.rglob("validation.bin"))
    assert len(files) == 1 and files[0].stat().st_size == a.numel()
    b = byte_corpus("validation", max_bytes=5000, cache_dir=tmp_path)
    assert b.dtype == torch.uint8 and torch.equal(b, a[:5000])
    # the first validation file opens the corpus
    first = (Path(sysconfig.get_paths()["stdlib"]) / corpus_files("validation")[0]).read_bytes()
    assert bytes(a[: len(first)].tolist()) == first


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        byte_corpus("test")
    with pytest.raises(ValueError, match="max_bytes"):
        byte_corpus("train", max_bytes=0)
    with pytest.raises(ValueError, match="seq_len"):
        sample_windows(torch.zeros(5, dtype=torch.uint8), 1, 5)


def test_sample_windows_seeded():
    d = torch.arange(200, dtype=torch.uint8)
    x1, _ = sample_windows(d, 3, 7, torch.Generator().manual_seed(1))
    x2, y2 = sample_windows(d, 3, 7, torch.Generator().manual_seed(1))
    assert torch.equal(x1, x2) and torch.equal(y2[:, :-1], x2[:, 1:])


def test_docstring_examples(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFATTN_CACHE", str(tmp_path))
    assert doctest.testmod(data_mod).failed == 0
