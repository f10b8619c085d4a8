"""E8 (App. D.1, Fig. 18): restarting. The distilled student of round 1 becomes the frozen teacher of a second
round (`init.teacher_checkpoint` = the round-1 run directory), whose student starts at it again by the
init rules of the `round2` arm's variants (e.g. locality alpha ~ 1e-10, or an exact copy)."""
from __future__ import annotations

from pathlib import Path

from ..config import Config, flatten
from ..reports.experiment import arm_section, epoch_curves, optimization_extras, plot_curve, rows_of
from .base import Context, Experiment
from .recipe import Arm

ROUND1, ROUND2 = "round1", "round2"


def second_round(ctx: Context, first: list[Config]) -> list[Config]:
    """One round-2 run per round-1 run and round-2 variant, with the round-1 run's seed and its values of
    the round-1 grid (e.g. the encoder)."""
    arm1, arm2 = ctx.recipe.arm(ROUND1), ctx.recipe.arm(ROUND2)
    out = []
    for cfg in first:
        flat = flatten(cfg.to_dict())
        inherited = {k: flat[k] for k in arm1.keys()}
        one = Arm(ROUND2, {**inherited, **arm2.base}, arm2.grid, arm2.variants, seeds=[cfg.train.seed])
        out += ctx.recipe.configs(one, ctx.pool, ctx.overrides, {"init.teacher_checkpoint": str(cfg.run_dir())})
    return out


def second_round_rows(ctx: Context, first: list[Config], second: list[Config]) -> tuple[list[dict], list[str]]:
    """Round 2's report rows and the keys of its table. A round-1 grid key that round 2 sets itself (e.g. fewer
    epochs in round 2 after a sweep of round-1 epochs) is also shown as the teacher's value, "round1 <key>",
    so that round-2 runs of teachers from different round-1 settings are not pooled."""
    arm1, arm2 = ctx.recipe.arm(ROUND1), ctx.recipe.arm(ROUND2)
    overridden = [k for k in arm1.keys() if k in arm2.base or k in arm2.keys()]
    teachers = {str(c.run_dir()): flatten(c.to_dict()) for c in first}
    rows = rows_of(second)
    for row, cfg in zip(rows, second):
        teacher = teachers.get(str(cfg.init.teacher_checkpoint), {})
        row["config"].update({f"{ROUND1} {k}": teacher.get(k) for k in overridden})
    return rows, [f"{ROUND1} {k}" for k in overridden] + [k for k in arm1.keys() if k not in overridden] + arm2.keys()


ROWS = (("kl", "loss (KL to the teacher)"), ("dist_init", "distance from init"), ("linear", "linear probe (%)"))


def plot_rounds(first: list[Config], second: list[Config], path: Path) -> Path:
    """RT Fig. 18: the loss (the KL for kl and ce runs), the distance from init and the student's linear probe
    vs epoch, round 1 on the left, round 2 on the right (its own epochs; colour by round-2 init mode); one
    line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(ROWS), 2, figsize=(10, 8), sharex="col", squeeze=False)
    colors: dict[str, str] = {}
    for col, runs in enumerate((first, second)):
        labelled = set()
        for cfg in runs:
            label = "round 1" if col == 0 else f"round 2, init {cfg.init.mode}"
            color = "tab:red" if col == 0 else colors.setdefault(
                cfg.init.mode, ["tab:green", "tab:purple", "tab:orange"][len(colors) % 3])
            curves = epoch_curves(cfg.run_dir())
            for (row, _), ax in zip(ROWS, axes[:, col]):
                plot_curve(ax, curves[row], color=color, alpha=0.8, label=None if label in labelled else label)
            labelled.add(label)
        axes[-1, col].set_xlabel(f"epoch of round {col + 1}")
    for (row, title), ax_row in zip(ROWS, axes):
        ax_row[0].set_ylabel(title)
        for ax in ax_row:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    axes[0, 1].legend(fontsize=7)
    fig.suptitle("restarting: the round-1 student is the teacher of round 2 (RT Fig. 18)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class Restart(Experiment):
    name = "restart"
    ids = "E8"
    paper = "App. D.1, Fig. 18"
    claim = ("using the distilled student as the teacher of a second round does not help: around the restarted "
             "student the dynamics are stable and the optimization hardly begins (no further gain).")

    def stages(self, ctx: Context):
        first = ctx.configs(ROUND1)
        return [{ROUND1: first}, {ROUND2: second_round(ctx, first)}]

    def analyze(self, ctx: Context, arms) -> list[str]:
        first, second = arms.get(ROUND1, []), arms.get(ROUND2, [])
        lines, _ = arm_section("round 1: distill into a random teacher", rows_of(first), ctx.recipe.arm(ROUND1).keys(),
                               ctx.out, ROUND1, extras=optimization_extras)
        rows, keys = second_round_rows(ctx, first, second)
        lines += arm_section("round 2: the round-1 student is the teacher (its 'teacher' probe = round 1's final "
                             "student)", rows, keys, ctx.out, ROUND2, extras=optimization_extras)[0]
        if arms.get(ROUND2):
            png = plot_rounds(arms[ROUND1], arms[ROUND2], ctx.out / "rounds.png")
            lines += [f"![rounds]({png.name})", ""]
        return lines


EXPERIMENT = Restart()
