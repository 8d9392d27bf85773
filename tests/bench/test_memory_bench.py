"""``effattn bench memory``: the suite is registered, the passkey metric reads the answer positions (an
oracle scores 1, an oracle one position off scores chance), the equal-state window matches Titans MAG's
state, a tiny end-to-end run and the rebuild of the report from the per-model files, a speed row."""

from __future__ import annotations

import argparse
import json

import torch

from effattn.bench import SUITES
from effattn.bench.memory import (
    add_arguments,
    build_model,
    equal_state_window,
    passkey_accuracy,
    run,
    speed_row,
)
from effattn.bench.memory_report import saved_passkey_rows
from effattn.bench.tasks.passkey import DEFAULT_VOCAB_SIZE, KEY


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


class Oracle(torch.nn.Module):
    """Reads the key after the KEY token and predicts digit ``j`` at answer step ``j`` (shifted by ``shift``)."""

    def __init__(self, context: int, digits: int, shift: int = 0):
        super().__init__()
        self.context, self.digits, self.shift = context, digits, shift

    def forward(self, ids):
        B, L = ids.shape
        logits = torch.zeros(B, L, DEFAULT_VOCAB_SIZE)
        for b in range(B):
            at = int((ids[b, : self.context] == KEY).nonzero()[0])
            for j in range(self.digits):
                logits[b, self.context - 1 + j + self.shift, ids[b, at + 1 + j]] = 1.0
        return (logits,)


def test_registered_and_passkey_metric_reads_the_answer_positions():
    assert "memory" in SUITES.names()
    args = _args("--digits", "3", "--window", "8")
    right = passkey_accuracy(Oracle(40, 3), 40, args, examples=16, seed=1)
    assert right["digit_acc"] == 1.0 and right["key_acc"] == 1.0
    assert right["far_examples"] > 0 and right["far_digit_acc"] == 1.0
    wrong = passkey_accuracy(Oracle(40, 3, shift=-1), 40, args, examples=16, seed=1)  # one step early
    assert wrong["key_acc"] == 0.0 and wrong["digit_acc"] < 0.3


def test_equal_state_window_matches_titans_mag():
    args = _args("--window", "8", "--chunk-size", "4")
    window, target = equal_state_window(args, 64)
    swa = build_model("swa", args, 64, window=window).state_size(64)
    per_token = build_model("swa", args, 64, window=9).state_size(64) - build_model(
        "swa", args, 64, window=8
    ).state_size(64)
    assert window > 8 and abs(swa - target) <= per_token / 2


def test_tiny_run_and_report_rebuilt_from_files(tmp_path):
    common = ["--parts", "passkey", "--window", "8", "--contexts", "16,32", "--train-len", "12,24", "--steps", "2"]
    common += ["--tokens-per-step", "48", "--eval-examples", "8", "--workers", "1", "--exact-context", "16"]
    run(_args(*common, "--models", "swa,titans_mag", "--chunk-size", "4", "--out", str(tmp_path)))
    md = (tmp_path / "passkey.md").read_text()
    assert "| swa |" in md and "| titans_mag |" in md and "acc@32" in md
    rows = json.loads((tmp_path / "passkey_rows.json").read_text())
    assert {r["model"] for r in rows} == {"swa", "titans_mag"}
    assert rows[1]["exact"]["token_by_token"]["digit_acc"] >= 0.0  # the token-by-token re-check ran
    (tmp_path / "passkey.md").unlink()
    run(_args(*common, "--models", "titans_mag,swa,gated_deltanet", "--out", str(tmp_path), "--report-only", "load 1"))
    md = (tmp_path / "passkey.md").read_text()
    assert "| titans_mag |" in md and "not run" in md and "load 1" in md
    # another run's file in a subfolder (a second seed's report), written later, does not replace this folder's row
    (tmp_path / "seed1").mkdir()
    row = json.loads((tmp_path / "passkey_swa.json").read_text())
    (tmp_path / "seed1" / "passkey_swa.json").write_text(json.dumps(dict(row, train_s=-1.0)))
    (tmp_path / "seed1" / "passkey_rmt.json").write_text(json.dumps(dict(row, model="rmt")))
    got, _ = saved_passkey_rows(_args("--models", "swa,rmt"), tmp_path)
    assert got[0]["train_s"] == row["train_s"] and got[1]["model"] == "rmt" and "error" not in got[1]


def test_speed_row():
    row = speed_row("titans_mag", dict(window=4), 8, 4, repeats=1)
    assert row["form"] == "chunk 4" and row["fwd"]["ms"] > 0 and row["state_bytes"] > 0
    assert speed_row("sliding_window", dict(window=4), 8, None, repeats=1)["form"] == "-"
