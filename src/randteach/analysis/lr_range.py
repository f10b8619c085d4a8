"""LR range test (Smith 2017; escaping paper, Fig. 1a): teacher-student vs supervised loss
while the step size grows exponentially.

Both sides use the same encoder architecture, the same initial encoder weights (the teacher's), the
same data order and the same schedule, `lr_k = lr_start * (lr_end / lr_start) ** (k / (T - 1))`
for the T optimizer steps k = 0 .. T-1 (`randteach.optim.lr_at`, schedule=exponential):
- teacher-student: `randteach.train.loop.distill` with optim.schedule=exponential (the one loop);
- supervised: the encoder plus a linear classifier head (He init, `head.kind=linear`) trained with
  cross-entropy on the labels, by the small loop below (the distillation loop has no labels).

Divergence is a result, not a crash: a non-finite loss or gradient ends a side and is recorded as
`nonfinite` (step, lr). Before that, `rise` marks where the loss leaves its floor: the first step at
which the smoothed loss exceeds `factor` (4, the usual range-test threshold) times its running minimum
(a minimum below 1e-8 counts as 1e-8, so that the flickering ~1e-16 fp32 residue loss of a student
sitting on its teacher is no rise). Smoothing: bias-corrected exponential moving average of the
per-step loss, `m_k = beta m_{k-1} + (1 - beta) loss_k`, `smoothed_k = m_k / (1 - beta^k)`, beta 0.9.
For the teacher-student loss `rise` is the escape from the teacher and `nonfinite` the blow-up: the
paper's two divergences (the second at eta ~ 500 on CIFAR10/VGG11).

Suggested step size (`suggest_lr`, printed and marked with a star): where the smoothed loss falls
fastest against log(lr), searched before the first divergence (Smith 2017 places the step size where
the loss decreases most steeply; fastai's "steep" suggestion is this rule). A curve that never falls
by 1 % of its starting value, or starts at the floor (a student starting on its teacher sits there, at
the float64 residue, until it escapes: its dips there are rounding) has no steepest descent: it gets a
tenth of the step size at its blow-up (the first non-finite loss, else the rise), the range test's "an order
of magnitude below divergence" rule. Not the rise where both occur: for the teacher-student loss the rise is
the escape from the teacher, which training needs (the escaping paper trains at step sizes far past it).
Which rule gave the value is recorded with it.

Measured (2026-11-30, 2 shared CPU cores, `randteach experiment lr-range --scale cpu`: conv net, 10,240
Fashion-MNIST images, 200 steps, SGD, plain MSE (mean over the 512 outputs), batch 256, 3 seeds; docs/RESULTS.md
E12): the teacher-student loss sits at ~1e-22 (the float64 residue), falls 2-3x up to lr ~3, rises at
lr 8.6-13 and becomes non-finite at lr 23-46, in two of the three seeds after a plateau at loss ~0.02-0.1;
the supervised loss rises at lr 1.4-8.6 and becomes non-finite at lr 2.5-13.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config, canonical_key
from ..data import ImageData, load_distilled
from ..errors import Terminated, UserError
from ..models import build_model
from ..optim import build_optimizer, lr_at
from ..precision import exact_fp32, uses_bf16
from ..runs.rundir import RunDir, write_json
from ..train.loop import distill
from ..train.setup import load_training_inputs, resolve_device, seeds
from ..train.state import steps_per_epoch
from ..train.supervised import batch_indices, supervised_step

RISE_FACTOR = 4.0      # smoothed loss > 4 x its running minimum: the range test's usual divergence criterion
RISE_FLOOR = 1e-8      # running minima below this count as this: fp32 residue of a student sitting on its teacher
SMOOTHING = 0.9        # EMA beta of the loss: a window of ~10 steps
FALL = 0.01            # a curve "falls" if its smoothed loss drops 1 % below its start before divergence

# The keys `range_config` sets on the run it derives, each with what sets it: a value given for one would be
# overruled without a word, so callers that take config keys (the command, the experiment) refuse them.
RANGE_KEYS = {"optim.lr": "--lr-start", "optim.lr_end": "--lr-end", "train.epochs": "--steps or --epochs",
              "train.max_steps": "--steps or --epochs", "optim.schedule": "the test (exponential)",
              "optim.warmup_steps": "the test (0)", "train.probe_every": "the test (no probes)",
              "train.probe_at": "the test (no probes)", "probe.which": "the test (no probes)",
              "train.checkpoint_every": "the test (no checkpoints)", "train.checkpoint_at": "the test (no checkpoints)",
              "train.log_every": "the test (every step)"}


def refuse_range_keys(keys, command: str) -> None:
    """A UserError naming the first of `keys` (config keys a user gave) that the range test sets itself."""
    overruled = sorted(k for k in map(canonical_key, keys) if k in RANGE_KEYS)
    if overruled:
        key = overruled[0]
        raise UserError(f"--{key}: {command} sets it on its run, from {RANGE_KEYS[key]}; drop --{key}")


def range_config(cfg: Config, lr_start: float, lr_end: float, total_steps: int, steps_per_epoch: int,
                 out: Path) -> Config:
    """`cfg` turned into one exponential sweep of exactly `total_steps` steps, no probes, no checkpoints."""
    if not (lr_start > 0 and lr_end > 0):
        raise UserError(f"the range test needs positive step sizes, got start {lr_start:g} and end {lr_end:g}")
    c = copy.deepcopy(cfg)
    c.optim.schedule = "exponential"
    c.optim.lr = float(lr_start)
    c.optim.lr_end = float(lr_end)
    c.optim.warmup_steps = 0
    c.train.epochs = total_steps / steps_per_epoch
    c.train.max_steps = total_steps            # guards against the float epochs rounding up one step
    c.train.probe_every = 0
    c.train.probe_at = []
    c.train.checkpoint_every = 0
    c.train.checkpoint_at = []
    c.train.log_every = 1                      # every step's loss is part of the curve
    c.probe.which = []
    c.out = str(out)
    return c.validate()


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Bias-corrected EMA of the losses; stops (shorter list) at the first non-finite loss."""
    out, m = [], 0.0
    for k, x in enumerate(losses, start=1):
        if not math.isfinite(x):
            break
        m = beta * m + (1 - beta) * x
        out.append(m / (1 - beta ** k))
    return out


