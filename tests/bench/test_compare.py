"""``effattn compare`` at the tiny preset, and the training loops' sanity."""

from __future__ import annotations

import json

import pytest
import torch

from effattn.bench import compare
from effattn.bench.compare import SpeedMechanism, make_config, run_compare


def _broken(T: int) -> dict:
    raise NotImplementedError("injected failure")


def test_compare_tiny_writes_every_report_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cfg = make_config(
        "tiny",
        out=str(tmp_path / "cmp"),
        lengths=(64,),
        mixers=("attention", "gated_deltanet", "no_such_mixer"),
        listops_mixers=("attention",),
        extra_mechanisms=[SpeedMechanism("test", "broken", _broken)],
    )
    res = run_compare(cfg)
    out = tmp_path / "cmp"
    for f in ("report.md", "results.json", "time_vs_length.png", "memory_vs_length.png", "recall_vs_state.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f

    speed = {(r["family"], r["mechanism"]): r for r in res["speed"]}
    # every registered mechanism has a row: exact backends, every linear op, every sparse method
    from effattn.linear import REGISTRY as LINEAR
    from effattn.sparse import REGISTRY as SPARSE

    assert {("exact", "sdpa causal"), ("exact", "tiled causal"), ("exact", "tiled window=256")} <= set(speed)
    assert {("linear", n) for n in LINEAR} <= set(speed)
    assert {("sparse", n) for n in SPARSE} <= set(speed)
    ok = [r for r in res["speed"] if "error" not in r and "fwd_ms" in r]
    assert all(r["fwd_ms"] > 0 for r in ok)
    assert all("error" not in r for r in res["speed"] if r["family"] in ("exact", "linear")), res["speed"]
    assert any(r["family"] == "sparse" for r in ok) or not SPARSE
    assert speed[("exact", "sdpa causal")]["state_bytes"] == 2 * 1 * 65 * 4 * 64 * 4  # KV cache of T+1 tokens
    # every mechanism with a decode form measured its step (a decode failure lands in the note)
    for n in LINEAR:
        assert speed[("linear", n)].get("step_us", 0) > 0, speed[("linear", n)]
    # the injected failure is reported, not fatal
    assert "NotImplementedError: injected failure" in speed[("test", "broken")]["error"]

    recall = {r["mixer"]: r for r in res["recall"]}
    assert 0.0 <= recall["attention"]["accuracy"] <= 1.0 and recall["attention"]["state_bytes"] > 0
    assert recall["gated_deltanet"]["state_bytes"] > 0
    assert "unknown mixer" in recall["no_such_mixer"]["error"]
    assert res["listops"][0]["mixer"] == "attention" and "accuracy" in res["listops"][0]

    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["machine"]["torch"] == torch.__version__
    assert len(data["speed"]) == len(res["speed"]) and "traceback" not in data["speed"][0]
    md = (out / "report.md").read_text()
    assert "broken" in md and "injected failure" in md and "gated_deltanet" in md
    printed = capsys.readouterr().out
    assert "broken" in printed and "sdpa causal" in printed  # the terminal table


def test_cli_parses_and_rejects(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    cfg = compare.config_from_args(
        p.parse_args(["--preset", "tiny", "--only", "speed,recall", "--lengths", "128,64", "--mixers", "attention"])
    )
    assert cfg.lengths == (64, 128) and cfg.only == ("speed", "recall") and cfg.mixers == ("attention",)
    assert compare.config_from_args(p.parse_args(["--full"])).preset == "full"
    with pytest.raises(SystemExit):
        compare.config_from_args(p.parse_args(["--only", "speed,nope"]))
    with pytest.raises(SystemExit):
        compare.config_from_args(p.parse_args(["--lengths", "12,x"]))
    with pytest.raises(ValueError, match="preset"):
        make_config("huge")


def test_plain_table_without_rich(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_rich(name, *a, **kw):
        if name.startswith("rich"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_rich)
    compare.print_table("t", [{"a": 1.5, "b": None}, {"a": "x", "b": 3}], ["a", "b"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "t" and lines[1].split() == ["a", "b"] and lines[2].split() == ["1.5", "—"]


def test_attention_solves_tiny_mqar():
    """Training sanity: a 2-layer attention LM learns MQAR (vocab 32, T 16, 4 pairs) in a few hundred steps
    (~300 at seeds 0-3; ~10 s on one core)."""
    from effattn.bench.train import train_mqar

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = train_mqar(
            "attention",
            64,
            heads=2,
            vocab_size=32,
            seq_len=16,
            num_kv_pairs=4,
            num_train=4000,
            num_test=128,
            steps=450,
            batch_size=32,
            lr=1e-3,
            weight_decay=0.0,
            random_non_queries=False,
            seed=0,
        )
    finally:
        torch.set_num_threads(threads)
    assert r["accuracy"] > 0.9, r
    assert r["state_bytes"] == 2 * 2 * 16 * 64 * 4  # 2 layers x (K and V) x T x dim x float32


def test_train_docstring_example_and_listops_loop():
    import doctest

    from effattn.bench import train

    res = doctest.testmod(train)
    assert res.attempted > 0 and res.failed == 0
    r = train.train_listops(
        "gated_deltanet",
        32,
        heads=2,
        min_len=5,
        max_len=24,
        max_depth=3,
        num_train=32,
        num_test=16,
        steps=3,
        batch_size=8,
    )
    assert 0.0 <= r["accuracy"] <= 1.0 and 0.1 <= r["majority"] <= 1.0 and r["params"] > 0


def test_recall_preset_and_flags():
    """The recall preset runs the recall section alone over several widths and pair counts; the
    --widths / --kv-pairs / --threads flags reach the config and bad values are refused."""
    import argparse

    cfg = make_config("recall")
    assert cfg.only == ("recall",) and "attention" in cfg.mixers and len(cfg.mixers) >= 4
    assert len(cfg.mqar_widths) >= 3 and len(cfg.mqar_kv_pairs) >= 3
    assert max(cfg.mqar_kv_pairs) * 4 <= cfg.mqar_seq_len < cfg.mqar_vocab  # MQAR's own constraints

    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    cfg = compare.config_from_args(
        p.parse_args(["--preset", "recall", "--widths", "16,32", "--kv-pairs", "2,4", "--threads", "1"])
    )
    assert cfg.mqar_widths == (16, 32) and cfg.mqar_kv_pairs == (2, 4) and cfg.only == ("recall",)
    assert compare.config_from_args(p.parse_args(["--kv-pairs", "8"])).mqar_kv_pairs == 8  # one count: an int
    for bad in (["--widths", "32,x"], ["--kv-pairs", "4,4"], ["--widths", "0"]):
        with pytest.raises(SystemExit):
            compare.config_from_args(p.parse_args(bad))


def test_recall_mixture_reports_accuracy_per_pair_count(tmp_path):
    """Several pair counts: one accuracy column per count, their mean as accuracy, a trend line per
    count in the short answer, and the per-count panels in recall_vs_state.png."""
    pytest.importorskip("matplotlib")
    cfg = make_config(
        "tiny",
        out=str(tmp_path / "rec"),
        only=("recall",),
        mixers=("attention", "gla"),
        mqar_widths=(16, 32),
        mqar_kv_pairs=(2, 4, 8),
        mqar_steps=2,
    )
    res = run_compare(cfg)
    rows = {(r["mixer"], r["dim"]): r for r in res["recall"]}
    assert set(rows) == {("attention", 16), ("attention", 32), ("gla", 16), ("gla", 32)}
    for r in rows.values():
        accs = [r["acc@2"], r["acc@4"], r["acc@8"]]
        assert all(0.0 <= a <= 1.0 for a in accs) and r["accuracy"] == pytest.approx(sum(accs) / 3)
        assert "accuracy_by_pairs" not in r
    assert rows[("attention", 32)]["state_bytes"] == 2 * rows[("attention", 16)]["state_bytes"]
    trend = [a for a in res["advice"] if a.startswith("MQAR ") and "pairs, accuracy >=" in a]
    assert [t.split(" pairs")[0] for t in trend] == ["MQAR 2", "MQAR 4", "MQAR 8"]
    assert all("attention" in t and "gla" in t for t in trend)
    md = (tmp_path / "rec" / "report.md").read_text()
    assert "| acc@2 | acc@4 | acc@8 | accuracy |" in md and "mixture of 2, 4, 8 key-value pairs" in md
    assert "## Speed" not in md and "## Reasoning" not in md
    assert (tmp_path / "rec" / "recall_vs_state.png").stat().st_size > 0
    data = json.loads((tmp_path / "rec" / "results.json").read_text())
    assert data["meta"]["config"]["mqar_kv_pairs"] == [2, 4, 8] and len(data["recall"]) == 4


def test_recall_head_dims_vary_the_state_at_one_width(tmp_path):
    """--head-dims trains one model per head dim (heads = width // head_dim): a linear-attention state
    (heads x head_dim^2) grows with the head dim, attention's KV cache does not; the state preset is
    that sweep at one width."""
    import argparse

    cfg = make_config("state")
    assert cfg.only == ("recall",) and len(cfg.mqar_widths) == 1 and len(cfg.mqar_head_dims) >= 3
    assert "attention" in cfg.mixers and "mamba2" not in cfg.mixers
    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    assert compare.config_from_args(p.parse_args(["--head-dims", "4,8"])).mqar_head_dims == (4, 8)
    with pytest.raises(SystemExit):
        compare.config_from_args(p.parse_args(["--head-dims", "8,8"]))

    cfg = make_config(
        "tiny",
        out=str(tmp_path / "hd"),
        only=("recall",),
        mixers=("attention", "linear_attention"),
        mqar_widths=(32,),
        mqar_head_dims=(8, 16),
        mqar_kv_pairs=(2, 4),
        mqar_steps=1,
    )
    rows = {(r["mixer"], r["head_dim"]): r for r in run_compare(cfg)["recall"]}
    assert set(rows) == {(m, hd) for m in ("attention", "linear_attention") for hd in (8, 16)}
    assert rows[("attention", 8)]["state_bytes"] == rows[("attention", 16)]["state_bytes"]
    assert rows[("linear_attention", 16)]["state_bytes"] > 1.5 * rows[("linear_attention", 8)]["state_bytes"]
    md = (tmp_path / "hd" / "report.md").read_text()
    assert "| head_dim |" in md and "head_dim in 8, 16" in md


def test_recall_trend_reads_the_threshold():
    rows = [
        {"mixer": "a", "dim": 32, "state_bytes": 100, "accuracy": 0.9, "acc@4": 0.95, "acc@16": 0.85},
        {"mixer": "a", "dim": 64, "state_bytes": 200, "accuracy": 0.95, "acc@4": 0.99, "acc@16": 0.91},
        {"mixer": "b", "dim": 32, "state_bytes": 10, "accuracy": 0.5, "acc@4": 0.92, "acc@16": 0.1},
    ]
    lines = compare.recall_trend(rows, (4, 16))
    assert lines[0] == "MQAR 4 pairs, accuracy >= 0.9: a from dim=32 (100 B); b from dim=32 (10 B)"
    assert lines[1] == "MQAR 16 pairs, accuracy >= 0.9: a from dim=64 (200 B); b never (best 0.10)"


def test_train_mqar_mixture_keeps_single_count_data():
    """A mixture splits num_train over the pair counts and tests each; a single count is unchanged."""
    from effattn.bench.train import train_mqar

    kw = dict(heads=1, vocab_size=32, seq_len=16, num_train=30, num_test=8, steps=1, batch_size=8)
    one = train_mqar("attention", 16, num_kv_pairs=4, **kw)
    assert set(one["accuracy_by_pairs"]) == {4} and one["accuracy"] == one["accuracy_by_pairs"][4]
    mix = train_mqar("attention", 16, num_kv_pairs=(2, 4), **kw)
    assert set(mix["accuracy_by_pairs"]) == {2, 4}
    with pytest.raises(ValueError, match="num_kv_pairs"):
        train_mqar("attention", 16, num_kv_pairs=(4, 4), **kw)


def test_external_baselines_are_wired_to_the_packages_calls(monkeypatch):
    """flash_attn / fla rows: absent with a note on a CPU run; on a CUDA run each package's function is
    called with its documented layout ([B, T, H, D], bf16). No GPU here, so stand-in modules with the
    packages' call signatures take the place of the kernels, and the rows are measured on the CPU."""
    import importlib.util
    import sys
    import types

    calls = []

    def flash_attn_func(q, k, v, causal=False):
        calls.append(("flash_attn", q.shape, q.dtype, causal))
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        )
        return o.transpose(1, 2)

    def chunk_gated_delta_rule(q, k, v, g, beta):
        calls.append(("fla", q.shape, q.dtype, g.shape, beta.shape))
        return (q * k).sum(-1, keepdim=True) * v * beta[..., None] * g.exp()[..., None].to(v.dtype), None

    fake = {
        "flash_attn": types.SimpleNamespace(flash_attn_func=flash_attn_func),
        "fla": types.ModuleType("fla"),
        "fla.ops": types.ModuleType("fla.ops"),
        "fla.ops.gated_delta_rule": types.SimpleNamespace(chunk_gated_delta_rule=chunk_gated_delta_rule),
    }
    for name, mod in fake.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in fake else None)

    mechs, notes = compare.external_baselines(make_config("tiny"), 1e9)
    assert mechs == [] and all("--device cuda" in n for n in notes) and len(notes) == 2
    cfg = make_config("tiny", device="cuda")
    mechs, notes = compare.external_baselines(cfg, 1e9)
    assert [m.name for m in mechs] == ["flash_attn causal (bf16)", "fla chunk_gated_delta_rule (bf16)"] and not notes

    cpu = make_config("tiny", repeats=1)
    for pkg in ("flash_attn", "fla"):
        row = compare.external_row(pkg, cpu, 1e9, 32)
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0, row
    from effattn.bench import linear as lin

    B, H, D = lin.BATCH, lin.HEADS, lin.HEAD_DIM
    assert ("flash_attn", torch.Size([B, 32, H, D]), torch.bfloat16, True) in calls
    assert any(c[0] == "fla" and c[1] == torch.Size([B, 32, H, D]) and c[3] == (B, 32, H) for c in calls)


def test_recall_figure_only_when_the_recall_section_ran(tmp_path):
    """``--only speed`` leaves no empty recall figure; a recall run (even one with no successful run) draws it."""
    pytest.importorskip("matplotlib")
    from effattn.bench.compare.report import write_plots

    machine = {"cpu_model": "test cpu", "torch": torch.__version__, "python": "3", "torch_threads": 1}
    files, _ = write_plots(tmp_path / "speed_only", [], [], machine, (4,))
    assert "recall_vs_state.png" not in files and not (tmp_path / "speed_only" / "recall_vs_state.png").exists()
    row = {"mixer": "attention", "dim": 64, "head_dim": 8, "accuracy": 0.5, "state_bytes": 100}
    for rows, name in (([row], "ran"), ([{"mixer": "x", "error": "boom"}], "failed")):
        (tmp_path / name).mkdir()
        files, _ = write_plots(tmp_path / name, [], rows, machine, (4,))
        assert "recall_vs_state.png" in files and (tmp_path / name / "recall_vs_state.png").stat().st_size > 0
