"""What happens around the training steps: small hooks, each with one job.

The loop calls `after_step(state, metrics)` on each hook after every optimizer step and `at_end(state)`
once the last step is done. A hook ends the run by raising `StopRun` (diverged, interrupted); the loop
turns that into the run's status in one place.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading

import torch
from tqdm.auto import tqdm

from ..init import distance
from ..probes.embedding import Prober, accuracies
from ..runs.checkpoint import FINAL_TEACHER
from .state import TrainState
from .step import StepMetrics


class StopRun(Exception):
    """Ends the run with `status`; `extra` goes into summary.json."""

    def __init__(self, status: str, steps: int, **extra):
        super().__init__(status)
        self.status, self.steps, self.extra = status, steps, extra


class Hook:
    def at_start(self, state: TrainState) -> None:
        pass

    def after_step(self, state: TrainState, metrics: StepMetrics) -> None:
        pass

    def at_end(self, state: TrainState) -> None:
        pass


class PrecisionSwitch(Hook):
    """The end of the float64 start (precision.py): once the student has left its teacher, models, init copy
    and optimizer state continue in fp32; the switch is logged ({"event": "precision", ...})."""

    def after_step(self, state: TrainState, metrics: StepMetrics) -> None:
        switched = state.gate.after_step(state.step, state.teacher, state.student, [state.student_init],
                                         state.optimizer)
        if switched:
            _log(state, switched)


class TeacherUpdate(Hook):
    """The moving teachers: an EMA of the student after every step, or the student of the previous epoch."""

    @torch.no_grad()
    def after_step(self, state: TrainState, metrics: StepMetrics) -> None:
        mode, m = state.cfg.teacher.mode, state.cfg.teacher.ema_momentum
        if mode == "ema":
            teacher = list(state.teacher.parameters())
            torch._foreach_mul_(teacher, m)
            torch._foreach_add_(teacher, [p.detach() for p in state.student.parameters()], alpha=1 - m)
        elif mode == "previous-epoch" and state.step % state.plan.steps_per_epoch == 0:
            state.teacher.load_state_dict(state.student.state_dict())


class MetricsLog(Hook):
    """Keeps each step's metrics on the device and reads them every `train.log_every` steps (one host sync).

    A record is written for every logged step: that step's loss, gradient norm, distances and learning rate,
    and (log_every > 1) `loss_mean`, the mean loss since the previous record (`state.losses`). `flush` also
    finds the exact first step whose loss, gradient or updated weights were non-finite, and ends the run there
    as "diverged"."""

    def __init__(self, progress_bar: tqdm):
        self.window: list[tuple[int, StepMetrics]] = []
        self.bar = progress_bar

    def after_step(self, state: TrainState, metrics: StepMetrics) -> None:
        self.window.append((state.step, metrics))
        plan = state.plan
        # Also read before a probe or a checkpoint (never probe or save a diverged student). Every rank
        # reads at the same steps: the read all-reduces the losses.
        if plan.logs_at(state.step) or state.step in plan.probe_steps or state.step in plan.checkpoint_steps:
            self.flush(state)

    def at_end(self, state: TrainState) -> None:
        self.flush(state)

    def flush(self, state: TrainState) -> None:
        """Read the window and the current distances to the host (one sync), log, and raise StopRun at the
        first non-finite step. Called right after a step: the distances are those of the window's last step."""
        if not self.window:
            return
        window, self.window = self.window, []
        losses = state.ddp.sum_(torch.stack([m.loss for _, m in window]))
        distances = torch.stack([distance(state.student, state.teacher), distance(state.student, state.student_init)])
        weights = [m.param_norm for _, m in window]
        tracked = all(w is not None for w in weights)  # every step's ||theta|| (log_every > 1)
        values = torch.cat([losses, torch.stack([m.grad_norm for _, m in window]).to(losses.device),
                            *([torch.stack(weights).to(losses.device)] if tracked else []),
                            distances.to(losses.device)]).tolist()
        n = len(window)
        losses, norms, (dist_teacher, dist_init) = values[:n], values[n:2 * n], values[-2:]
        weights = values[2 * n:3 * n] if tracked else [0.0] * n
        for i, (step, m) in enumerate(window):
            record = {"event": "step", "step": step, "loss": losses[i], "grad_norm": norms[i], "lr": m.lr}
            if not (math.isfinite(losses[i]) and math.isfinite(norms[i])):
                _log(state, record)
                raise StopRun("diverged", step - 1, diverged_step=step, reason="non-finite loss or gradient")
            if not math.isfinite(weights[i]):  # this step's update made a weight non-finite
                _log(state, record)
                raise StopRun("diverged", step, diverged_step=step, reason="non-finite parameters")
        step, m = window[-1]
        if not math.isfinite(dist_teacher):  # a non-finite parameter makes the distance non-finite
            _log(state, {"event": "step", "step": step, "loss": losses[-1], "grad_norm": norms[-1],
                         "dist_teacher": dist_teacher, "dist_init": dist_init, "lr": m.lr})
            raise StopRun("diverged", step, diverged_step=step, reason="non-finite parameters")
        for (s, _), loss in zip(window, losses):
            state.losses.add(s, loss, state.plan.steps_per_epoch)
        if state.plan.logs_at(step):
            record = {"event": "step", "step": step, "epoch": step / state.plan.steps_per_epoch, "loss": losses[-1],
                      "grad_norm": norms[-1], "dist_teacher": dist_teacher, "dist_init": dist_init, "lr": m.lr,
                      "bf16": m.bf16, "time": state.wall()}
            window_mean = state.losses.take_window()
            if state.plan.log_every > 1:
                record["loss_mean"] = window_mean  # the steps since the previous record
            _log(state, record)
        state.last_loss = losses[-1]
        self.bar.set_postfix(loss=f"{state.last_loss:.3g}", refresh=False)


