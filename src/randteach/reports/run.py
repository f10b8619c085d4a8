"""Reports: the tables and figures of one run (the probe table, probe accuracy vs epoch, report.md),
and the names and helpers that the reports over many runs (`randteach.reports.groups`) and over an
experiment (`randteach.reports.experiment`) share with it."""
from __future__ import annotations

from pathlib import Path

from ..probes.embedding import accuracies
from ..runs.rundir import RunDir

ROLES = ("teacher", "student", "input")  # the networks a run probes: the teacher, the student, the raw inputs
KINDS = ("linear", "knn", "paper_linear", "paper_knn")  # paper_*: the papers' probe protocols (experiments/protocol.py)
KIND_LABEL = {"linear": "linear", "knn": "k-NN", "paper_linear": "linear, authors' protocol (AdamW 10 epochs)",
              "paper_knn": "k-NN, authors' protocol (L2 majority vote)"}
COLORS = {"teacher": "tab:blue", "student": "tab:red", "input": "tab:gray"}


def pyplot():
    """matplotlib.pyplot drawing to files only (no display is needed or used)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def file_safe(text: str) -> str:
    """`text` with every character but letters, digits and ._- replaced by _, for file names."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def _pct(x) -> str:
    return f"{100 * x:.2f}" if isinstance(x, (int, float)) else "–"


def _in_order(kinds: set[str]) -> list[str]:
    """Probe kinds in KINDS' order (linear first, as the log lines), any other after them."""
    return [k for k in KINDS if k in kinds] + sorted(kinds - set(KINDS))


def probe_table(summary: dict) -> str:
    """Markdown table: one row per role, one column per probe, accuracy in %."""
    probes = summary.get("probe", {})
    kinds = _in_order({k for r in probes.values() for k in accuracies(r)})
    if not kinds:
        if summary.get("status") not in (None, "completed"):
            return f"(no probe finished before the run stopped: {summary['status']})"
        return "(nothing probed: probe.which is empty, or every probe is off)"
    lines = ["| model | " + " | ".join(f"{k} probe (%)" for k in kinds) + " |",
             "|---|" + "---|" * len(kinds)]
    for role in ROLES:
        if role in probes:
            lines.append(f"| {role} | " + " | ".join(_pct(probes[role].get(k)) for k in kinds) + " |")
    return "\n".join(lines)


def history_table(run: RunDir) -> str:
    rows = run.probes()
    if not rows:
        return "(no probe records)"
    kinds = _in_order({k for r in rows for role in ROLES for k in accuracies(r.get(role, {}))})
    cols = [(role, k) for role in ROLES for k in kinds if any(role in r for r in rows)]
    lines = ["| epoch | " + " | ".join(f"{role} {k}" for role, k in cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['epoch']:.4g} | " + " | ".join(_pct(r.get(role, {}).get(k)) for role, k in cols) + " |")
    return "\n".join(lines)


def plot_probes(run: RunDir, path: Path | None = None) -> Path:
    """Probe accuracy vs epoch for teacher, student and input (linear solid, k-NN dashed)."""
    plt = pyplot()
    rows = run.probes()
    path = path or run.path / "probes.png"
    fig, ax = plt.subplots(figsize=(6, 4))
    for role in ROLES:
        for kind, style in (("linear", "-"), ("knn", "--")):
            pts = [(r["epoch"], r[role][kind]) for r in rows if kind in r.get(role, {})]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, [100 * y for y in ys], style, marker="o", ms=3, color=COLORS[role],
                        label=f"{role} ({'k-NN' if kind == 'knn' else 'linear'})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("probe accuracy (%)")
    ax.set_title(run.path.name)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def recorded_command(run_dir: str | Path) -> str | None:
    """The command that report.md names (the one that started the run), if there is a report."""
    report = Path(run_dir) / "report.md"
    if report.is_file():
        for line in report.read_text().splitlines():
            if line.startswith("Command: `") and line.endswith("`"):
                return line[len("Command: `"):-1]
    return None


def _probe_heading(summary: dict) -> str:
    """A run that did not complete shows its last probe, which need not be where it stopped."""
    if summary.get("status") == "completed" or summary.get("probe_epoch") is None:
        return "## Final probes (test accuracy)"
    return f"## Last probes, of epoch {summary['probe_epoch']:g} (test accuracy; the run did not complete)"


def write_run_report(run_dir: str | Path, title: str | None = None, command: str | None = None) -> Path:
    """RUN_DIR/report.md with the final probe table, the history and the plot."""
    run = RunDir(run_dir)
    summary = run.summary() or {}
    png = plot_probes(run) if run.probes() else None
    cfg = run.config_path.read_text() if run.config_path.exists() else ""
    parts = [f"# {title or run.path.name}", ""]
    if command:
        parts += [f"Command: `{command}`", ""]
    parts += [f"Status: **{summary.get('status', 'unknown')}** after {summary.get('steps', '?')} steps "
              f"({summary.get('epochs', 0):.2f} epochs), wall time {summary.get('wall_time_s', 0):.0f} s "
              f"on {summary.get('device', '?')} ({summary.get('precision', '?')}, torch {summary.get('torch', '?')}).",
              "", _probe_heading(summary), "", probe_table(summary), "",
              *[f"Warning: {w}" for w in summary.get("warnings", [])], "",
              "## Probes during training", "", history_table(run), "",
              *([f"![probe accuracy vs epoch]({png.name})", ""] if png else []),
              "## Config", "", "```yaml", cfg.rstrip(), "```", ""]
    out = run.path / "report.md"
    out.write_text("\n".join(parts))
    return out
