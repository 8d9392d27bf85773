"""The ``effattn`` command line: version, per-suite options and help texts, terminal tables that fit."""

from __future__ import annotations

import argparse
import doctest
import re
import subprocess
import sys

import pytest

import effattn
from effattn.__main__ import build_parser, main
from effattn.bench import SUITES, compare, run_suite
from effattn.bench import table as table_module
from effattn.bench.table import render_table


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _options(add_arguments) -> set[str]:
    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    return {s for a in p._actions for s in a.option_strings}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"effattn {effattn.__version__}"
    out = subprocess.run([sys.executable, "-m", "effattn", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"effattn {effattn.__version__}"


def test_the_suites_are_the_registry():
    assert {"attention", "kv", "linear", "models", "sparse"} <= set(SUITES.names())
    assert set(_subparsers(_subparsers(build_parser())["bench"])) == set(SUITES.names())


@pytest.mark.parametrize("name", SUITES.names())
def test_suite_help_lists_only_its_own_options(name, capsys):
    text = _help(["bench", name], capsys)
    own = _options(SUITES[name].add_arguments)
    assert {"--device", "--out"} <= own
    shown = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", text))
    assert own <= shown
    others = set().union(*(_options(s.add_arguments) for n, s in SUITES.items() if n != name)) - own
    assert not (shown & others), f"{name} --help shows other suites' options {sorted(shown & others)}"
    assert "``" not in text and not re.search(r":(func|class|data|mod|meth):`", text)
    assert f"bench_out/{name}" in text  # --out's default


def test_top_level_and_compare_help_are_plain_text(capsys):
    for argv in ([], ["bench"], ["compare"]):
        text = _help(argv, capsys)
        assert "``" not in text and not re.search(r":(func|class|data|mod|meth):`", text) and "**" not in text
    assert "--version" in _help([], capsys)


def _all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    commands = _subparsers(build_parser())
    return [("compare", commands["compare"])] + [(f"bench {n}", p) for n, p in _subparsers(commands["bench"]).items()]


@pytest.mark.parametrize("where, parser", _all_parsers(), ids=[w for w, _ in _all_parsers()])
def test_every_option_has_a_help_text_and_its_default(where, parser):
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{where} {action.option_strings} has no help"
        if not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            assert "default" in action.help, f"{where} {action.option_strings}: the default is not shown"
    described = {a.dest: a.help for a in parser._actions}
    for dest in ("device", "out") + (("repeats",) if "repeats" in described else ()):
        assert len(described[dest]) > 20


def test_bad_suite_name_errors_clearly(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "no_such_suite"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'no_such_suite'" in err and "attention" in err and "sparse" in err
    with pytest.raises(SystemExit, match="unknown benchmark suite 'nope'; choose from attention"):
        run_suite("nope", argparse.Namespace())


# a compare speed table at demo sizes: long mechanism names, notes and errors, large state sizes
SPEED_ROWS = [
    {
        "family": "exact",
        "mechanism": "sdpa causal",
        "T": 2048,
        "fwd_ms": 30.83,
        "fwd_bwd_ms": 118.2,
        "fwd_MiB": 8.312,
        "fwd_bwd_MiB": 16.77,
        "eff_%": 58.12,
        "step_us": 41.33,
        "state_bytes": 4196352,
    },
    {
        "family": "baseline",
        "mechanism": "flex window=256 (torch.compile)",
        "T": 8192,
        "note": "skipped (run with --flex)",
    },
    {
        "family": "baseline",
        "mechanism": "fla chunk_gated_delta_rule (bf16)",
        "T": 8192,
        "fwd_ms": 1234.5,
        "fwd_bwd_ms": 98765.4,
        "fwd_MiB": 12345.6,
        "fwd_bwd_MiB": 54321.0,
        "eff_%": 0.771,
        "step_us": 123456.0,
        "state_bytes": 16779264,
        "error": "RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB " * 2,
    },
    {
        "family": "sparse",
        "mechanism": "hyper_attention",
        "T": 512,
        "fwd_ms": 0.0012,
        "fwd_bwd_ms": 5e-5,
        "fwd_MiB": 0.0,
        "eff_%": None,
        "note": "no dense selection to count FLOPs on: time and memory only",
    },
]


def _rendered(rows, columns, width: int) -> list[str]:
    return render_table(rows, columns, width=width, use_rich=True).splitlines()


@pytest.mark.parametrize("width", [80, 100])
def test_compare_speed_table_has_no_wrapped_cells(width):
    pytest.importorskip("rich")
    rows = compare.speed_terminal_rows(SPEED_ROWS)
    lines = _rendered(rows, compare.SPEED_TERMINAL_COLUMNS, width)
    assert all(len(line) <= width for line in lines), [len(line) for line in lines]
    # header, rule, one line per row, at most one line naming the columns left out: nothing wrapped
    body = [line for line in lines if not line.startswith("(left out")]
    assert len(body) == 2 + len(rows), "\n".join(lines)
    assert body[2].startswith("exact") and body[5].startswith("sparse")
    assert "0.771" in lines[4] and "98765" in lines[4] and "1234" in lines[4]  # numbers whole, not split
    if width == 100:
        assert not any(line.startswith("(left out") for line in lines)  # every column of the demo table fits
        assert "flex window=2" in lines[3] and "skipped" in lines[3]  # text cut with an ellipsis


def test_every_suite_table_fits_80_and_100_columns():
    """The terminal columns of every suite and compare section at 80 and 100 columns, plain and rich, with
    rows whose text and numbers are as wide as real runs make them."""
    from effattn.bench import attention, kv, linear, models, sparse

    recall = compare.terminal_columns(compare.recall_columns(compare.make_config("recall")))
    tables = [
        attention.TERMINAL_COLUMNS,
        kv.TERMINAL_COLUMNS,
        linear.TERMINAL_COLUMNS,
        linear.DECODE_TERMINAL_COLUMNS,
        models.TERMINAL_COLUMNS,
        sparse.TERMINAL_COLUMNS,
        compare.SPEED_TERMINAL_COLUMNS,
        recall,
        compare.terminal_columns(compare.LISTOPS_COLUMNS),
    ]
    for columns in tables:
        row = {c.key: ("a_long_method_name_of_a_mechanism (variant)" if c.text else 123456.789) for c in columns}
        row["T"] = 65536
        rows = [row, {**row, columns[-1].key: "RuntimeError: " + "x" * 120}]
        for width in (80, 100):
            for use_rich in (False, True):
                if use_rich:
                    pytest.importorskip("rich")
                lines = render_table(rows, columns, width=width, use_rich=use_rich).splitlines()
                assert all(len(line) <= width for line in lines), (width, use_rich, lines)
                body = [line for line in lines if not line.startswith("(left out")]
                assert len(body) == (2 if use_rich else 1) + len(rows), "\n".join(lines)
                assert "123457" in body[-1] or "1.23e+05" in body[-1]


def test_number_formatting_and_plain_fallback():
    assert [table_module.format_value(x) for x in (0.77123, 1234.5, None, float("nan"), 7)] == [
        "0.771",
        "1234",
        "—",
        "—",
        "7",
    ]
    lines = render_table([{"a": 1.5, "b": None}], ["a", "b"], width=80, use_rich=False).splitlines()
    assert lines == ["  a  b", "1.5  —"]


def test_cli_modules_doctests():
    from effattn.bench import cli

    for module in (table_module, cli, sys.modules["effattn.__main__"], sys.modules["effattn.bench"]):
        res = doctest.testmod(module)
        assert res.attempted > 0 and res.failed == 0, module.__name__
