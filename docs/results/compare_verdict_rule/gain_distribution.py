"""Where MQAR runs that learned no binding sit, and where runs that learned sit: the data behind the
left-chance rule of ``effattn compare`` (``effattn.bench.compare.left_chance_threshold``).

Every trained run stored in a committed ``docs/results/*/results.json`` (the sweeps' ``recall_runs``; the
older single-seed reports' ``recall`` rows, one run each) is read; its accuracy ``a`` at ``n`` pairs is put
on the scale of the room above chance, ``gain = (a - 1/n) / (1 - 1/n)`` (0: chance, 1: perfect), and a run's
gain is its largest over its pair counts. Writes ``distribution.md`` next to this file.

    python docs/results/compare_verdict_rule/gain_distribution.py
"""

from __future__ import annotations

import json
from pathlib import Path

from effattn.bench.compare import left_chance

ROOT = Path(__file__).resolve().parents[3]
RESULTS = ROOT / "docs" / "results"
# the 3-seed sweeps (3 lrs x 3 seeds per cell) the rule was chosen from, and the one run after it was chosen
SWEEPS = ("compare_state_3seeds", "compare_state_claims", "compare_state_sweep")
LATER = ("compare_recall_3seeds",)
BINS = (-1.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)


def stored_runs() -> list[dict]:
    """Every stored run: ``{"source", "mixer", "dim", "head_dim", "lr", "seed", "accs": {n: a}, "loss"}``."""
    out = []
    for path in sorted(RESULTS.glob("**/results.json")):
        data = json.loads(path.read_text())
        cfg = data.get("meta", {}).get("config", {})
        single = cfg.get("mqar_kv_pairs") if isinstance(cfg.get("mqar_kv_pairs"), int) else None
        for r in data.get("recall_runs") or data.get("recall") or []:
            if "error" in r:
                continue
            accs = {int(k[4:]): v for k, v in r.items() if k.startswith("acc@") and k[4:].isdigit() and v is not None}
            if not accs and single and r.get("accuracy") is not None:
                accs = {single: r["accuracy"]}
            if accs:
                src = str(path.parent.relative_to(RESULTS))
                keys = ("mixer", "dim", "head_dim", "lr", "seed")
                out.append({"source": src, **{k: r.get(k) for k in keys}, "accs": accs, "loss": r.get("final_loss")})
    return out


def gain(a: float, n: int) -> float:
    return (a - 1.0 / n) / (1.0 - 1.0 / n)


def run_gain(run: dict) -> float:
    return max(gain(a, n) for n, a in run["accs"].items())


def as_run(run: dict) -> dict:
    """The run with ``acc@n`` keys, as effattn.bench.compare.left_chance reads it."""
    return {f"acc@{n}": a for n, a in run["accs"].items()}


def histogram(values: list[float]) -> str:
    counts = [sum(lo <= v < hi for v in values) for lo, hi in zip(BINS, BINS[1:])]
    return " | ".join(str(c) for c in counts)


