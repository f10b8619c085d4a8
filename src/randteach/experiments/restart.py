"""E8 (App. D.1, Fig. 18): restarting. The distilled student of round 1 becomes the frozen teacher of a second
round (`init.teacher_checkpoint` = the round-1 run directory), whose student starts at it again by the
init rules of the `round2` arm's variants (e.g. locality alpha ~ 1e-10, or an exact copy)."""
from __future__ import annotations

from pathlib import Path

from ..config import Config, flatten
from ..reports.experiment import arm_section, optimization_extras, rows_of
from ..runs.rundir import RunDir
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


def plot_rounds(first: list[Config], second: list[Config], path: Path) -> Path:
    """Student (and teacher) linear probe vs epoch: round 1, then round 2 from where round 1 ended; one
    line per run, colour by round-2 init mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(cfg: Config, role: str):
        pts = [(r["epoch"], r[role]["linear"]) for r in RunDir(cfg.run_dir()).probes() if "linear" in r.get(role, {})]
        return list(zip(*pts)) if pts else ([], [])

    fig, ax = plt.subplots(figsize=(7, 4))
    ends = {}
    for cfg in first:
        x, y = curve(cfg, "student")
        if x:
            ends[str(cfg.run_dir())] = x[-1]
            ax.plot(x, [100 * v for v in y], "-", color="tab:red", alpha=0.7,
                    label="round 1 student" if len(ends) == 1 else None)
            tx, ty = curve(cfg, "teacher")
            ax.plot(tx, [100 * v for v in ty], "--", color="tab:blue", alpha=0.5,
                    label="round 1 teacher" if len(ends) == 1 else None)
    colors, labelled = {}, set()
    for cfg in second:
        start = ends.get(str(cfg.init.teacher_checkpoint))
        x, y = curve(cfg, "student")
        if start is None or not x:
            continue
        mode = cfg.init.mode
        colors.setdefault(mode, ["tab:green", "tab:purple", "tab:orange"][len(colors) % 3])
        ax.plot([start + e for e in x], [100 * v for v in y], "-", color=colors[mode], alpha=0.8,
                label=f"round 2 student (init {mode})" if mode not in labelled else None)
        labelled.add(mode)
    if ends:
        ax.axvline(max(ends.values()), color="gray", lw=0.8, ls=":")
    ax.set_xlabel("epoch (round 2 continues where round 1 ended)")
    ax.set_ylabel("linear probe accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
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
        lines = []
        for arm in (ROUND1, ROUND2):
            keys = ctx.recipe.arm(ROUND1).keys() + (ctx.recipe.arm(ROUND2).keys() if arm == ROUND2 else [])
            title = ("round 1: distill into a random teacher" if arm == ROUND1 else
                     "round 2: the round-1 student is the teacher (its 'teacher' probe = round 1's final student)")
            section, _ = arm_section(title, rows_of(arms.get(arm, [])), keys, ctx.out, arm,
                                     extras=optimization_extras)
            lines += section
        if arms.get(ROUND2):
            png = plot_rounds(arms[ROUND1], arms[ROUND2], ctx.out / "rounds.png")
            lines += [f"![rounds]({png.name})", ""]
        return lines


EXPERIMENT = Restart()
