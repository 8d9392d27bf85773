"""The passkey part's report of ``python -m effattn bench memory``: rows rebuilt from the per-model files
(``--report-only``), the table rows, and the plot of accuracy against context."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path


def saved_passkey_rows(args: argparse.Namespace, out: Path) -> tuple[list[dict], str | None]:
    """The rows of ``--models`` from ``passkey_<model>.json`` files under ``out`` (any depth; a file nearer
    ``out`` wins, then the newest: another seed's report in a subfolder does not replace this folder's rows)
    and the ``swa_eq`` note."""
    found = {}
    files = sorted(out.rglob("passkey_*.json"), key=lambda f: (-len(f.relative_to(out).parts), f.stat().st_mtime))
    for f in files:
        row = json.loads(f.read_text())
        if isinstance(row, dict) and "model" in row:
            found[row["model"]] = row
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    rows = [found.get(n, {"model": n, "error": "not run (no passkey_<model>.json)"}) for n in names]
    eq, mag = found.get("swa_eq"), found.get("titans_mag")
    note = None
    if eq and mag:
        note = (
            f"swa_eq: window {eq['window']}, whose KV cache ({eq['state_bytes']} bytes) ~ Titans MAG's state "
            f"({mag['state_bytes']} bytes)"
        )
    return rows, note


def passkey_table_rows(rows: list[dict], contexts: list[int]) -> list[dict]:
    table = []
    for r in rows:
        if "error" in r:
            table.append({"model": r["model"], "error": r["error"]})
            continue
        t = {
            k: r[k]
            for k in ("model", "mixer", "window", "heads", "state_bytes", "params", "form", "final_loss", "train_s")
        }
        t["final_loss"] = round(t["final_loss"], 3)
        for c in contexts:
            a = r["acc"][str(c)] if str(c) in r["acc"] else r["acc"][c]
            t[f"acc@{c}"] = round(a["digit_acc"], 3)
        ex = r.get("exact")
        if ex:
            t["exact rule"] = (
                f"{ex['token_by_token']['digit_acc']:.3f} (chunked {ex['chunked']['digit_acc']:.3f}) @{ex['context']}"
            )
        table.append(t)
    return table


def plot_passkey(rows: list[dict], contexts: list[int], window: int, out: Path, title_note: str) -> str | None:
    """accuracy vs context, one line per model, the window marked; returns the file name (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from effattn.bench.compare.plot_style import series_style

    fig, ax = plt.subplots(figsize=(10, 5))
    for i, r in enumerate(r for r in rows if "error" not in r):
        acc = [(r["acc"].get(c) or r["acc"].get(str(c)))["digit_acc"] for c in contexts]
        label = f"{r['model']} ({r['state_bytes'] / 1024:.0f} KiB)"
        ax.plot(contexts, acc, label=label, **series_style(i))
    ax.axvline(window, color="grey", linestyle=":", label=f"attention window {window}")
    ax.axhline(0.1, color="black", linewidth=0.8, linestyle="--", label="chance (0.1)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey digit accuracy")
    note = textwrap.fill(title_note, 120)  # a long --report-only note wraps instead of running off the figure
    ax.set_title(f"Passkey retrieval past the attention window\n{note}", fontsize=9 if len(note) <= 120 else 7)
    ax.legend(
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        title="model (state at longest context)",
        title_fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(out / "passkey_vs_context.png", dpi=120)
    plt.close(fig)
    return "passkey_vs_context.png"
