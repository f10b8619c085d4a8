"""Tables and figures of an experiment: mean ± std over seeds per group of runs, the paired gain of the
student over its teacher, per-run extra metrics, the paper's reference numbers, CSV and PNG.

Statistics follow `randteach.reports.groups` (only completed runs; sample std, n - 1; undefined for n = 1).
Rows are `aggregate.collect` rows ({"run_dir", "status", "config", "summary", "metrics"}); any list of
dicts of that shape works (e.g. transfer probes), so one table format serves every experiment.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import Config, outside_the_address
from ..runs.rundir import RunDir
from .groups import (EXTRA_LABELS, collect, fewer, flat_config, group, numeric_keys, plot_bars, plot_vs_epoch,
                     plot_vs_key, seed_paths, show_value, write_runs_csv)
from .run import KIND_LABEL, KINDS, ROLES, file_safe

Extra = Callable[[dict], dict[str, float]]


def rows_of(configs: list[Config]) -> list[dict]:
    """`aggregate.collect` rows of the configs' runs, in the configs' order; a run without a summary yet (not
    started, queued, running) is a row of status "pending", counted among its group's unfinished runs. A
    row's config is the asking config's values of the keys in the run's address over the run's config.yaml:
    configs that name one network two ways (model.norm batch on a ResNet, and default) share one run, whose
    file says one of them; where and how it ran (data.root, log.*) stay the run's own."""
    dirs = [c.run_dir() for c in configs if (c.run_dir() / "summary.json").exists()]
    by_dir = {Path(r["run_dir"]).resolve(): r for r in collect(dirs)} if dirs else {}
    rows = []
    for c in configs:
        row = by_dir.get(Path(c.run_dir()).resolve())
        asked = {k: v for k, v in flat_config(c.to_dict()).items() if not outside_the_address(k)}
        rows.append({**row, "config": {**row["config"], **asked}} if row else _pending(c))
    return seed_paths(rows)


def _pending(cfg: Config) -> dict:
    return {"run_dir": str(cfg.run_dir()), "status": "pending", "config": flat_config(cfg.to_dict()),
            "summary": {}, "metrics": {}}


def last_step(run_dir: str | Path) -> dict:
    """The last training-step record of a run's metrics.jsonl (loss, dist_init, dist_teacher, ...)."""
    steps = RunDir(run_dir).steps()
    return steps[-1] if steps else {}


def epoch_curves(run_dir: str | Path) -> dict[str, tuple[list, list]]:
    """A run's curves vs epoch (RT Fig. 17, 18): its logged loss (each record's window mean where there is one),
    its distance from init, and its student's linear probe (%)."""
    run = RunDir(run_dir)
    steps = [r for r in run.steps() if "epoch" in r]  # not a diverged run's record of its non-finite step
    probes = [r for r in run.probes() if "linear" in r.get("student", {})]
    return {"kl": ([r["epoch"] for r in steps], [r.get("loss_mean", r["loss"]) for r in steps]),
            "dist_init": ([r["epoch"] for r in steps], [r["dist_init"] for r in steps]),
            "linear": ([r["epoch"] for r in probes], [100 * r["student"]["linear"] for r in probes])}


def plot_curve(ax, curve: tuple[list, list], **style) -> None:
    """One of `epoch_curves`' curves as a line; a short run's few records also as points (a one-record line
    is not drawn at all)."""
    ax.plot(*curve, "-", marker="o" if len(curve[0]) < 20 else None, ms=3, **style)


def optimization_extras(row: dict) -> dict[str, float]:
    """Distance of the final student from its init and from the teacher (App. D; the final loss is in
    every table already)."""
    rec = last_step(row["run_dir"])
    return {k: float(rec[k]) for k in ("dist_init", "dist_teacher") if isinstance(rec.get(k), (int, float))}


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    return (float(a.mean()) if len(a) else math.nan, float(a.std(ddof=1)) if len(a) > 1 else math.nan)


def fmt(mean: float, std: float, percent: bool = True) -> str:
    if math.isnan(mean):
        return "–"
    if percent:
        text = f"{100 * mean:.2f}"
        return text + (f" ± {100 * std:.2f}" if not math.isnan(std) else "")
    text = f"{mean:.6g}"  # losses (a KL near 0, or a cross-entropy near ln m) and distances
    return text + (f" ± {std:.2g}" if not math.isnan(std) else "")


def _matches(ref: dict, entry: dict) -> bool:
    return all(str(entry.get(k)) == str(v) for k, v in (ref.get("match") or {}).items())


def reference_of(references: list[dict], entry: dict) -> dict | None:
    for ref in references:
        if _matches(ref, entry):
            return ref
    return None


def summarize(rows: list[dict], keys: list[str], extras: Extra | None = None) -> list[dict]:
    """`aggregate.group` entries, each with the paired gain student - teacher per probe kind
    ("gain.linear_mean"/"_std", over the completed runs) and the extras' mean and std."""
    table = group(rows, keys) if rows else []
    for entry in table:
        members = [r for r in rows if r["status"] == "completed"
                   and all(r["config"].get(k) == entry[k] for k in keys)]
        for kind in KINDS:
            gains = [r["metrics"][f"student.{kind}"] - r["metrics"][f"teacher.{kind}"] for r in members
                     if f"student.{kind}" in r["metrics"] and f"teacher.{kind}" in r["metrics"]]
            if gains:
                _put(entry, f"gain.{kind}", gains)
        if extras is not None:
            values: dict[str, list[float]] = {}
            for r in members:
                for k, v in extras(r).items():
                    values.setdefault(k, []).append(v)
            for k, v in values.items():
                _put(entry, k, v)
    return table


