"""effattn compare --mixer-options: parsing, checks against the mixer registry, and the options reaching the LM."""

from __future__ import annotations

import argparse

import pytest

from effattn.bench.compare import make_config, train_kwargs
from effattn.bench.compare.config import add_arguments, config_from_args
from effattn.bench.compare.options import check_mixer_options, parse_mixer_options
from effattn.bench.compare.sweep import RecallRun


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_parse_values_and_several_mixers():
    got = parse_mixer_options("titans_mag:chunk_size=16, atlas:chunk_size=8;depth=1 ,infini_attention:delta=True")
    assert got == {
        "titans_mag": {"chunk_size": 16},
        "atlas": {"chunk_size": 8, "depth": 1},
        "infini_attention": {"delta": True},
    }
    assert parse_mixer_options("a:x=0.5,a:y=None,a:z=elu") == {"a": {"x": 0.5, "y": None, "z": "elu"}}
    assert parse_mixer_options("") == {}


@pytest.mark.parametrize(
    "text, match",
    [
        ("titans_mag", "expected 'mixer:key=value'"),
        (":chunk_size=16", "expected 'mixer:key=value'"),
        ("titans_mag:chunk_size", "expected 'key=value' for mixer 'titans_mag'"),
        ("titans_mag:16=chunk", "expected 'key=value'"),
        ("titans_mag:dim=32", "set by the run"),
    ],
)
def test_parse_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_mixer_options(text)


def test_check_unknown_mixer_and_option():
    check_mixer_options({"titans_mag": {"chunk_size": 16, "window": 8}, "sliding_window": {"window": 8}})
    with pytest.raises(ValueError, match=r"unknown mixer 'titans_mgg'; registered mixers: .*titans_mag"):
        check_mixer_options({"titans_mgg": {"chunk_size": 16}})
    # a named parameter the class lacks, and one its **kwargs pass on to NeuralMemory, which refuses it
    with pytest.raises(ValueError, match=r"mixer 'sliding_window' does not take option 'chunk_size'.*window"):
        check_mixer_options({"sliding_window": {"chunk_size": 16}})
    with pytest.raises(ValueError, match=r"mixer 'titans_mag' does not take option 'chunk'"):
        check_mixer_options({"titans_mag": {"chunk": 16}})


def test_command_line_errors_name_the_option():
    cfg = config_from_args(_args("--mixer-options", "titans_mag:chunk_size=16"))
    assert cfg.mixer_options == {"titans_mag": {"chunk_size": 16}}
    assert config_from_args(_args()).mixer_options == {}
    with pytest.raises(SystemExit, match=r"--mixer-options: unknown mixer 'nope'"):
        config_from_args(_args("--mixer-options", "nope:chunk_size=16"))
    with pytest.raises(SystemExit, match=r"--mixer-options: mixer 'atlas' does not take option 'chunksize'"):
        config_from_args(_args("--mixer-options", "atlas:chunksize=16"))


def test_options_reach_only_their_mixer_and_the_model():
    from effattn.bench.train import build_lm
    from effattn.memory import NeuralMemory

    cfg = make_config("tiny", mixer_options={"titans_mag": {"chunk_size": 4, "window": 3}})
    kw = train_kwargs(cfg, RecallRun("titans_mag", 32, 32, 1e-3, 0))
    assert kw["mixer_kw"] == {"chunk_size": 4, "window": 3}
    assert "mixer_kw" not in train_kwargs(cfg, RecallRun("attention", 32, 32, 1e-3, 0))
    lm = build_lm("titans_mag", 32, 1, 16, 1, **kw["mixer_kw"])
    mems = [m for m in lm.modules() if isinstance(m, NeuralMemory)]
    assert mems and all(m.chunk_size == 4 for m in mems)
    assert [m.attn.window for m in lm.modules() if hasattr(m, "attn") and hasattr(m, "memory")] == [3]