def find_divergences(steps: list[int], lrs: list[float], losses: list[float], *, beta: float = SMOOTHING,
                     factor: float = RISE_FACTOR, floor: float = RISE_FLOOR) -> dict:
    """{'rise': {step, lr, smoothed_loss} | None, 'nonfinite': {step, lr} | None} of one loss curve.

    rise: the first step whose smoothed loss exceeds factor * max(running minimum, floor)."""
    sm = smooth(losses, beta)
    rise = None
    best = math.inf
    for i, s in enumerate(sm):
        if s > factor * max(best, floor):
            rise = {"step": steps[i], "lr": lrs[i], "smoothed_loss": s}
            break
        best = min(best, s)
    nonfinite = None
    if len(sm) < len(losses):
        i = len(sm)
        nonfinite = {"step": steps[i], "lr": lrs[i]}
    return {"rise": rise, "nonfinite": nonfinite}


def suggest_lr(lrs: list[float], losses: list[float], divergences: dict, *, beta: float = SMOOTHING,
               floor: float = RISE_FLOOR) -> dict | None:
    """{'lr', 'rule'}: the step size of steepest descent of the smoothed loss in log(lr) before the first
    divergence, else a tenth of the step size at the blow-up: the first non-finite loss, or without one the
    rise (see the module docstring)."""
    sm = smooth(losses, beta)
    ends = [d["step"] for d in (divergences["rise"], divergences["nonfinite"]) if d]
    stop = min([len(sm)] + [step - 1 for step in ends])  # index of the first diverged step (steps are 1-based)
    best, at = 0.0, None
    # A curve that starts at the floor (a student on its teacher: the float64 residue, ~1e-22) has nothing to
    # descend: its falls there are rounding, and so is a flat curve's.
    falls = stop > 2 and sm[0] > floor and min(sm[:stop]) < (1 - FALL) * sm[0]
    for i in range(1, stop - 1 if falls else 0):  # central difference: slope of the smoothed loss per unit log(lr)
        slope = (sm[i + 1] - sm[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
        if slope < best:
            best, at = slope, i
    if at is not None:
        return {"lr": lrs[at], "rule": "steepest descent of the smoothed loss in log(lr), before divergence"}
    first = divergences["nonfinite"] or divergences["rise"]
    if first is None:
        return None  # neither falls nor diverges: the range was too narrow to say
    where = "turns non-finite" if divergences["nonfinite"] else "rises (it never turns non-finite)"
    return {"lr": first["lr"] / 10, "rule": f"the loss never falls: 1/10 of the step size at which it {where}"}


@exact_fp32()  # fp32 that is fp32 on a GPU (no TF32), as in the training loop
def supervised_range(cfg: Config, inputs: torch.Tensor, preprocess, data: ImageData, image_size: int,
                     total_steps: int, *, progress: bool = True) -> dict:
    """Cross-entropy training of encoder + linear classifier along the config's (exponential) schedule.

    Same encoder init as the teacher, same batches as the distillation loop. Returns the per-step
    curve {'step', 'lr', 'loss'} (1-based steps, loss at the parameters before that step's update),
    ending at the first non-finite loss or gradient."""
    device = resolve_device(cfg.train.device)
    sup = copy.deepcopy(cfg)
    sup.head.kind = "linear"
    sup.head.out_dim = data.num_classes
    model = build_model(sup, data.images.shape[1], image_size, seed=seeds(cfg)["teacher"]).to(device).train()
    optimizer = build_optimizer(cfg.optim, model.parameters())
    labels = data.labels
    n = len(inputs)
    batch = min(cfg.train.batch_size or n, n)
    micro = cfg.train.micro_batch or batch
    data_seed = seeds(cfg)["data"]
    bf16 = uses_bf16(cfg.train.precision, device)
    curve = {"step": [], "lr": [], "loss": []}
    for step in tqdm(range(total_steps), disable=not progress, desc="supervised range", unit="step"):
        lr = lr_at(cfg.optim, step, total_steps)

        def load(chunk):
            x = inputs[chunk].to(device)
            return (preprocess(x) if preprocess is not None else x), labels[chunk].to(device)

        loss = supervised_step(model, optimizer, batch_indices(n, batch, data_seed, step), load, lr, device,
                               micro=micro, bf16=bf16)
        grads = [p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None]
        grad_norm = float(torch.stack(grads).sum().sqrt())
        curve["step"].append(step + 1)
        curve["lr"].append(lr)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            curve["loss"].append(float("nan"))
            break
        curve["loss"].append(loss)
        optimizer.step()
    return curve


def _teacher_student_curve(run_path: Path) -> dict:
    curve = {"step": [], "lr": [], "loss": []}
    for r in RunDir(run_path).steps():
        curve["step"].append(int(r["step"]))
        curve["lr"].append(float(r["lr"]))
        curve["loss"].append(float(r["loss"]))  # "nan"/"inf" strings from the log become floats
    return curve


def lr_range(cfg: Config, *, lr_start: float = 1e-6, lr_end: float = 1e6, steps: int | None = None,
             epochs: float | None = None, out: str | Path | None = None, supervised: bool = True,
             smoothing: float = SMOOTHING, factor: float = RISE_FACTOR, floor: float = RISE_FLOOR,
             progress: bool = True, train_data: ImageData | None = None) -> dict:
    """Run the LR range test of `cfg` (either `steps` optimizer steps or `epochs` epochs) and write
    OUT/lr_range.json and OUT/lr_range.png; the teacher-student run is OUT/teacher-student/.

    Returns the JSON content: the exponential sequence's parameters, per side the curve (step, lr,
    loss, smoothed) and its divergences ('rise', 'nonfinite'), and the teacher-student run's status."""
    if (steps is None) == (epochs is None):
        raise UserError("give the length of the range test as either steps or epochs (not both)")
    if not 0.0 <= smoothing < 1.0:
        raise UserError(f"smoothing is an EMA factor in [0, 1), got {smoothing}")
    if not factor > 1.0:
        raise UserError(f"factor: a rise is the smoothed loss above factor x its running minimum, so factor > 1 "
                        f"(default {RISE_FACTOR:g}), got {factor:g}")
    if not lr_end > lr_start:
        raise UserError(f"the range test raises the step size: give lr_end > lr_start, got {lr_start:g} -> {lr_end:g}")
    full = train_data if train_data is not None else load_distilled(cfg.data)
    inputs, preprocess, data, size = load_training_inputs(cfg, full)
    n = len(inputs)
    per_epoch = steps_per_epoch(n, cfg.train.batch_size)
    total_steps = int(steps) if steps is not None else max(1, math.ceil(float(epochs) * per_epoch))
    if total_steps < 2:
        raise UserError(f"a range test needs at least 2 steps, got {total_steps}")
    out = Path(out) if out else Path("runs") / f"lr-range-{cfg.digest()}-{lr_start:g}-{lr_end:g}-{total_steps}"
    ts_cfg = range_config(cfg, lr_start, lr_end, total_steps, per_epoch, out / "teacher-student")
    key = {"config_digest": ts_cfg.digest(), "supervised": supervised, "smoothing": smoothing, "factor": factor,
           "floor": floor}
    json_path = out / "lr_range.json"
    if json_path.exists():
        previous = json.loads(json_path.read_text())
        if previous.get("key") == key:
            return previous

    if RunDir(ts_cfg.run_dir()).holds_another_config(ts_cfg):  # the run's own message would suggest `distill --resume`
        raise UserError(f"{out} holds a range test of other settings (step sizes, steps or config options); "
                        "give those to continue it, choose another --out, or delete that folder to start over")
    run = distill(ts_cfg, progress=progress, train_data=full)
    if run.summary.get("status") not in ("completed", "diverged"):
        # stopped by a signal: its curve is cut short; nothing written, a re-run continues it
        raise Terminated() if run.summary.get("signal") == "SIGTERM" else KeyboardInterrupt()
    sides = {"teacher_student": _teacher_student_curve(run.path)}
    if supervised:
        sides["supervised"] = supervised_range(ts_cfg, inputs, preprocess, data, size, total_steps,
                                               progress=progress)
    result = {"key": key, "lr_start": lr_start, "lr_end": lr_end, "steps": total_steps,
              "steps_per_epoch": per_epoch, "epochs": total_steps / per_epoch,
              "schedule": "lr_k = lr_start * (lr_end / lr_start) ** (k / (steps - 1)), k = 0 .. steps - 1",
              "smoothing": f"bias-corrected EMA of the per-step loss, beta = {smoothing}",
              "divergence": f"rise: smoothed loss > {factor} x max(running minimum, {floor:g}); "
                            "nonfinite: first NaN/inf loss or gradient",
              "loss": ts_cfg.loss.name, "optimizer": ts_cfg.optim.name, "encoder": ts_cfg.model.encoder,
              "data": ts_cfg.data.name, "n_samples": n, "batch_size": ts_cfg.train.batch_size,
              "teacher_student_run": str(run.path), "teacher_student_status": run.summary.get("status"),
              "sides": {}}
    for name, curve in sides.items():
        curve["smoothed"] = smooth(curve["loss"], smoothing)
        side = {**curve, **find_divergences(curve["step"], curve["lr"], curve["loss"], beta=smoothing,
                                            factor=factor, floor=floor)}
        side["suggested"] = suggest_lr(curve["lr"], curve["loss"], side, beta=smoothing, floor=floor)
        result["sides"][name] = side
    result["png"] = str(plot_lr_range(result, out / "lr_range.png"))
    write_json(json_path, result)
    return result


COLORS = {"teacher_student": "tab:red", "supervised": "tab:blue"}
LABELS = {"teacher_student": "teacher-student", "supervised": "supervised (CE)"}


def plot_lr_range(result: dict, path: Path) -> Path:
    """Loss vs step size (log-log), raw and smoothed, divergences marked (like Fig. 1a)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, side in result["sides"].items():
        color = COLORS.get(name, "k")
        lrs, losses, sm = side["lr"], side["loss"], side["smoothed"]
        finite = [(lr, v) for lr, v in zip(lrs, losses) if math.isfinite(v) and v > 0]
        if finite:
            ax.plot(*zip(*finite), color=color, alpha=0.25, lw=0.8)
        if sm:
            ax.plot(lrs[:len(sm)], sm, color=color, lw=1.8, label=f"{LABELS.get(name, name)} (EMA)")
        if side["rise"]:
            r = side["rise"]
            ax.plot([r["lr"]], [r["smoothed_loss"]], "o", color=color, ms=8, mfc="none", mew=2,
                    label=f"{LABELS.get(name, name)} rise at lr {r['lr']:.3g}")
        if side.get("suggested"):
            ax.axvline(side["suggested"]["lr"], color=color, ls=":", lw=1.2)
            # on the bottom edge whatever the y-limits become (x in data, y in axes coordinates)
            ax.plot([side["suggested"]["lr"]], [0], "*", color=color, ms=12, clip_on=False,
                    transform=ax.get_xaxis_transform(),
                    label=f"{LABELS.get(name, name)} suggested lr {side['suggested']['lr']:.3g}")
        if side["nonfinite"]:
            r = side["nonfinite"]
            ax.axvline(r["lr"], color=color, ls="--", lw=1)
            if sm:
                ax.plot([r["lr"]], [sm[-1]], "x", color=color, ms=10, mew=2.5,
                        label=f"{LABELS.get(name, name)} diverges (NaN/inf) at lr {r['lr']:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step size (learning rate)")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: {result['encoder']} on {result['data']}, {result['optimizer']}, "
                 f"{result['loss']} loss", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