def _log(state: TrainState, record: dict) -> None:
    if state.ddp.is_main:
        state.run.log(record)


class Probe(Hook):
    """Linear / k-NN probes of teacher, student and raw input at the planned epochs (rank 0 only). A signal
    during a probe leaves it unlogged (StopOnSignal then ends the run); the resumed run probes that step first."""

    def __init__(self, state: TrainState, progress_bar: tqdm, stop: StopFlag, splits=None):
        cfg = state.cfg
        self.prober = Prober(cfg, state.in_channels, state.image_size, state.device, bf16=state.bf16_requested,
                             splits=splits)
        self.bar, self.stop = progress_bar, stop
        self.final_done = False

    def at_start(self, state: TrainState) -> None:
        epoch = unlogged_probe(state.plan, state.step, state.run)
        if epoch is not None:
            self.probe(state, epoch)
        # resumed after a kill that followed the final checkpoint: the final probe may be logged already
        self.final_done = state.step == state.plan.total_steps and any(r["step"] == state.step
                                                                       for r in state.run.probes())

    def after_step(self, state: TrainState, metrics: StepMetrics) -> None:
        if state.step in state.plan.probe_steps and state.step != state.plan.total_steps:
            self.probe(state, state.plan.probe_steps[state.step])

    def at_end(self, state: TrainState) -> None:
        if not self.final_done:
            self.probe(state, state.plan.total_epochs)

    def probe(self, state: TrainState, epoch: float) -> None:
        splits = self.prober.splits
        if not self.bar.disable:  # a probe of the full splits takes longer than many steps: say what runs
            self.bar.set_postfix_str(f"probing {', '.join(state.cfg.probe.which)} at epoch {epoch:.3g} "
                                     f"({len(splits.train)} train / {len(splits.test)} test images)")
        try:
            with self.stop.interrupting():
                record = probe_record(self.prober, state, state.step, epoch)
        except Interrupted:
            return
        state.run.log(record)
        if not self.bar.disable:
            self.bar.set_postfix_str("", refresh=False)
            self.bar.write(probe_line(record))


