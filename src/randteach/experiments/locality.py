"""E3 (Fig. 3, App. D, Fig. 17): the locality parameter alpha of the student's init
theta_S(alpha) = ((1 - alpha) theta_T + alpha theta~) / delta: probes vs alpha and vs epoch, the teacher-student
loss and the student's distance from its init vs epoch for each alpha, and their final values vs alpha."""
from __future__ import annotations

import math
from pathlib import Path

from ..config import Config
from ..reports.experiment import arm_section, epoch_curves, optimization_extras, plot_curve, rows_of
from ..reports.groups import flat_config, mark_fewer
from ..reports.run import pyplot
from .base import Context, Experiment

KEY = "init.alpha"


def plot_optimization(table: list[dict], others: list[str], path: Path) -> Path:
    """App. D, Fig. 17: final loss and distance from init vs alpha (mean, error bars = std over seeds)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    full = max(e["n"] for e in table)  # a point over fewer seeds is marked with its count
    for ax, (metric, label) in zip(axes, (("final_loss", "final loss: KL to the teacher, last epoch"),
                                          ("dist_init", "distance from init ‖θ*_S − θ_S‖₂"))):
        combos: dict[tuple, list[dict]] = {}
        for e in table:
            combos.setdefault(tuple(e[k] for k in others), []).append(e)
        for combo, entries in combos.items():
            pts = sorted((e[KEY], e[f"{metric}_mean"], e.get(f"{metric}_std", math.nan), e.get(f"{metric}_n", e["n"]))
                         for e in entries if not math.isnan(e.get(f"{metric}_mean", math.nan)))
            if pts:
                x, y, s, n = zip(*pts)
                line = ax.errorbar(x, y, yerr=[0 if math.isnan(v) else v for v in s], marker="o", ms=3, capsize=3,
                                   label=", ".join(f"{k}={v}" for k, v in zip(others, combo)) or None)
                mark_fewer(ax, x, y, n, full, line[0].get_color())
        ax.set_xlabel("α")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if others:
            ax.legend(fontsize=7)
    fig.suptitle("optimization vs locality α (mean ± std over seeds; n=k: a point over fewer of them)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_epochs(configs: list[Config], others: list[str], path: Path) -> Path:
    """App. D, Fig. 17 left and middle: the KL to the teacher and the distance from init vs epoch, one column
    per value of the other keys (the paper's ResNet18 and VGG11), one colour per α (each seed a line)."""
    plt = pyplot()
    columns: dict[tuple, list[Config]] = {}
    for cfg in configs:
        flat = flat_config(cfg.to_dict())
        columns.setdefault(tuple(flat.get(k) for k in others), []).append(cfg)
    fig, axes = plt.subplots(2, len(columns), figsize=(5 * len(columns), 6.5), sharex="col", squeeze=False)
    alphas = sorted({c.init.alpha for c in configs})
    colour = plt.get_cmap("viridis")
    for col, (combo, runs) in enumerate(columns.items()):
        labelled = set()
        for cfg in sorted(runs, key=lambda c: c.init.alpha):
            curves = epoch_curves(cfg.run_dir())
            shade = colour(alphas.index(cfg.init.alpha) / max(len(alphas) - 1, 1))
            label = None if cfg.init.alpha in labelled else f"α={cfg.init.alpha:g}"
            labelled.add(cfg.init.alpha)
            for ax, row in zip(axes[:, col], ("kl", "dist_init")):
                plot_curve(ax, curves[row], color=shade, lw=1, alpha=0.85, label=label)
        axes[0, col].set_title(", ".join(f"{k}={v}" for k, v in zip(others, combo)) or "all runs", fontsize=9)
        axes[-1, col].set_xlabel("epoch")
    for ax_row, title in zip(axes, ("loss (the KL to the teacher for kl and ce)", "distance from init ‖θ_S − θ_S(0)‖₂")):
        ax_row[0].set_ylabel(title)
        for ax in ax_row:
            ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, ncol=2)
    fig.suptitle("optimization vs epoch for each locality α (RT Fig. 17, left and middle)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class Locality(Experiment):
    name = "locality"
    ids = "E3"
    paper = "Fig. 3, App. D (Fig. 17)"
    claim = ("students behave alike for alpha in [0, 0.6]; larger alpha converges more slowly to worse probes and "
             "a higher final loss, yet even an independent student (alpha = 1) beats its teacher.")
    extras = staticmethod(optimization_extras)

    def analyze(self, ctx: Context, arms) -> list[str]:
        lines = []
        for arm in ctx.recipe.arms:
            keys = arm.keys()
            section, table = arm_section(arm.name, rows_of(arms[arm.name]), keys, ctx.out, arm.name,
                                         references=ctx.recipe.reference, extras=optimization_extras)
            lines += section
            if table and KEY in keys:
                others = [k for k in keys if k != KEY]
                started = [c for c in arms[arm.name] if (c.run_dir() / "metrics.jsonl").exists()]
                pngs = [plot_epochs(started, others, ctx.out / f"{arm.name}-optimization-epochs.png")] if started else []
                pngs.append(plot_optimization(table, others, ctx.out / f"{arm.name}-optimization.png"))
                lines += [f"![{png.stem}]({png.name})" for png in pngs] + [""]
        return lines


EXPERIMENT = Locality()
