"""E4 (Fig. 4): data dependence. Distill on n samples for n over `params.sample_sizes` (a list, or one list
per arm) with the number of optimizer steps held at `params.target_steps` (epochs = target_steps / steps
per epoch), on the images and on Gaussian-noise inputs of the same shape (`data.inputs=noise`); always
probe on clean data."""
from __future__ import annotations

from ..config import Config
from ..reports.experiment import arm_section, rows_of
from ..runs.rundir import RunDir
from ..train.state import steps_per_epoch
from .base import Context, Experiment

KEYS = ["data.inputs", "data.n_samples"]


def step_matched(cfg: Config, n: int, target_steps: int) -> dict:
    """Overrides that distill on n samples for exactly `target_steps` optimizer steps."""
    per_epoch = steps_per_epoch(n, cfg.train.batch_size)
    return {"data.n_samples": int(n), "train.epochs": target_steps / per_epoch, "train.max_steps": int(target_steps)}


def sample_sizes(ctx: Context, arm: str) -> list[int]:
    """params.sample_sizes: one list for every arm, or {arm: list}."""
    sizes = ctx.params["sample_sizes"]
    sizes = sizes.get(arm, []) if isinstance(sizes, dict) else sizes
    return [int(float(n)) for n in sizes]


class DataDependence(Experiment):
    name = "data-dependence"
    ids = "E4"
    paper = "Fig. 4"
    claim = ("the student's probe rises steadily with the number of distillation samples at a comparable step "
             "count, while students distilled on Gaussian noise do not improve over the teacher at any n: the "
             "learned features depend on the data.")

    def stages(self, ctx: Context):
        steps = int(float(ctx.params["target_steps"]))
        stage = {}
        for arm in ctx.recipe.arms:
            template = ctx.configs(arm.name)[0]
            stage[arm.name] = [c for n in sample_sizes(ctx, arm.name)
                               for c in ctx.configs(arm.name, step_matched(template, n, steps))]
        return [stage]

    def analyze(self, ctx: Context, arms) -> list[str]:
        steps = int(float(ctx.params["target_steps"]))
        # a run's final_loss is its last epoch's mean, 2 steps at n = 500 and 438 at n = 32 000 here: the
        # rows compare the mean over the same last steps instead
        rows = [{**r, "metrics": {k: v for k, v in r["metrics"].items() if k != "final_loss"}}
                for arm in ctx.recipe.arms for r in rows_of(arms[arm.name])]
        window = next((w for r in rows if r["status"] == "completed" and (w := _window_loss(r, steps))), None)
        label = f"loss, mean of steps {window[0] + 1}–{steps}" if window else "loss"
        section, _ = arm_section(f"probes vs sample size at {steps} optimizer steps (images vs Gaussian noise)",
                                 rows, KEYS, ctx.out, "data-dependence", references=ctx.recipe.reference,
                                 curves=False, labels={WINDOW_LOSS: label},
                                 extras=lambda row: {WINDOW_LOSS: w[1]} if (w := _window_loss(row, steps)) else {})
        return section


WINDOW_LOSS = "window_loss"


def _window_loss(row: dict, steps: int) -> tuple[int, float] | None:
    """(step before the window, mean loss over the window): the window is the run's records from the last
    one that begins at or before the last tenth of `steps` (each record's loss_mean is the mean of the steps
    since the record before), the same steps in every run of one log_every."""
    first = steps - max(1, steps // 10)
    spans, previous = [], 0
    for rec in RunDir(row["run_dir"]).steps():
        if isinstance(rec.get("loss_mean"), (int, float)):
            spans.append((previous, rec["step"], rec["loss_mean"]))
        previous = rec["step"]
    starts = [a for a, _, _ in spans if a <= first]
    if not starts:
        return None
    window = [(a, b, loss) for a, b, loss in spans if a >= max(starts)]
    covered = sum(b - a for a, b, _ in window)
    return max(starts), sum((b - a) * loss for a, b, loss in window) / covered


EXPERIMENT = DataDependence()