def probe_record(prober, state, step: int, epoch: float) -> dict:
    """The probes that probe.which asks for at `step`, as one record. A frozen teacher is probed once, its result
    cached on disk by its weights. state: a run's TrainState, or one run of a stack (the same attributes)."""
    which = state.cfg.probe.which
    record = {"event": "probe", "step": step, "epoch": epoch}
    if "teacher" in which:
        if state.cfg.teacher.mode != "frozen":
            state.teacher_probe = prober.probe(state.teacher.encoder)
        elif state.teacher_probe is None:
            state.teacher_probe = prober.frozen(state.teacher.encoder)
        record["teacher"] = state.teacher_probe
    if "student" in which:
        record["student"] = prober.probe(state.student.encoder)
    if "input" in which:
        record["input"] = prober.input()
    return record


def unlogged_probe(plan, step: int, run) -> float | None:
    """The epoch of the probe planned at `step` (but the last step's: the run's end makes that one) where `run`
    has not logged it: the start's, or one that a signal stopped; else None."""
    if step not in plan.probe_steps or step == plan.total_steps:
        return None
    if any(r["step"] == step for r in run.probes()):
        return None
    return plan.probe_steps[step]


def probe_line(rec: dict) -> str:
    parts = [f"epoch {rec['epoch']:.3g}"]
    for role in ("teacher", "student", "input"):
        if role in rec:
            parts.append(role + " " + " ".join(f"{k} {100 * v:.1f}%" for k, v in accuracies(rec[role]).items()))
    return " | ".join(parts)


class Checkpoint(Hook):
    """The resumable state and a student snapshot every `train.checkpoint_every` epochs, at the
    `train.checkpoint_at` epochs, and at the end.
    MetricsLog has read the steps before it and found them finite: the last checkpoint is a finite one."""

    def at_start(self, state: TrainState) -> None:
        name = f"student_step{state.step}.pt"  # a kill between the resume state and the snapshot lost the latter
        if state.step in state.plan.checkpoint_steps and not (state.run.checkpoints / name).exists():
            state.save_student(name)

    def after_step(self, state: TrainState, metrics: StepMetrics) -> None:
        if state.step in state.plan.checkpoint_steps:
            state.save()
            state.save_student(f"student_step{state.step}.pt")

    def at_end(self, state: TrainState) -> None:
        state.save()
        state.save_student("student.pt")
        if state.cfg.teacher.mode != "frozen":
            state.save_teacher(FINAL_TEACHER)


class Interrupted(BaseException):
    """SIGTERM/SIGINT inside `StopFlag.interrupting()`: the work there stops at once. A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` on the way swallows it."""


class StopFlag:
    """While entered (in the main thread), SIGTERM/SIGINT only set `signal`, for the loop to act on."""

    def __init__(self):
        self.signal, self._old, self._raising = None, {}, False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        if self._raising:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def interrupting(self):
        """Work that takes long between two steps (a probe: minutes at the papers' scale) is left at once by a
        signal, caught before or during it, with `Interrupted`, instead of running on after Ctrl-C. Only on the
        main thread, where Python runs signal handlers; on another thread the work runs to its end."""
        if self.signal is not None:
            raise Interrupted(self.signal)
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._raising = True
        try:
            yield
        finally:
            self._raising = False

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class StopOnSignal(Hook):
    """After a step on which `flag` has caught SIGTERM/SIGINT, or at the end (a signal during the final probe),
    the run checkpoints and ends as "interrupted". Under torchrun the ranks agree at logged and probe steps (an
    all-reduce), so that all stop at the same step."""

    def __init__(self, metrics: MetricsLog, flag: StopFlag):
        self.metrics, self.flag = metrics, flag

    def after_step(self, state: TrainState, metrics: StepMetrics) -> None:
        if state.ddp.enabled and not (state.plan.logs_at(state.step) or state.step in state.plan.probe_steps):
            return
        self.stop_if_signalled(state)

    def at_end(self, state: TrainState) -> None:
        self.stop_if_signalled(state)

    def stop_if_signalled(self, state: TrainState) -> None:
        if state.ddp.any(self.flag.signal is not None, state.device):
            self.metrics.flush(state)
            state.save()
            raise StopRun("interrupted", state.step, signal=signal.Signals(self.flag.signal or signal.SIGTERM).name)