def main() -> None:
    runs = stored_runs()
    sweep = [r for r in runs if r["source"] in SWEEPS]
    # the sweeps' cells overlap (compare_state_sweep reran two cells of compare_state_3seeds): count a run once
    seen, unique = set(), []
    for r in sweep:
        key = (r["mixer"], r["dim"], r["head_dim"], r["lr"], r["seed"], tuple(sorted(r["accs"].items())))
        if key not in seen:
            seen.add(key)
            unique.append(r)
    head = "| runs | " + " | ".join(f"[{lo:.2f}, {hi:.2f})" for lo, hi in zip(BINS, BINS[1:])) + " |"
    rule = "|---" * (len(BINS)) + "|"
    md = [
        "# Where plateau runs and learning runs sit (MQAR, every stored run)",
        "",
        "Command: `python docs/results/compare_verdict_rule/gain_distribution.py` (reads the committed results.json "
        "files; no training). gain = (accuracy - 1/n) / (1 - 1/n): 0 at chance, 1 at perfect recall; a run's "
        "gain is its largest over its pair counts.",
        "",
        "## The state presets' 3-seed sweeps (3 lrs x 3 seeds per cell; duplicates counted once): the rule's data",
        "",
        "Runs per gain bin:",
        "",
        head,
        rule,
        f"| {len(unique)} | {histogram([run_gain(r) for r in unique])} |",
        "",
    ]
    gains = sorted(run_gain(r) for r in unique if 0.0 <= run_gain(r) < 0.9)
    gaps = sorted(zip(gains, gains[1:]), key=lambda ab: ab[1] - ab[0], reverse=True)
    lo, hi = gaps[0]
    below = [r for r in unique if run_gain(r) <= lo]
    above = [r for r in unique if run_gain(r) >= hi]
    md += [
        f"Sorted gains between 0 and 0.9: {', '.join(f'{g:.2f}' for g in gains)}.",
        "",
        f"The widest gap lies between {lo:.2f} and {hi:.2f}. Below it ({len(below)} runs):",
        "",
    ]
    for n in (2, 4, 8):
        accs = [r["accs"][n] for r in below if n in r["accs"] and run_gain(r) >= 0]
        md.append(f"- {n} pairs: accuracy {min(accs):.3f}-{max(accs):.3f} (chance {1 / n:.3f})")
    diverged = [r for r in below if run_gain(r) < 0]
    losses = [r["loss"] for r in below if run_gain(r) >= 0 and r["loss"] is not None]
    md += [
        f"- final training loss of those at or above chance {min(losses):.2f}-{max(losses):.2f} nats; "
        f"{len(diverged)} of the {len(below)} fell below chance at every pair count (loss "
        f"{min(r['loss'] for r in diverged):.2f}-{max(r['loss'] for r in diverged):.2f}: diverged, lr 3e-3)"
        if diverged
        else "",
        "",
        f"Above it ({len(above)} runs): final training loss "
        f"{min(r['loss'] for r in above):.2f}-{max(r['loss'] for r in above):.2f} nats; the lowest of them:",
        "",
    ]
    for r in sorted(above, key=run_gain)[:4]:
        accs = " / ".join(f"{r['accs'][n]:.3f}" for n in sorted(r["accs"]))
        md.append(
            f"- {r['source']} {r['mixer']} head dim {r['head_dim']} lr {r['lr']:g} seed {r['seed']}: {accs} "
            f"(gain {run_gain(r):.2f}, loss {r['loss']:.2f})"
        )
    later = [r for r in runs if r["source"] in LATER]
    if later:
        md += [
            "",
            "## The recall preset's 3-seed sweep (run after the rule was chosen: an out-of-sample check)",
            "",
            head,
            rule,
            f"| {len(later)} | {histogram([run_gain(r) for r in later])} |",
            "",
            "Its runs with a gain in [0.1, 0.6), with the rule's call:",
            "",
            "| mixer | width | lr | seed | accuracy at 2 / 4 / 8 pairs | gain per pair count | final loss | left |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted((r for r in later if 0.1 <= run_gain(r) < 0.6), key=run_gain):
            ns = sorted(r["accs"])
            md.append(
                f"| {r['mixer']} | {r['dim']} | {r['lr']:g} | {r['seed']} | "
                + " / ".join(f"{r['accs'][n]:.3f}" for n in ns)
                + " | "
                + " / ".join(f"{gain(r['accs'][n], n):+.2f}" for n in ns)
                + f" | {r['loss']:.2f} | {'yes' if left_chance(as_run(r), ns) else 'no'} |"
            )
    rest = [r for r in runs if r["source"] not in SWEEPS + LATER]
    md += [
        "",
        "## The other stored runs (single seed, one learning rate: quick preset at 4 pairs, older recall/state runs)",
        "",
        head,
        rule,
        f"| {len(rest)} | {histogram([run_gain(r) for r in rest])} |",
        "",
        "Runs with a gain in [0.1, 0.45) (between the sweeps' plateau and their lowest learning run):",
        "",
        "| source | mixer | dim | head dim | accuracy by pairs | gain | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in rest if 0.1 <= run_gain(r) < 0.45), key=run_gain):
        accs = " / ".join(f"{n}: {r['accs'][n]:.3f}" for n in sorted(r["accs"]))
        loss = f"{r['loss']:.2f}" if r["loss"] is not None else "-"
        md.append(
            f"| {r['source']} | {r['mixer']} | {r['dim']} | {r['head_dim']} | {accs} | {run_gain(r):.2f} | {loss} |"
        )
    out = Path(__file__).with_name("distribution.md")
    out.write_text("\n".join(md) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
