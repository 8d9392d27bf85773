"""``effattn bench models --quick`` end to end on two mixers at tiny contexts (rows and files; not speed)."""

from __future__ import annotations

import json

from effattn.__main__ import main


def test_models_suite_rows(tmp_path):
    out = tmp_path / "models"
    main(
        [
            "bench",
            "models",
            "--quick",
            "--mixers",
            "attention,gla",
            "--lengths",
            "32,5000",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    rows = json.loads((out / "models.json").read_text())["rows"]
    assert [(r["mixer"], r["L"]) for r in rows] == [
        ("attention", None),
        ("attention", 32),
        ("attention", 5000),
        ("gla", None),
        ("gla", 32),
        ("gla", 5000),
    ]
    for r in rows:
        assert "error" not in r, r
        if r["L"] is None:
            assert r["train_tok_s"] > 0
        else:
            assert r["prefill_s"] > 0 and r["decode_tok_s"] > 0 and r["state_MiB"] > 0
    by = {(r["mixer"], r["L"]): r for r in rows}
    # a KV cache grows with the context, a recurrent state does not
    assert by["attention", 5000]["state_MiB"] > 100 * by["attention", 32]["state_MiB"]
    assert by["gla", 5000]["state_MiB"] == by["gla", 32]["state_MiB"]
    assert "| gla |" in (out / "models.md").read_text()
