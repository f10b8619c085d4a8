"""Reports over many runs: collect every summary.json, group by the swept config keys, and write
mean ± std over seeds as CSV and Markdown, with plots of the final probes vs a swept key and of
the probes vs epoch per group.

Statistics: only completed runs enter a group's mean and std; std is the sample standard deviation
(ddof = 1, undefined for n = 1); diverged, failed and unfinished runs are counted beside them.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..config import first_defaults, flatten, outside_the_address
from ..errors import UserError
from ..runs.rundir import CorruptSummary, RunDir
from ..text import counted
from .run import COLORS, KIND_LABEL, KINDS, ROLES, file_safe, pyplot

# Never grouped by: seeds are what a group averages over; nor by the keys that leave a run's address alone
# (`config.outside_the_address`: its folder, logging, data.root), which do not change what a run computes.
IGNORED_KEYS = ("train.seed",)
# Paths that may differ from seed to seed (restart's round-2 teachers are each seed's round-1 student): grouped
# by whether one is given, unless runs of one seed and setting name different ones (a swept axis; `seed_paths`).
SEED_PATH_KEYS = ("init.teacher_checkpoint", "init.checkpoint")
GIVEN = "given"
EXTRA_METRICS = ("final_loss", "wall_time_s")


def hashable(v: Any) -> Any:
    return tuple(hashable(x) for x in v) if isinstance(v, (list, tuple)) else v


def flat_config(d: dict) -> dict[str, Any]:
    """A config as {dotted key: value}, lists as tuples (so values can be grouped on)."""
    return {k: hashable(v) for k, v in flatten(d).items()}


def show_value(v: Any, exact: bool = False) -> str:
    """A config value as text: short (1e-10) for tables, or exact (repr) for CSV files."""
    if isinstance(v, tuple):
        return "[" + ", ".join(show_value(x, exact) for x in v) + "]"
    if isinstance(v, float):
        return repr(v) if exact else f"{v:g}"
    return ("" if exact else "–") if v is None else str(v)


def _sort_key(values: tuple) -> tuple:
    # None first, then numbers, then everything else by its text: mixed types never compare.
    return tuple((0, 0, "") if v is None else (1, v, "") if _is_number(v) else (2, 0, show_value(v)) for v in values)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _metrics(summary: dict) -> dict[str, float]:
    out = {}
    for role in ROLES:
        for kind in KINDS:
            v = summary.get("probe", {}).get(role, {}).get(kind)
            if _is_number(v):
                out[f"{role}.{kind}"] = float(v)
    for key in EXTRA_METRICS:
        if _is_number(summary.get(key)):
            out[key] = float(summary[key])
    return out


def collect(dirs: list[str | Path]) -> list[dict]:
    """One row per summary.json found under `dirs` (recursively; each file once, however the dirs overlap).

    A row: {"run_dir", "status", "config" (dotted keys, lists as tuples), "summary", "metrics"}.
    """
    found: dict[Path, None] = {}
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise UserError(f"{d}: no such directory; give run directories or folders that contain them")
        candidates = [d] if d.is_file() else sorted(d.rglob("summary.json"))
        for path in candidates:
            if path.name == "summary.json" and not any(p.startswith(".") for p in path.relative_to(d).parts[:-1]):
                found.setdefault(path.resolve(), None)
    rows = []
    for path in sorted(found):
        run = RunDir(path.parent)
        try:
            summary = run.summary() or {}
            status = summary.get("status", "unknown")
        except CorruptSummary:
            summary, status = {}, "unreadable"
        config = _config_of(run)
        if config is None:
            config, status = {}, "unreadable"
        rows.append({"run_dir": str(run.path), "status": status, "config": config, "summary": summary,
                     "metrics": _metrics(summary)})
    return rows


def seed_paths(rows: list[dict]) -> list[dict]:
    """`rows` with each path of SEED_PATH_KEYS replaced by GIVEN (in place) unless it is a swept axis of its
    runs' setting, so that seeds whose runs start from their own checkpoints form one group, and runs with
    a checkpoint another group than those without. Decided per setting: one sweep of a pool that sweeps a
    path leaves the per-seed paths of another sweep grouped by presence."""
    for key in SEED_PATH_KEYS:
        swept = _swept_settings(rows, key)
        for r in rows:
            if r["config"].get(key) is not None and _setting(r, key) not in swept:
                r["config"][key] = GIVEN
    return rows


def _setting(row: dict, key: str) -> tuple:
    """A run's config without its seed, its folder and its checkpoint paths."""
    skip = {key, *IGNORED_KEYS, *SEED_PATH_KEYS}
    return tuple(sorted((k, v) for k, v in row["config"].items() if k not in skip and not outside_the_address(k)))


