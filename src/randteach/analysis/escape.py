"""Escape dynamics (escaping paper, Fig. 1b-d and App. A): how a student that starts on its
random teacher leaves it under large step sizes.

`run_escape` runs groups of distillations of one base config (normally the `escape` preset: encoder +
one linear layer, plain SGD, N-MSE, student at theta_T + eps theta_fresh with eps ~ N(0, (1e-10)^2) per
weight), all of the same number of
optimizer steps and probed at the same step cadence:
- step_size  (Fig. 1c): SGD step size eta over `lrs`, batch size of the base config;
- batch_size (Fig. 1b, 1d): batch size over `batch_sizes` (0 = full batch: gradient descent) at eta = `batch_lr`;
- stabilize  (App. A): loss MSE / ND-MSE / N-MSE, each with a constant step and with a linear
  warm-up over `warmup_steps`, at eta = `stabilize_lr`.
Per step the loss and gradient norm come from each run's metrics.jsonl; the probe accuracy of the
student (and the teacher) every `probe_every_steps` steps.

Collapse point: the probed step at which the student's linear-probe accuracy is lowest (metric
"probe"), or at which the effective rank of its embedding is lowest (metric "erank", computed on the
saved checkpoints). The loop saves student_step<N>.pt at the probe cadence; the checkpoint kept as the
collapse point is the saved step nearest that minimum (`exact=False`, the default) or, with
`exact=True`, a re-run of the same config stopped exactly at that step (bitwise on a CPU; on a GPU some kernels
are nondeterministic, and the record says so).
It is written to RUN/checkpoints/collapse.pt and described in RUN/collapse.json, where
`randteach signal RUN` finds it.

Measured with the scalar eps = 1e-10 the preset used then (2026-11-30, 2 shared CPU cores, one thread; the
per-weight draw, 2026-12-03, is in docs/RESULTS.md; `randteach experiment escape --scale cpu`, recipe
escape.cpu.yaml: the `escape` preset with model.encoder=convnet, 4 conv layers + linear 512, SGD, N-MSE as a
mean over the outputs, fp32 after the float64 start; 1,024 Fashion-MNIST images, 1,200 steps, linear logreg
probe on 2,000 / 1,000 images, teacher 70.5 %; docs/RESULTS.md E13, E15):
- step size: eta 1e4 leaves the teacher within 5 steps (float64 phase to step 3, loss spike to ~2e-3 at
  steps 4-5, distance 12-17 from the teacher), probes lowest at step 100 and recovers above the teacher:
  over 3 seeds student - teacher -3.3 +- 1.4 pp at the collapse, +2.2 +- 1.7 pp at step 1,200. eta 100
  drifts ~2 % of the weight norm away without a collapse (70.5 -> 71.6 %).
- batch size: full batch (gradient descent) at eta 1e4 escapes like SGD: 68.1 % at step 100, 74.0 % at 1,200.
- stabilize: plain MSE at eta 1e4 is non-finite at step 5, with a 300-step warm-up at step 9 (eta 300);
  ND-MSE with or without the warm-up kills every unit of the embedding (probe at chance, 10 %).
6.5-7 min per 1,200-step run of batch 256, 15 min for the full-batch run.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, config_from_dict, dotted_to_nested
from ..data import ImageData, load_distilled
from ..errors import UserError
from ..precision import exact_fp32
from ..runs.checkpoint import load_checkpoint, save_checkpoint
from ..runs.rundir import RunDir, write_json
from ..train.loop import distill
from ..train.setup import resolve_device
from ..train.state import steps_per_epoch

DEFAULT_LRS = (32.0, 100.0, 316.0, 1000.0, 3162.0, 1e4, 31623.0, 1e5)   # Fig. 1c
DEFAULT_BATCH_SIZES = (256, 1024, 4096, 16384, 0)                      # Fig. 1d; 0 = full batch
STABILIZE_LOSSES = ("mse", "ndmse", "nmse")                            # App. A
GROUPS = ("step_size", "batch_size", "stabilize")
COLLAPSE_METRICS = ("probe", "erank")


@dataclass
class Variant:
    """One run of the sweep: `overrides` (dotted keys) applied to the base config."""
    group: str
    label: str
    overrides: dict = field(default_factory=dict)


def escape_variants(*, lrs=DEFAULT_LRS, batch_sizes=DEFAULT_BATCH_SIZES, batch_lr: float = 1e4,
                    stabilize: bool = True, stabilize_losses=STABILIZE_LOSSES, stabilize_lr: float = 1e4,
                    warmup_steps: int | list[int] = 1000) -> list[Variant]:
    """The runs of the step-size, batch-size and stabilization sweeps (an empty list skips a group).
    warmup_steps: one linear warm-up length, or several (ESC Fig. 4 compares "different warm-up schedules")."""
    out = [Variant("step_size", f"lr{lr:g}", {"optim.lr": float(lr), "optim.schedule": "constant"}) for lr in lrs]
    for b in batch_sizes:
        out.append(Variant("batch_size", "full-batch" if b == 0 else f"batch{b}",
                           {"train.batch_size": int(b), "optim.lr": float(batch_lr), "optim.schedule": "constant"}))
    if stabilize:
        for loss in stabilize_losses:
            out.append(Variant("stabilize", loss, {"loss.name": loss, "optim.lr": float(stabilize_lr),
                                                   "optim.schedule": "constant"}))
            for warmup in warmup_steps if isinstance(warmup_steps, (list, tuple)) else [warmup_steps]:
                out.append(Variant("stabilize", f"{loss}+warmup{warmup}",
                                   {"loss.name": loss, "optim.lr": float(stabilize_lr), "optim.schedule": "warmup",
                                    "optim.warmup_steps": int(warmup)}))
    return out


def variant_config(cfg: Config, variant: Variant, *, n: int, steps: int, probe_every_steps: int,
                   out: Path, early_probes=(), keep_steps=()) -> Config:
    """The base config with the variant's overrides, `steps` optimizer steps, probes and checkpoints
    every `probe_every_steps` steps and at the steps `early_probes`, and checkpoints at the steps
    `keep_steps` (expressed in epochs of this variant's batch size)."""
    d = cfg.to_dict()
    for section, values in dotted_to_nested(variant.overrides).items():
        d[section].update(values)
    c = config_from_dict(d)
    per_epoch = steps_per_epoch(n, c.train.batch_size)
    c.train.epochs = steps / per_epoch
    c.train.max_steps = steps
    every = probe_every_steps / per_epoch
    c.train.probe_every = every
    c.train.checkpoint_every = every
    c.train.probe_at = [s / per_epoch for s in sorted(early_probes) if s < steps]
    # the collapse checkpoint is kept at a probed step
    c.train.checkpoint_at = sorted(set(c.train.probe_at) | {s / per_epoch for s in keep_steps if s < steps})
    c.train.log_every = 1  # the escape is read off every step's loss and distance
    c.name = f"escape-{variant.group}-{variant.label}"
    c.out = str(out / variant.group / variant.label)
    return c.validate()


def _curves(run: RunDir) -> tuple[dict, list[dict]]:
    steps = {"step": [], "loss": [], "grad_norm": [], "dist_teacher": [], "lr": []}
    probes = []
    for r in run.records():
        if r.get("event") == "probe":
            probes.append({"step": r["step"], "epoch": r["epoch"],
                           **{role: r[role] for role in ("teacher", "student", "input") if role in r}})
        elif r.get("event", "step") == "step" and "loss" in r:
            for k in steps:
                v = r.get(k)
                steps[k].append(float(v) if v is not None else None)
    steps["step"] = [int(s) for s in steps["step"]]
    return steps, probes


def probe_reading(record: dict, role: str = "student") -> tuple[str, float] | None:
    """(kind, accuracy) of a probe record for `role`: linear, else k-NN (the curves' and the collapse's
    measure), or None."""
    result = record.get(role, {})
    return next(((kind, float(result[kind])) for kind in ("linear", "knn") if kind in result), None)


def probe_value(record: dict, role: str = "student") -> float | None:
    reading = probe_reading(record, role)
    return reading[1] if reading else None


def saved_steps(run: RunDir) -> dict[int, Path]:
    """The student checkpoints a run saved: {step: path}, including the final student.pt."""
    found = {}
    for p in run.checkpoints.glob("student_step*.pt"):
        m = re.fullmatch(r"student_step(\d+)\.pt", p.name)
        if m:
            found[int(m.group(1))] = p
    final = run.checkpoints / "student.pt"
    if final.exists():
        found[int(load_checkpoint(final).get("step", 0))] = final
    return dict(sorted(found.items()))


@exact_fp32()  # fp32 that is fp32 on a GPU (no TF32), as in the training loop
def erank_curve(run_path: Path, n_samples: int = 500) -> list[dict]:
    """Effective rank of the student's embedding at init and at every saved checkpoint, on a stratified
    subset of the run's train images (`RunModels.samples`: those it distilled on, where they carry labels):
    [{step, erank}]. Cached in RUN/erank.json."""
    from .signal_layers import RunModels
    from .signal_propagation import effective_rank

    cache = Path(run_path) / "erank.json"
    models = RunModels(run_path)
    source = models.train_images()  # since 2026-12-02; before, the probe data's whole train split
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("n_samples") == n_samples and saved.get("images") == source:
            return saved["points"]
    images, _ = models.samples("train", n_samples)
    points = [(0, models.checkpoint_path("student_init"))] + list(saved_steps(RunDir(run_path)).items())
    out = []
    for step, path in points:
        x = models.embed(models.encoder(path), images)
        out.append({"step": step, "erank": float(effective_rank(x))})
    write_json(cache, {"n_samples": n_samples, "images": source, "points": out})
    return out


def find_collapse(probes: list[dict], erank: list[dict] | None = None, metric: str = "probe") -> dict | None:
    """The step where the student's probe accuracy (or embedding effective rank) is lowest after step 0."""
    if metric == "probe":
        pts = [(p["step"], probe_value(p)) for p in probes]
    elif metric == "erank":
        pts = [(p["step"], p["erank"]) for p in erank or []]
    else:
        raise UserError(f"collapse metric {metric!r} is not one of {', '.join(COLLAPSE_METRICS)}")
    pts = [(s, v) for s, v in pts if v is not None and math.isfinite(v)]
    if not pts:
        return None
    initial = next((v for s, v in pts if s == 0), None)
    later = [(s, v) for s, v in pts if s > 0]
    if not later:
        return None
    step, value = min(later, key=lambda sv: (sv[1], sv[0]))
    final = later[-1][1]
    return {"metric": metric, "step": int(step), "value": value, "initial": initial, "final": final,
            "drop": (initial - value) if initial is not None else None, "recovery": final - value}


def _kept(run_path: Path, collapse: dict, exact: bool) -> dict | None:
    """The collapse record a previous call kept for the same step and metric, if its checkpoint exists."""
    record = Path(run_path) / "collapse.json"
    if not record.exists() or not (Path(run_path) / "checkpoints" / "collapse.pt").exists():
        return None
    kept = json.loads(record.read_text())
    same = (kept.get("step"), kept.get("metric")) == (collapse["step"], collapse["metric"])
    return kept if same and ("re-run" in kept.get("how", "")) == exact else None


def keep_collapse_checkpoint(cfg: Config, run_path: Path, collapse: dict, *, exact: bool = False,
                             train_data: ImageData | None = None) -> dict:
    """Write RUN/checkpoints/collapse.pt (+ RUN/collapse.json) for the collapse step; returns the record."""
    run = RunDir(run_path)
    step = collapse["step"]
    if exact:
        if cfg.optim.schedule in ("cosine", "exponential"):
            raise UserError(f"an exact re-run to step {step} changes the {cfg.optim.schedule} schedule (it depends on "
                            "the run length); use the nearest saved checkpoint instead (exact=False)")
        d = cfg.to_dict()
        d["train"].update({"max_steps": step, "probe_every": 0, "checkpoint_every": 0, "checkpoint_at": []})
        d["probe"]["which"] = []
        d["out"] = str(run.path / "collapse-rerun")
        rerun = distill(config_from_dict(d), progress=False, train_data=train_data)
        source, source_step = rerun.path / "checkpoints" / "student.pt", step
        how = ("deterministic re-run to the step" if resolve_device(cfg.train.device).type == "cpu" else
               "re-run to the step (on a GPU not bitwise the original: some of its kernels are nondeterministic)")
    else:
        saved = saved_steps(run)
        if not saved:
            raise UserError(f"{run.path} saved no student checkpoints; set train.checkpoint_every or use exact=True")
        source_step = min(saved, key=lambda s: (abs(s - step), s))
        source, how = saved[source_step], "nearest saved checkpoint"
    payload = load_checkpoint(source)
    save_checkpoint({"model": payload["model"], "role": "student", "step": source_step},
                    run.checkpoints / "collapse.pt")
    record = {**collapse, "checkpoint": "checkpoints/collapse.pt", "checkpoint_step": source_step,
              "source": str(Path(source).relative_to(run.path)), "how": how}
    write_json(run.path / "collapse.json", record)
    return record


def run_escape(cfg: Config, out: str | Path, *, steps: int, probe_every_steps: int, lrs=DEFAULT_LRS,
               batch_sizes=DEFAULT_BATCH_SIZES, batch_lr: float = 1e4, stabilize: bool = True,
               stabilize_losses=STABILIZE_LOSSES, stabilize_lr: float = 1e4, warmup_steps: int = 1000,
               collapse_metric: str = "probe", exact: bool = False, erank_samples: int = 500,
               prune_checkpoints: bool = False, progress: bool = True, early_probes=(), keep_steps=(),
               train_data: ImageData | None = None, group_steps: dict[str, int] | None = None) -> dict:
    """Run the escape sweeps (escaping paper, Fig. 1b-d and App. A) of base config `cfg` into OUT and return OUT/escape.json's content.

    Every run lasts `steps` optimizer steps (or `group_steps[group]` for the groups it names: the paper's
    step-size sweep runs 20k steps, its batch-size sweep 6k) and is probed/checkpointed every
    `probe_every_steps` steps, and also at the steps `early_probes`: ESC Fig. 1b's loss spike comes within
    the first three steps and the collapsed plateau after it, which a sparse cadence can step over.
    Completed runs are not redone (the loop skips them), nor are their kept collapse checkpoints.
    `prune_checkpoints` deletes the intermediate student_step<N>.pt once the collapse point is kept
    (a VGG11 run probed every 500 of 20k steps saves 40 of them), except those of the steps `keep_steps`,
    which every run saves (ESC Sec. 3 takes theta_S "after 100 epochs": step 19,200 of a 20k-step run of
    192 steps per epoch; `randteach signal --student-step`). Writes OUT/escape.json and one figure
    per group, OUT/escape_<group>.png (loss, gradient norm and probe accuracy vs step)."""
    group_steps = dict(group_steps or {})
    _check_lengths(collapse_metric, steps, probe_every_steps, group_steps, early_probes, keep_steps)
    out = Path(out)
    full = train_data if train_data is not None else load_distilled(cfg.data)
    n = min(cfg.data.n_samples, len(full)) if cfg.data.n_samples else len(full)
    variants = escape_variants(lrs=lrs, batch_sizes=batch_sizes, batch_lr=batch_lr, stabilize=stabilize,
                               stabilize_losses=stabilize_losses, stabilize_lr=stabilize_lr,
                               warmup_steps=warmup_steps)
    if not variants:
        raise UserError("nothing to run: give at least one step size, batch size or the stabilize group")
    results = []
    for v in variants:
        c = variant_config(cfg, v, n=n, steps=int(group_steps.get(v.group, steps)),
                           probe_every_steps=probe_every_steps, out=out, early_probes=early_probes,
                           keep_steps=keep_steps)
        run = distill(c, progress=progress, train_data=full)
        results.append({"group": v.group, "label": v.label, "overrides": v.overrides,
                        **_escape_record(c, run, n, full, collapse_metric, erank_samples, exact)})
        if prune_checkpoints:  # after the collapse checkpoint is kept
            kept = {f"student_step{s}.pt" for s in keep_steps}
            for p in RunDir(run.path).checkpoints.glob("student_step*.pt"):
                if p.name not in kept:
                    p.unlink()
    result = {"base_config_digest": cfg.digest(), "n_samples": n, "steps": steps, "group_steps": group_steps,
              "probe_every_steps": probe_every_steps, "early_probes": sorted(early_probes),
              "keep_steps": sorted(keep_steps),
              "collapse_metric": collapse_metric,
              "collapse_checkpoint": "re-run to the exact step" if exact else "nearest saved checkpoint",
              "encoder": cfg.model.encoder, "data": cfg.data.name, "runs": results, "figures": {}}
    for group in GROUPS:
        members = [r for r in results if r["group"] == group]
        if members:
            path = plot_escape_group(members, out / f"escape_{group}.png", title=_TITLES[group])
            result["figures"][group] = str(path)
    write_json(out / "escape.json", result)
    if exact:  # the re-runs' own folders are only a means to the checkpoint
        for r in results:
            shutil.rmtree(Path(r["run"]) / "collapse-rerun", ignore_errors=True)
    return result


def _check_lengths(collapse_metric: str, steps: int, probe_every_steps: int, group_steps: dict,
                   early_probes, keep_steps) -> None:
    if collapse_metric not in COLLAPSE_METRICS:
        raise UserError(f"collapse_metric {collapse_metric!r} is not one of {', '.join(COLLAPSE_METRICS)}")
    if steps < 1 or probe_every_steps < 1 or any(int(s) < 1 for s in group_steps.values()):
        raise UserError(f"steps, group_steps and probe_every_steps must be positive, got {steps}, {group_steps} "
                        f"and {probe_every_steps}")
    for name, chosen in (("early_probes", early_probes), ("keep_steps", keep_steps)):
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in chosen):
            raise UserError(f"{name} are optimizer steps, whole numbers from 1; got {list(chosen)}")
    if set(group_steps) - set(GROUPS):
        raise UserError(f"group_steps names unknown groups {sorted(set(group_steps) - set(GROUPS))}; "
                        f"valid: {', '.join(GROUPS)}")