def _put(entry: dict, name: str, values: list[float]) -> None:
    """<name>_mean, _std and _n (the finite values averaged) of a table entry."""
    entry[f"{name}_mean"], entry[f"{name}_std"] = mean_std(values)
    entry[f"{name}_n"] = sum(v is not None and math.isfinite(v) for v in values)


def markdown(table: list[dict], keys: list[str], references: list[dict] | None = None,
             labels: dict[str, str] | None = None) -> str:
    """One row per group: keys, n, teacher/student/input per probe kind, gain, extras, paper numbers."""
    if not table:
        return "_no finished runs yet_"
    labels = labels or {}
    kinds = [k for k in KINDS if any(f"{r}.{k}_mean" in e for e in table for r in ROLES)]
    extras = list(dict.fromkeys(k[:-5] for e in table for k in e if k.endswith("_mean")
                                and not k.startswith(tuple(f"{r}." for r in ROLES) + ("gain.",))
                                and k != "wall_time_s_mean"))
    head = [labels.get(k, k) for k in keys] + ["n"]
    cols: list[tuple[str, Callable[[dict], str]]] = []
    for kind in kinds:
        for role in ROLES:
            m = f"{role}.{kind}"
            if any(f"{m}_mean" in e and not math.isnan(e[f"{m}_mean"]) for e in table):
                cols.append((f"{role} {KIND_LABEL[kind]} (%)", lambda e, m=m: _cell(e, m)))
        if any(f"gain.{kind}_mean" in e for e in table):
            cols.append((f"student − teacher {KIND_LABEL[kind]} (pp)", lambda e, kind=kind: _cell(e, f"gain.{kind}")))
    for k in extras:
        cols.append((labels.get(k, EXTRA_LABELS.get(k, k)), lambda e, k=k: _cell(e, k, percent=False)))
    ref_kinds = [k for k in KINDS if any(f"{r}.{k}" in ref for ref in references or [] for r in ROLES)]
    for kind in ref_kinds:
        cols.append((f"paper {KIND_LABEL[kind]}: teacher / student / input (%)",
                     lambda e, kind=kind: _reference_cell(reference_of(references or [], e), kind)))
    if any(e["diverged"] or e["failed"] or e["unfinished"] for e in table):
        cols.append(("diverged / failed / unfinished", lambda e: f"{e['diverged']} / {e['failed']} / {e['unfinished']}"))
    head += [c[0] for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in table:
        lines.append("| " + " | ".join([show_value(e[k]) for k in keys] + [str(e["n"])] + [f(e) for _, f in cols]) + " |")
    return "\n".join(lines)


def _cell(e: dict, name: str, percent: bool = True) -> str:
    """mean ± std, and the number of runs where fewer than the row's n have the value."""
    return fmt(e.get(f"{name}_mean", math.nan), e.get(f"{name}_std", math.nan), percent) + fewer(e, name)


def _reference_cell(ref: dict | None, kind: str) -> str:
    if ref is None:
        return "–"
    cell = " / ".join(f"{ref[f'{r}.{kind}']:.2f}" if f"{r}.{kind}" in ref else "–" for r in ROLES)
    return cell + (f" ({ref['source']})" if ref.get("source") else "")


def write_experiment_csv(table: list[dict], keys: list[str], path: Path, references: list[dict] | None = None) -> Path:
    """One row per group: the keys, n, counts, every <metric>_mean/_std, and the paper's numbers (its tables'
    accuracies in %, written as fractions like the measured ones beside them)."""
    cols: list[str] = []
    for e in table:
        cols += [c for c in e if c not in cols]
    ref_cols = sorted({k for ref in references or [] for k in ref if k not in ("match", "source")})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols + [f"paper.{k}" for k in ref_cols])
        for e in table:
            ref = reference_of(references or [], e) or {}
            w.writerow([show_value(e.get(c), exact=True) if c in keys else e.get(c, "") for c in cols]
                       + [ref[k] / 100 if k in ref else "" for k in ref_cols])
    return path


def arm_section(title: str, rows: list[dict], keys: list[str], out: Path, stem: str, *,
                references: list[dict] | None = None, extras: Extra | None = None,
                curves: bool = True, labels: dict[str, str] | None = None) -> tuple[list[str], list[dict]]:
    """Markdown lines for one group of runs (table, CSV links, figures: final probes vs every numeric key, or
    as bars per group where no key is numeric, and probes vs epoch), written next to `out/report.md`.
    Returns (lines, table)."""
    table = summarize(rows, keys, extras)
    lines = [f"## {title}", "", markdown(table, keys, references, labels), ""]
    if not table:
        return lines, table
    stem = file_safe(stem)
    write_experiment_csv(table, keys, out / f"{stem}.csv", references)
    write_runs_csv(rows, keys, out / f"{stem}-runs.csv")
    lines += [f"Data: [{stem}.csv]({stem}.csv) (per group), [{stem}-runs.csv]({stem}-runs.csv) (per run).", ""]
    figures = []
    if any(f"{r}.{k}_mean" in table[0] for r in ROLES for k in KINDS):
        for key in numeric_keys(table, keys):
            figures.append(plot_vs_key(table, keys, key, out / f"{stem}-vs-{file_safe(key)}.png"))
        if not numeric_keys(table, keys):  # data sets, encoders: the final probes as bars, the paper's beside them
            refs = [reference_of(references or [], e) for e in table]
            figures.append(plot_bars(table, keys, out / f"{stem}-bars.png", refs))
        if curves:
            path = plot_vs_epoch(rows, keys, out / f"{stem}-vs-epoch.png")
            figures += [path] if path else []
    lines += [f"![{p.stem}]({p.name})" for p in figures] + ([""] if figures else [])
    return lines, table
