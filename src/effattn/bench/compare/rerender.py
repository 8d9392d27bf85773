"""Write a stored ``effattn compare`` report again from its ``results.json``, without training anything.

The recall section's cells (medians, spreads, ``left_chance`` and verdicts) are computed from the stored
runs by the rules of the installed version (:func:`effattn.bench.compare.aggregate_runs`), so a report
made before a rule changed can be brought up to date from what it measured. The command line, machine,
wall time, advice, notes and every measured figure stay those of the original run; the report gains a
line saying when and how it was re-rendered. From the command line::

    python -m effattn compare --rerender docs/results/compare_state_3seeds/results.json
    python -m effattn compare --rerender run/results.json --out elsewhere   # leave run/ as it is
"""

from __future__ import annotations

import datetime
import json
import shutil
from dataclasses import fields
from pathlib import Path

from effattn.bench import harness
from effattn.bench.compare.config import CompareConfig, pair_counts
from effattn.bench.compare.report import write_report
from effattn.bench.compare.sweep import LEFT_CHANCE_FRACTION, aggregate_runs


def config_from_results(results: dict, out: str | Path) -> CompareConfig:
    """The :class:`CompareConfig` a stored ``results.json`` was made with (``meta.config``; a field it lacks
    takes its default), writing into ``out``.

    Example::

        >>> cfg = config_from_results({"meta": {"config": {"preset": "state", "mqar_kv_pairs": [2, 4, 8]}}}, "o")
        >>> cfg.preset, cfg.mqar_kv_pairs, cfg.out
        ('state', (2, 4, 8), 'o')
    """
    stored = (results.get("meta") or {}).get("config")
    if not isinstance(stored, dict):
        raise ValueError(f"results: meta.config must be the run's stored configuration (a dict), got {stored!r}")
    names = {f.name for f in fields(CompareConfig)} - {"extra_mechanisms", "out"}
    kw = {}
    for key, value in stored.items():
        if key in names:
            # JSON turned the tuples into lists (mqar_cells: a list of [mixer, head dim] lists)
            kw[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value) if isinstance(value, list) else value
    return CompareConfig(**kw, out=str(out))


def rerender_report(results_json: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.md``, ``results.json`` and the plots of a stored run again into ``out`` (default: the
    folder of ``results_json``, in place), the recall cells and verdicts recomputed from the stored runs
    (``recall_runs``; a report without them keeps its stored rows). Returns the report's path.

    Example::

        >>> import json, tempfile
        >>> from pathlib import Path
        >>> run = {"mixer": "m", "dim": 8, "head_dim": 8, "lr": 1e-3, "seed": 0, "state_bytes": 64, "acc@2": 0.56}
        >>> stored = {"meta": {"command": "python -m effattn compare", "machine": {}, "config": {
        ...     "preset": "tiny", "only": ["recall"], "mqar_kv_pairs": 2}}, "speed": [], "listops": [],
        ...     "recall": [{**run, "verdict": "old"}], "recall_runs": [run], "advice": [], "notes": []}
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "results.json").write_text(json.dumps(stored))
        >>> report = rerender_report(d / "results.json")
        >>> json.loads((d / "results.json").read_text())["recall"][0]["verdict"]  # 0.56 < 0.625 at 2 pairs
        'optimisation-limited'
        >>> "Re-rendered" in report.read_text()
        True
    """
    path = Path(results_json)
    if not path.is_file():
        raise ValueError(f"results_json: no such file {str(path)!r} (a results.json written by effattn compare)")
    results = json.loads(path.read_text())
    cfg = config_from_results(results, path.parent if out is None else out)
    runs = results.get("recall_runs") or []
    if runs:
        results["recall"] = aggregate_runs(runs, pair_counts(cfg))
    for key in ("speed", "recall", "recall_runs", "listops", "advice", "notes"):
        results.setdefault(key, [])
    results["meta"]["rerendered"] = {
        "at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": harness.command_line(),
        "what": "the recall cells and verdicts recomputed from the stored runs with the rules of this version "
        f"(a run left chance at 1/n + {LEFT_CHANCE_FRACTION:g} x (1 - 1/n)); no training was re-run",
    }
    report = write_report(cfg, results)
    if "lra" in cfg.only:  # its own page, lra.md, kept in the run's folder
        from effattn.bench.compare.lra import append_lra_section

        if (path.parent / "lra.md").exists() and path.parent.resolve() != Path(cfg.out).resolve():
            shutil.copyfile(path.parent / "lra.md", Path(cfg.out) / "lra.md")
        append_lra_section(report, cfg)
    return report