def _escape_record(c: Config, run, n: int, full: ImageData, collapse_metric: str, erank_samples: int,
                   exact: bool) -> dict:
    """One finished escape run: its curves and probes, and its collapse point with the checkpoint kept there."""
    curves, probes = _curves(RunDir(run.path))
    erank = erank_curve(run.path, erank_samples) if collapse_metric == "erank" else None
    collapse = find_collapse(probes, erank, collapse_metric)
    if collapse is not None:
        collapse = _kept(run.path, collapse, exact) or \
            keep_collapse_checkpoint(c, run.path, collapse, exact=exact, train_data=full)
    return {"run": str(run.path), "status": run.summary.get("status"), "diverged_step": run.summary.get("diverged_step"),
            "batch_size": c.train.batch_size or n, "lr": c.optim.lr, "loss_name": c.loss.name,
            "max_steps": c.train.max_steps, "steps": curves, "probes": probes, "erank": erank, "collapse": collapse,
            "final_probe": run.summary.get("probe", {})}


_TITLES = {"step_size": "step size (Fig. 1c)", "batch_size": "batch size (Fig. 1b, 1d)",
           "stabilize": "loss and warm-up (App. A)"}


def plot_escape_group(runs: list[dict], path: Path, title: str = "") -> Path:
    """Three panels against the optimizer step: loss, gradient norm (log y) and probe accuracy, one line
    per run (light to dark in sweep order); collapse points circled, divergences dotted vertical lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(runs):
        color = cmap(0.9 - 0.8 * i / max(1, len(runs) - 1))
        s = r["steps"]
        for ax, key in zip(axes[:2], ("loss", "grad_norm")):
            pts = [(st, v) for st, v in zip(s["step"], s[key]) if v is not None and math.isfinite(v) and v > 0]
            if pts:
                ax.plot(*zip(*pts), color=color, lw=1, label=r["label"])
            if r["diverged_step"]:
                ax.axvline(r["diverged_step"], color=color, ls=":", lw=1)
        pts = [(p["step"], probe_value(p)) for p in r["probes"]]
        pts = [(st, 100 * v) for st, v in pts if v is not None]
        if pts:
            axes[2].plot(*zip(*pts), "-o", ms=3, color=color, label=r["label"])
        c = r.get("collapse")
        if c and c["metric"] == "probe":
            axes[2].plot([c["step"]], [100 * c["value"]], "o", ms=10, mfc="none", mew=1.5, color=color)
    teacher = next((probe_value(p, "teacher") for r in runs for p in r["probes"] if "teacher" in p), None)
    if teacher is not None:
        axes[2].axhline(100 * teacher, color="k", ls="--", lw=1, label="teacher")
    for ax, ylabel in zip(axes, ("loss", "gradient norm", "student probe accuracy (%)")):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.set_yscale("log")
    for ax in (axes[0], axes[2]):
        if ax.get_legend_handles_labels()[0]:  # a run without probes draws nothing to name in the third
            ax.legend(fontsize=7)
    fig.suptitle(f"Escaping the random teacher: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