def _swept_settings(rows: list[dict], key: str) -> set[tuple]:
    """The settings in which two runs of one seed name different paths of `key`."""
    paths: dict[tuple, set] = {}
    for r in rows:
        if r["config"].get(key) is not None:
            setting = _setting(r, key)
            paths.setdefault((setting, r["config"].get("train.seed")), set()).add(r["config"][key])
    return {setting for (setting, _), p in paths.items() if len(p) > 1}


def _config_of(run: RunDir) -> dict | None:
    """The run's config.yaml, flattened ({} if there is none, None if it cannot be read). A key added to
    randteach after the run was made takes its first default, which is what the run did: its address is the
    same (`Config.digest`), and so is its group."""
    if not run.config_path.exists():
        return {}
    try:
        config = yaml.safe_load(run.config_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return None
    return {**flat_config(first_defaults()), **flat_config(config)} if isinstance(config, dict) else None


def varying_keys(rows: list[dict]) -> list[str]:
    """Config keys whose value differs between runs (IGNORED_KEYS and the keys outside the address excepted),
    in config order. A run whose config.yaml cannot be read, or is missing, has no values to compare (not a
    different value of every key)."""
    rows = [r for r in rows if r["config"]]
    keys: dict[str, set] = {}
    for r in rows:
        for k in r["config"]:
            keys.setdefault(k, set())
    for k, seen in keys.items():
        for r in rows:
            seen.add(r["config"].get(k))
    return [k for k, seen in keys.items() if len(seen) > 1 and k not in IGNORED_KEYS and not outside_the_address(k)]


def metric_names(rows: list[dict]) -> list[str]:
    present = {m for r in rows for m in r["metrics"]}
    ordered = [f"{role}.{kind}" for role in ROLES for kind in KINDS] + list(EXTRA_METRICS)
    return [m for m in ordered if m in present]


def _buckets(rows: list[dict], keys: list[str]) -> dict[tuple, list[dict]]:
    buckets: dict[tuple, list[dict]] = {}
    for r in rows:
        buckets.setdefault(tuple(r["config"].get(k) for k in keys), []).append(r)
    return {kv: buckets[kv] for kv in sorted(buckets, key=_sort_key)}


def group(rows: list[dict], keys: list[str] | None = None) -> list[dict]:
    """One entry per distinct value of `keys` (default: the varying keys): the key values, n (completed
    runs), the counts of diverged, failed and unfinished runs, and <metric>_mean / <metric>_std / <metric>_n
    over the completed runs that have a finite value of it (std: sample std, n - 1 in the denominator; nan
    for one value; <metric>_n below n says how many runs lack it, e.g. a k-NN probe of overflowing features)."""
    keys = varying_keys(rows) if keys is None else list(keys)
    known = {k for r in rows for k in r["config"]}
    unknown = [k for k in keys if k not in known]
    if rows and unknown:
        raise UserError(f"--group-by: {', '.join(unknown)} is not a config key of these runs; keys that vary "
                        f"here: {', '.join(varying_keys(rows)) or 'none'}")
    metrics = metric_names(rows)
    table = []
    for values, members in _buckets(rows, keys).items():
        done = [r for r in members if r["status"] == "completed"]
        entry: dict[str, Any] = dict(zip(keys, values))
        entry.update(n=len(done), diverged=sum(r["status"] == "diverged" for r in members),
                     failed=sum(r["status"] == "failed" for r in members))
        entry["unfinished"] = len(members) - entry["n"] - entry["diverged"] - entry["failed"]
        for m in metrics:
            vals = np.array([r["metrics"][m] for r in done if m in r["metrics"]], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            entry[f"{m}_mean"] = float(vals.mean()) if len(vals) else math.nan
            entry[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
            entry[f"{m}_n"] = len(vals)
        table.append(entry)
    return table


# ------------------------------------------------------------------ writing

def _fmt(mean: float, std: float, metric: str) -> str:
    if math.isnan(mean):
        return "–"
    scale, digits = (100, 2) if "." in metric else (1, 4)
    text = f"{scale * mean:.{digits}f}" if metric != "final_loss" else f"{mean:.4g}"
    if not math.isnan(std):
        text += f" ± {scale * std:.{digits}f}" if metric != "final_loss" else f" ± {std:.2g}"
    return text


def fewer(entry: dict, metric: str) -> str:
    """" (n = k)" where a cell averages fewer runs than its row's n (the others lack a finite value)."""
    k = entry.get(f"{metric}_n")
    shown = not math.isnan(entry.get(f"{metric}_mean", math.nan))
    return f" (n = {k})" if shown and k is not None and k < entry["n"] else ""


def mark_fewer(ax, x, y, n, full: int, color=None) -> None:
    """Write "n=k" beside each plotted point that averages fewer runs (k) than the sweep's seeds (`full`)."""
    for xi, yi, ni in zip(x, y, n):
        if ni < full:
            ax.annotate(f"n={ni}", (xi, yi), fontsize=6, color=color, xytext=(3, 3), textcoords="offset points")


# what a table's or figure's column of these metrics holds
EXTRA_LABELS = {"final_loss": "final loss (mean over the last epoch's steps)", "wall_time_s": "wall time (s)",
                "dist_init": "distance from init ‖θ_S − θ_S(0)‖₂", "dist_teacher": "distance from teacher ‖θ_S − θ_T‖₂"}


def _label(metric: str) -> str:
    if metric in EXTRA_LABELS:
        return EXTRA_LABELS[metric]
    role, kind = metric.split(".")
    return f"{role} {'k-NN' if kind == 'knn' else kind} (%)"


def write_group_csv(table: list[dict], keys: list[str], path: Path) -> None:
    cols = list(table[0]) if table else [*keys, "n"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for entry in table:
            w.writerow([show_value(entry[c], exact=True) if c in keys else entry[c] for c in cols])


def write_runs_csv(rows: list[dict], keys: list[str], path: Path) -> None:
    metrics = metric_names(rows)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run_dir", "status", *keys, "train.seed", *metrics])
        for r in sorted(rows, key=lambda r: _sort_key(tuple(r["config"].get(k) for k in [*keys, "train.seed"]))):
            w.writerow([r["run_dir"], r["status"],
                        *(show_value(r["config"].get(k), exact=True) for k in [*keys, "train.seed"]),
                        *(r["metrics"].get(m, "") for m in metrics)])


def markdown_table(table: list[dict], keys: list[str], metrics: list[str]) -> str:
    shown = [m for m in metrics if m != "wall_time_s"]
    head = [*keys, "n", *(_label(m) for m in shown), "diverged / failed / unfinished"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in table:
        cells = [show_value(e[k]) for k in keys] + [str(e["n"])]
        cells += [_fmt(e[f"{m}_mean"], e[f"{m}_std"], m) + fewer(e, m) for m in shown]
        cells.append(f"{e['diverged']} / {e['failed']} / {e['unfinished']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def numeric_keys(table: list[dict], keys: list[str]) -> list[str]:
    """Group keys whose values are all numbers, with at least two of them: plottable on an x axis."""
    out = []
    for k in keys:
        vals = {e[k] for e in table if e[k] is not None}
        if len(vals) > 1 and all(_is_number(v) for v in vals):
            out.append(k)
    return out


STYLES = ("-", "--", ":", "-.")


def _log_axis(xs: list[float]) -> bool:
    """Log x axis for values spread over >= 2 decades that are more evenly spaced in log than in linear
    terms (lr 1e-4, 1e-3, 1e-2; batch 256 ... 49152), not for e.g. alpha 1e-10, 0.1, 0.2, ..., 1."""
    xs = sorted(set(xs))
    if not xs or xs[0] <= 0 or xs[-1] / xs[0] < 100:
        return False
    if len(xs) < 3:
        return True

    def unevenness(gaps):
        return float(np.std(gaps) / np.mean(gaps))
    return unevenness(np.diff(np.log(xs))) < unevenness(np.diff(xs))


LEGEND_COMBOS = 6  # beyond this many combinations of the other keys a legend is unreadable (and slow to draw)


def _line_label(role: str, others: list[str], combo: tuple, index: int, combos: int) -> str:
    """A line's legend entry: the role and the other keys' values, or with many combinations the role once."""
    if combos > LEGEND_COMBOS:
        return role if index == 0 else "_nolegend_"
    return role + ("" if not others else " " + ", ".join(f"{k}={show_value(v)}" for k, v in zip(others, combo)))


LONG_LABEL = 40  # characters: a legend of longer entries inside the axes hides the curves and the y axis


def place_legend(ax, fontsize: int) -> None:
    """The legend inside the axes, or below them where its entries are long (several keys' values; beside
    them it would cover the next panel): saved with bbox_inches="tight", the figure grows to hold it."""
    labels = [label for label in ax.get_legend_handles_labels()[1] if not label.startswith("_")]
    if labels and max(map(len, labels)) > LONG_LABEL:
        ax.legend(fontsize=fontsize, loc="upper center", bbox_to_anchor=(0.5, -0.25), borderaxespad=0)
    else:
        ax.legend(fontsize=fontsize)


def plot_vs_key(table: list[dict], keys: list[str], key: str, path: Path) -> Path:
    """Final probe accuracy (mean, error bars = std over seeds) vs one numeric swept key; one line per
    role and per combination of the other group keys."""
    plt = pyplot()
    kinds = [k for k in KINDS if any(f"{r}.{k}_mean" in table[0] for r in ROLES)]
    others = [k for k in keys if k != key]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    xs_all = [e[key] for e in table if e[key] is not None]
    full = max(e["n"] for e in table)  # a point over fewer seeds is marked with its count
    for ax, kind in zip(axes[0], kinds):
        combos: dict[tuple, list[dict]] = {}
        for e in table:
            combos.setdefault(tuple(e[k] for k in others), []).append(e)
        for ci, (combo, entries) in enumerate(sorted(combos.items(), key=lambda kv: _sort_key(kv[0]))):
            entries = sorted((e for e in entries if e[key] is not None), key=lambda e: e[key])
            for role in ROLES:
                m = f"{role}.{kind}"
                pts = [(e[key], e[f"{m}_mean"], e[f"{m}_std"], e.get(f"{m}_n", e["n"])) for e in entries
                       if f"{m}_mean" in e and not math.isnan(e[f"{m}_mean"])]
                if not pts:
                    continue
                x, y, s, n = zip(*pts)
                label = _line_label(role, others, combo, ci, len(combos))
                ax.errorbar(x, [100 * v for v in y], yerr=[0 if math.isnan(v) else 100 * v for v in s],
                            fmt=STYLES[ci % len(STYLES)], marker="o", ms=3, capsize=3, color=COLORS[role], label=label)
                mark_fewer(ax, x, [100 * v for v in y], n, full, COLORS[role])
        if _log_axis(xs_all):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"final {KIND_LABEL[kind]} probe accuracy (%)")
        ax.grid(alpha=0.3)
        place_legend(ax, 7)
    many = len({tuple(e[k] for k in others) for e in table}) > LEGEND_COMBOS
    fig.suptitle(f"final probes vs {key}\n(mean ± std over seeds; n=k: a point over fewer of them)"
                 + (f"; one line per role and each of the other keys' {', '.join(others)} values" if many else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_bars(table: list[dict], keys: list[str], path: Path, references: list[dict | None] | None = None) -> Path:
    """Final probe accuracy per group as bars (mean, error bars = std over seeds), one bar per role, one panel
    per probe kind; `references[i]` (the paper's numbers for table[i], in percent) as black ticks. For groups
    with no numeric key to put on an x axis (data sets, encoders)."""
    plt = pyplot()
    kinds = [k for k in KINDS if any(f"{r}.{k}_mean" in e for e in table for r in ROLES)]
    roles = [r for r in ROLES if any(f"{r}.{k}_mean" in e for e in table for k in kinds)]
    width = 0.8 / len(roles)
    fig, axes = plt.subplots(len(kinds), 1, figsize=(max(5.5, 0.9 * len(table) + 2), 3.6 * len(kinds)),
                             squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        marked = False
        for ri, role in enumerate(roles):
            m = f"{role}.{kind}"
            x = [i + (ri - (len(roles) - 1) / 2) * width for i in range(len(table))]
            y = [100 * e.get(f"{m}_mean", math.nan) for e in table]
            err = [0 if math.isnan(e.get(f"{m}_std", math.nan)) else 100 * e[f"{m}_std"] for e in table]
            ax.bar(x, y, width, yerr=err, capsize=2, color=COLORS[role], label=role)
            ref = [(xi, r[m]) for xi, r in zip(x, references or []) if r and r.get(m) is not None]
            if ref:
                ax.plot(*zip(*ref), "k_", ms=12, mew=2, label="_nolegend_" if marked else "paper")
                marked = True
        ax.set_xticks(range(len(table)),
                      ["\n".join(show_value(e[k]) for k in keys) for e in table], fontsize=7)
        ax.set_ylabel(f"final {KIND_LABEL[kind]} probe accuracy (%)")
        ax.grid(alpha=0.3, axis="y")
        place_legend(ax, 7)
    fig.suptitle("final probes per group (mean ± std over seeds" + ("; black: the paper's" if references
                                                                    and any(references) else "") + ")\n"
                 + " / ".join(keys))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def probe_curves(members: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Probe accuracy vs epoch, averaged over the completed runs of a group (each epoch over the runs
    that probed it): {"student.linear": [(epoch, mean), ...], ...}."""
    sums: dict[str, dict[float, list[float]]] = {}
    for r in members:
        if r["status"] != "completed":
            continue
        for rec in RunDir(r["run_dir"]).probes():
            for role in ROLES:
                for kind, v in rec.get(role, {}).items():
                    if _is_number(v):
                        sums.setdefault(f"{role}.{kind}", {}).setdefault(round(float(rec["epoch"]), 6), []).append(v)
    return {m: [(e, float(np.mean(v))) for e, v in sorted(by_epoch.items())] for m, by_epoch in sums.items()}


def plot_vs_epoch(rows: list[dict], keys: list[str], path: Path) -> Path | None:
    """Probe accuracy vs epoch, mean over seeds, one colour per group: student solid, teacher dashed,
    input dotted."""
    groups = _buckets(rows, keys)
    curves = {kv: probe_curves(members) for kv, members in groups.items()}
    kinds = [k for k in KINDS if any(f"{r}.{k}" in c for c in curves.values() for r in ROLES)]
    if not kinds:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, kind in zip(axes[0], kinds):
        named: set[str] = set()  # roles in the legend once: the input always, every role beyond six groups
        for gi, (kv, c) in enumerate(curves.items()):
            for role, style in (("student", "-"), ("teacher", "--"), ("input", ":")):
                pts = c.get(f"{role}.{kind}")
                if pts:
                    x, y = zip(*pts)
                    once = role == "input" or len(curves) > LEGEND_COMBOS
                    label = _line_label(role, keys, kv, gi, len(curves)) if not once else \
                        role if role not in named else "_nolegend_"
                    named.add(role)
                    ax.plot(x, [100 * v for v in y], style, marker="o", ms=2, color=cmap(gi % 10), label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{'k-NN' if kind == 'knn' else 'linear'} probe accuracy (%)")
        ax.grid(alpha=0.3)
        place_legend(ax, 6)
    fig.suptitle("probes during training\n(mean over seeds; student solid, teacher dashed, input dotted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _mixed_groups(rows: list[dict], keys: list[str]) -> list[str]:
    """Warnings for groups whose runs are not seeds of one setting: other config keys differ inside the
    group, or a seed occurs twice (e.g. --group-by a key while another one varies)."""
    lines = []
    for values, members in _buckets(rows, keys).items():
        name = ", ".join(f"{k}={show_value(v)}" for k, v in zip(keys, values)) or "all runs"
        differ = varying_keys(members)
        seeds = [r["config"].get("train.seed") for r in members]
        repeated = sorted({str(x) for x in seeds if seeds.count(x) > 1})
        if differ or repeated:
            why = ([f"{', '.join(differ)} differ{'s' if len(differ) == 1 else ''} inside it"] if differ else []) + \
                  ([f"seed {', '.join(repeated)} occurs more than once"] if repeated else [])
            lines.append(f"- **{name}**: {'; '.join(why)}; its mean ± std is not a spread over seeds")
    return ["**Groups that mix settings** (group by those keys too, with --group-by):", "", *lines, ""] if lines else []


def _report_folder(dirs: list[str | Path], out: str | Path | None) -> Path:
    """`out`, else the folder that holds every DIR (a sweep's folder); never a run folder, whose report.md is
    the run's own (for one run: report-<run> beside it, not the folder holding it, whose report may be its
    sweep's); for several folders named one by one, report/ in the folder holding them (not runs/ itself,
    beside the runs)."""
    if out is not None:
        if _is_run_folder(Path(out)):
            raise UserError(f"--out {out} is a run folder: its report.md is the run's own report; choose another "
                            "--out for the group report")
        return Path(out)
    folders = [Path(d).resolve() if Path(d).is_dir() else Path(d).resolve().parent for d in dirs]
    common = Path(os.path.commonpath(folders))
    if _is_run_folder(common):
        return common.parent / f"report-{common.name}"
    return common / "report" if len(dirs) > 1 and common not in folders else common


def _is_run_folder(path: Path) -> bool:
    run = RunDir(path)
    return run.summary_path.exists() or run.config_path.exists()


def write_group_report(dirs: list[str | Path], out: str | Path | None = None,
                 group_by: list[str] | None = None) -> Path:
    """Collect, group and write report.csv (one row per group), runs.csv (one row per run), report.md and
    the PNGs into `out` (default: the folder that holds all of `dirs`). Returns report.md's path."""
    rows = seed_paths(collect(dirs))
    if not rows:
        raise UserError(f"no summary.json under {', '.join(map(str, dirs))}; are these run or sweep folders?")
    keys = varying_keys(rows) if group_by is None else list(group_by)
    table = group(rows, keys)
    metrics = metric_names(rows)
    out = _report_folder(dirs, out)
    out.mkdir(parents=True, exist_ok=True)
    write_group_csv(table, keys, out / "report.csv")
    write_runs_csv(rows, keys, out / "runs.csv")
    plots = [plot_vs_key(table, keys, k, out / f"probe_vs_{file_safe(k)}.png") for k in numeric_keys(table, keys)
             if any(m.split(".")[0] in ROLES for m in metrics)]
    curve = plot_vs_epoch(rows, keys, out / "probe_vs_epoch.png")
    plots += [curve] if curve else []

    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    notes = []
    protocols = sorted({str(r["config"]["probe.linear"]) for r in rows if "probe.linear" in r["config"]})
    if protocols:
        notes.append(f"linear probe: {', '.join(protocols)}")
    knn = sorted({f"k={r['config']['probe.knn_k']}, {r['config'].get('probe.knn_weighting')}" for r in rows
                  if "probe.knn_k" in r["config"]})
    if knn:
        notes.append(f"k-NN: {'; '.join(knn)}")
    parts = ["# Report", "",
             f"{counted(len(rows), 'run')} under {', '.join(f'`{d}`' for d in dirs)}: "
             + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".", "",
             f"Grouped by {', '.join(f'`{k}`' for k in keys) if keys else 'nothing (all runs in one group)'}. "
             "Each cell is mean ± std over the completed runs of the group (different seeds); std is the "
             "sample standard deviation (n − 1 in the denominator), shown only for n ≥ 2; n is the number of "
             "completed runs. Probe accuracies are test accuracies in %"
             + (f" ({'; '.join(notes)})" if notes else "")
             + ". Diverged, failed and unfinished runs are counted in the last column, not averaged.", "",
             markdown_table(table, keys, metrics), ""]
    parts += _mixed_groups(rows, keys)
    parts += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    other = [r for r in rows if r["status"] != "completed"]
    if other:
        parts += ["## Runs that did not complete", "", "| run | status | detail |", "|---|---|---|"]
        for r in other:
            s = r["summary"]
            detail = s.get("error") or _not_completed(s)
            parts.append(f"| `{r['run_dir']}` | {r['status']} | {str(detail).replace('|', '/')} |")
        parts.append("")
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def _not_completed(summary: dict) -> str:
    """Where a run that did not complete stopped: a diverged run's first non-finite step beside the steps its
    summary counts (the loop keeps the last checkpoint before that step), else its step count."""
    if "diverged_step" in summary:
        return (f"non-finite at step {summary['diverged_step']}: {summary.get('reason', '')} "
                f"({summary.get('steps', '?')} steps counted; the last checkpoint before it is kept)")
    return f"{summary.get('steps', '?')} steps"
