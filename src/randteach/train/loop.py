"""The distillation loop: a student is trained to match a frozen, randomly initialized teacher.

No labels, and by default no augmentation: teacher and student see the same image. The loop logs loss, gradient
norm, the student's distance from the teacher and from its own init, and the learning rate to
metrics.jsonl every `train.log_every` steps; it probes teacher, student and raw input at the configured
epochs; it checkpoints atomically, resumes bitwise-exactly on CPU, stops cleanly with status "diverged"
at the first non-finite loss or gradient, and with status "interrupted" on SIGTERM/SIGINT (after
writing a resumable checkpoint). The pieces: `train.state` (plan and state), `train.step` (one
optimizer step), `train.callbacks` (what happens around steps), `train.setup` (data and models).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from . import teacher_cache
from .. import launcher
from ..config import Config, teacher_cache_conflict
from ..data import ImageData
from ..digests import object_key
from ..errors import UserError
from ..optim import lr_at
from ..precision import exact_fp32
from ..runs.rundir import (PYTHON_OBJECTS, RunDir, check_config_digest, open_data_folder, python_objects,
                            run_lock, run_summary, write_json)
from .callbacks import (Checkpoint, MetricsLog, PrecisionSwitch, Probe, StopFlag, StopOnSignal, StopRun,
                        TeacherUpdate)
from .distributed import Dist, from_environment, process_gpu
from .host_memory import keep_freed_memory
from .setup import resolve_device
from .state import TrainState
from .step import StepMetrics, build_step_functions, train_step


@dataclass
class RunResult:
    path: Path
    summary: dict


def distill(cfg: Config, *, resume: bool = False, progress: bool = True, train_data: ImageData | None = None,
            encoder=None, probe_splits: tuple[ImageData, ImageData] | None = None,
            stop: StopFlag | None = None) -> RunResult:
    """Run (or continue from its last checkpoint, or skip if already completed) the distillation described by
    `cfg`. resume=True insists on continuing: a run without checkpoints/last.pt is refused, not started over.

    train_data, encoder, probe_splits: objects from the Python API (`randteach.distill`) that replace
    cfg.data.name, cfg.model.encoder and the probe data set. stop: a signal flag the caller has entered
    already (see `opened`)."""
    with opened(cfg, resume=resume, progress=progress, train_data=train_data, encoder=encoder,
                probe_splits=probe_splits, stop=stop) as training:
        if isinstance(training, RunResult):  # finished before
            return training
        return training.finish(*solo_loop(training))


@contextlib.contextmanager
def opened(cfg: Config, *, resume: bool = False, progress: bool = True, train_data: ImageData | None = None,
           encoder=None, probe_splits=None, stop: StopFlag | None = None) -> Iterator[Training | RunResult]:
    """The run `cfg` opened for training, as a `Training` (its folder locked, its state created or resumed from
    last.pt, its hooks ready), or its RunResult where it has finished already. `stop`: a signal flag shared by
    runs trained side by side in one process (default: the run's own, set by SIGTERM/SIGINT)."""
    # The caller's random streams are left as they were (a notebook's later draws do not restart at the
    # run's seed), and training takes gradients even when called under torch.no_grad().
    if torch.is_inference_mode_enabled():
        raise UserError("distillation trains the student with autograd, which torch.inference_mode() turns off: "
                        "call it outside that block (inside torch.no_grad() it trains as it should)")
    rng = torch.random.fork_rng(devices=_cuda_devices_drawn_on(cfg))
    new = not cfg.run_dir().exists()
    with run_lock(cfg.run_dir(), create=not resume), rng, torch.enable_grad(), exact_fp32():
        try:
            run = RunDir(cfg.run_dir())
            given = _python_objects(encoder, train_data, probe_splits)
            finished = _finished(cfg, run, resume, given)
            if finished is not None:
                yield finished
                return
            device = resolve_device(cfg.train.device)
            keep_freed_memory(device)
            ddp = from_environment(device)
            if ddp.enabled and device.type == "cuda":
                device = torch.device("cuda", process_gpu())
            _open_run(cfg, run, ddp, given)
            with contextlib.ExitStack() as flags:
                state = TrainState.create_or_resume(cfg, run, ddp, device, train_data=train_data, encoder=encoder)
                # the run's own flag catches signals once its teacher cache is there (before, a signal ends the
                # process as it always did); a flag shared by runs side by side is the caller's
                yield Training(state, progress, probe_splits, stop or StopFlag(), None if stop else flags.enter_context)
        except Exception:
            if new:  # e.g. data not found, an encoder that cannot be built: no empty run folder is left
                RunDir(cfg.run_dir()).remove_if_unstarted()
            raise


def _cuda_devices_drawn_on(cfg: Config) -> list[int]:
    """The run's CUDA device, whose random stream it forks (forking every visible GPU's would open a
    context on each, in every torchrun process)."""
    device = resolve_device(cfg.train.device)
    if device.type != "cuda":
        return []
    return [process_gpu()] if launcher.local_rank() is not None else [device.index or 0]


def _finished(cfg: Config, run: RunDir, resume: bool, given: dict) -> RunResult | None:
    """The run's result if it has finished (completed or diverged), after the checks that come before a start."""
    run.remove_stale_temporaries()  # a kill mid-write leaves .*.tmp files
    run.refuse_another_config(cfg)  # checked before a finished run is returned, as its Python objects are
    existing = run.summary()
    finished = bool(existing) and existing.get("status") in ("completed", "diverged")
    _check_same_objects(run, given, finished)
    if finished:
        check_config_digest(existing.get("config_digest"), cfg, run.path)  # a hand-edited config.yaml
        return RunResult(run.path, existing)
    if resume:
        _check_resumable(run)
    return None


class Training:
    """One run being trained: its state, step functions, hooks and progress bar, driven by `solo_loop` (`start`,
    then `step` and `after` until `done`, then `end`; a hook that ends the run raises StopRun), then `finish`,
    which writes the summary. Runs side by side in one process (`train.side_by_side`) are each driven so too."""

    def __init__(self, state: TrainState, progress: bool, probe_splits, stop: StopFlag, enter_stop=None):
        cfg, ddp = state.cfg, state.ddp
        self.state, self.progress, self.stop, self._enter_stop = state, progress, stop, enter_stop
        self.bar = tqdm(total=state.plan.total_steps, initial=state.step, disable=not progress or not ddp.is_main,
                        desc=f"distill {state.run.path.name}", unit="step", dynamic_ncols=True)
        if state.step and not self.bar.disable:
            self.bar.write(f"resuming {state.run.path} from its checkpoint of step {state.step}")
        metrics = MetricsLog(self.bar)
        probe = [Probe(state, self.bar, stop, probe_splits)] if cfg.probe.which and ddp.is_main else []
        self.stop_on_signal = StopOnSignal(metrics, stop)
        self.hooks = [PrecisionSwitch(), TeacherUpdate(), metrics, *probe, Checkpoint(), self.stop_on_signal]
        self.fns = build_step_functions(state)

    @property
    def done(self) -> bool:
        return self.state.step >= self.state.plan.total_steps

    def start(self) -> None:
        """The teacher cache (computed here, where runs side by side compute theirs at once), then the clock and
        the hooks' start."""
        _attach_teacher_cache(self.state, self.progress)
        if self._enter_stop is not None:
            self._enter_stop(self.stop)
        self.state.start_clock()
        for h in self.hooks:
            h.at_start(self.state)
        self.stop_on_signal.stop_if_signalled(self.state)  # a signal during the cache (side by side) or a probe

    def step(self) -> StepMetrics:
        """One optimizer step."""
        state = self.state
        if self.fns.dtype != state.gate.dtype:  # the float64 start ended: DDP's buckets and graphs hold dtypes
            self.fns = build_step_functions(state)
        lr = lr_at(state.cfg.optim, state.step, state.plan.total_steps)
        return train_step(state, self.fns, state.plan.indices(state.step), lr)

    def after(self, metrics: StepMetrics) -> None:
        self.state.step += 1
        self.bar.update(1)
        for h in self.hooks:
            h.after_step(self.state, metrics)

    def end(self) -> None:
        for h in self.hooks:
            h.at_end(self.state)

    def finish(self, status: str, steps: int, extra: dict) -> RunResult:
        if status == "completed":
            extra["final_loss"] = self.state.losses.epoch_mean()  # the last epoch's mean loss
        return _finish(self.state, status, steps, extra)


def solo_loop(training: Training) -> tuple[str, int, dict]:
    """The solo loop: one step, then the hooks; a hook that ends the run raises StopRun."""
    try:
        training.start()
        while not training.done:
            training.after(training.step())
        training.end()
        return "completed", training.state.step, {}
    except StopRun as stop:
        return stop.status, stop.steps, stop.extra
    finally:
        training.bar.close()


def _python_objects(encoder, train_data, probe_splits) -> dict:
    """Which of the run's parts came from Python, and a content key of each (`digests.object_key`)."""
    parts = {"encoder": encoder, "train": train_data, "probe": probe_splits}
    given = {name: obj is not None for name, obj in parts.items()}
    return {**given, "keys": {name: object_key(*(obj if name == "probe" else [obj]))
                              for name, obj in parts.items() if obj is not None}}


def _check_same_objects(run: RunDir, given: dict, finished: bool) -> None:
    """A run continues on the Python objects it began with, and a finished run is returned only for them:
    config.yaml cannot name them, so their keys are compared (a run recorded before the keys were is not
    checked). A run with nothing to continue from starts over, on any objects."""
    recorded = python_objects(run.path)
    if not (finished or (run.checkpoints / "last.pt").is_file()) or (recorded and "keys" not in recorded):
        return
    changed = sorted(set(recorded.get("keys", {}).items()) ^ set(given["keys"].items()))
    if changed:
        names = ", ".join(sorted({name for name, _ in changed}))
        raise UserError(f"{run.path} was made with another {names} than the one given now (the code or the data "
                        "differ, or one came from Python and the other from the config); use it with the objects "
                        "it was made with, or give another out= for a new run")


def _check_resumable(run: RunDir) -> None:
    """A resume continues from checkpoints/last.pt; without it, it would start over and replace the run's log."""
    if not (run.checkpoints / "last.pt").is_file():
        saved = sorted(p.name for p in run.checkpoints.glob("student*.pt")) if run.checkpoints.is_dir() else []
        raise UserError(f"cannot resume {run.path}: it has no checkpoints/last.pt (the run stopped before its first "
                        "checkpoint, or the file was removed), so there is nothing to continue from"
                        + (f"; its student checkpoints: {', '.join(saved)}" if saved else "")
                        + ". To train it from the start, run it again without --resume (its metrics.jsonl and "
                        "summary.json are then replaced).")


def _open_run(cfg: Config, run: RunDir, ddp: Dist, given: dict) -> None:
    if ddp.is_main:
        run.create()
        open_data_folder(run, cfg)
        run.config_path.write_text(cfg.to_yaml())
        run.track(cfg)  # TensorBoard / W&B sinks mirror every run.log record (runs/tracking.py)
        if any(given.values()):
            # config.yaml cannot name Python objects: mark the run so the CLI refuses to resume it wrongly.
            write_json(run.path / PYTHON_OBJECTS, given)
    ddp.barrier()


def _attach_teacher_cache(state: TrainState, progress: bool) -> None:
    """train.teacher_cache: the frozen teacher's bottleneck outputs, computed once per teacher and data."""
    cfg = state.cfg
    if not cfg.train.teacher_cache:
        return
    conflict = teacher_cache_conflict(cfg)  # a Config changed after it was built (Python API) is checked here
    if conflict:
        raise UserError(conflict)
    from ..data import resolve_root
    targets, origin = teacher_cache.load_or_compute(cfg, state.teacher, state.inputs, state.preprocess, state.plan.batch,
                                                    state.device, resolve_root(cfg.data.root) / "teacher-targets",
                                                    state.conv_like)
    state.targets = targets.to(state.device)
    if progress and state.ddp.is_main:
        tqdm.write(f"teacher targets: {origin}")  # above the run's progress bar


def _finish(state: TrainState, status: str, steps: int, extra: dict) -> RunResult:
    """The run's one exit: summary.json, written by rank 0 and returned by every rank (the others' marked
    with their rank), the same result shape for every status."""
    state.ddp.barrier()
    run = state.run
    if state.ddp.is_main:
        summary = run_summary(run, status=status, steps=steps, epochs=steps / state.plan.steps_per_epoch,
                              wall=state.wall(), init=state.init_info, digest=state.cfg.digest(),
                              device=state.device, precision="bf16" if state.bf16_requested else "fp32", **extra)
        run.write_summary(summary)
    state.ddp.barrier()
    return RunResult(run.path, summary if state.ddp.is_main else {**run.summary(), "rank": state.ddp.rank})
