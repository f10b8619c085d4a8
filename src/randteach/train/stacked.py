"""Many runs in one process: K runs that share an architecture are trained as one stacked model (the vmap mode of
`randteach sweep --stack K`, the default on a GPU; `train_stacked` hands the threads mode, the default on a CPU,
to `side_by_side`).

Runs of a sweep that differ only in values that do not change any tensor's shape (seed, alpha or epsilon,
learning rate and its schedule, weight decay, momentum, betas) are stacked: every parameter becomes one
(K, ...) tensor (`torch.func.stack_module_state`), the forward and backward passes of all K
teacher-student pairs run at once under `torch.func.vmap`, and each run then takes its own optimizer
step (one fused torch.optim step for all runs with equal optimizer settings). Fewer, larger kernels: this
amortizes the per-operation overhead of small encoders. The K runs' images and feature maps sit side by
side in the channel dimension throughout, as one grouped convolution wants them (`stack_layers`: pools,
batch and group norms and ReLUs that work in that arrangement, instead of copying at every layer).

Each run keeps everything a run of `randteach distill` has: its run directory with config.yaml,
metrics.jsonl, checkpoints (teacher.pt, student_init.pt, student_step<N>.pt, last.pt, student.pt) and
summary.json, in the same format. Per run, its own data order (`epoch_order` of its seed), learning rate
and optimizer: each run's student module keeps real parameters, but their storage is that run's slice of
the stacked tensors, so the run's torch.optim optimizer (built by `build_optimizer`), the loop's MetricsLog
(distances, the divergence check, the records), the Prober and `state_dict` act on that run exactly as in a
solo run. Gradient norms and clipping are computed for all K runs at once on the stacked gradients, and no
value is read to the host between logged steps. A stacked group can be killed and re-run: each run resumes
from its own last.pt (and a solo `randteach distill --resume` can finish it too).

Results: the optimizer step is torch.optim's own, so only the forward/backward arithmetic differs from a
solo run: a convolution over K weights runs as one grouped convolution and a linear layer as a batched
matrix product, whose sums may round differently in the last bit (measured: gradients within a
few 1e-6 relative on the CPU). A stacked run therefore matches its solo run to about 1e-6 relative for the
convnet and about 1e-3 for ResNet20 with batch norm under Adam (less than one more torch thread moves it),
not bitwise. Its summary.json has a "stack" entry besides.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from torch.func import functional_call, stack_module_state, vmap

from .. import launcher
from ..config import Config, flatten
from ..errors import UserError
from ..init import init_report, l2_norms
from ..losses import distill_loss
from ..optim import build_optimizer, load_optimizer_state, lr_at, set_lr
from ..precision import exact_fp32, may_start_in_float64, uses_bf16
from ..probes.embedding import Prober
from ..runs.checkpoint import load_checkpoint, save_checkpoint, save_teacher
from ..runs.rundir import RunDir, RunInUse, check_config_digest, open_data_folder, run_lock, run_summary
from .callbacks import Interrupted, MetricsLog, StopFlag, StopRun, probe_record, unlogged_probe
from .distributed import Dist
from .host_memory import keep_freed_memory
from .setup import (build_teacher_and_student, epoch_order, load_training_inputs, resolve_device, seeds,
                    trains_channels_last)
from .stack_layers import fold_runs_into_channels
from .state import LossMeans, Plan
from .step import StepMetrics

# Config keys whose values may differ inside one stack: none changes a tensor's shape or the step's code.
PER_RUN_KEYS = frozenset({
    "name", "out", "train.seed",
    "init.mode", "init.alpha", "init.epsilon", "init.epsilon_draw", "init.variance_preserving", "init.checkpoint",
    "init.teacher_checkpoint", "init.teacher_seed", "init.fresh_seed",
    "optim.lr", "optim.weight_decay", "optim.momentum", "optim.betas", "optim.schedule", "optim.warmup_steps",
    "optim.min_lr", "optim.lr_end", "optim.grad_clip",
})


def structure_key(cfg: Config) -> str:
    """Runs with equal keys can be stacked: every config value outside PER_RUN_KEYS is equal."""
    shared = {k: v for k, v in flatten(cfg.to_dict()).items() if k not in PER_RUN_KEYS}
    return json.dumps(shared, sort_keys=True, default=str)


STACK_MODES = ("auto", "vmap", "threads")


def stack_mode(cfg: Config, mode: str = "auto") -> str:
    """How a stack of runs like `cfg` trains: "vmap", one model of K runs (this module), or "threads", each run
    its own solo step with the runs side by side on the cores (`train.side_by_side`). "auto": threads on a CPU,
    where one model of K small conv encoders trains below one run at a time and the cores are what a small
    model leaves unused (docs/PERFORMANCE.md, Stacked runs); vmap on a GPU."""
    if mode not in STACK_MODES:
        raise UserError(f"stack mode {mode!r}: expected one of {', '.join(STACK_MODES)}")
    if mode != "auto":
        return mode
    return "threads" if resolve_device(cfg.train.device).type == "cpu" else "vmap"


def why_not_stackable(cfg: Config, mode: str) -> str | None:
    """None if `cfg` can be trained in a stack of `mode` (vmap or threads), else the reason (one line) it
    runs alone. Side by side on threads each run is trained by the solo loop: only compiling, torchrun and
    imported encoders are out."""
    if cfg.train.compile:
        return "train.compile=true"
    if launcher.world_size() > 1:
        return "data-parallel (torchrun) runs"
    if ":" in cfg.model.encoder:
        return ("an imported encoder may draw from the random state that runs side by side share" if mode == "threads"
                else "an imported encoder may hold layers vmap cannot batch")
    if mode == "threads":
        return None
    if cfg.teacher.mode != "frozen" or cfg.teacher.train_mode:
        return f"teacher.mode={cfg.teacher.mode}, train_mode={cfg.teacher.train_mode}: only a frozen teacher in eval mode"
    if may_start_in_float64(cfg):
        # a stack holds one dtype for all its runs, and each run leaves float64 at its own step
        return (f"init.{'alpha' if cfg.init.mode == 'locality' else 'epsilon'} this close to the teacher starts "
                "in float64 (train.float64_until_distance); a stack runs in fp32 only")
    if uses_bf16(cfg.train.precision, resolve_device(cfg.train.device)):
        return (f"train.precision={cfg.train.precision} is bf16 here, and a stack runs in fp32 (autocast does not "
                "reach operations under vmap on a CPU, so a bf16 stack is untested); stack with --train.precision fp32")
    if cfg.train.micro_batch and cfg.train.micro_batch < (cfg.train.batch_size or math.inf):
        return "train.micro_batch (gradient accumulation)"
    if cfg.loss.center:
        return "loss.center (a running center per run)"
    if cfg.data.augment != "none":
        return f"data.augment={cfg.data.augment} (the stacked step feeds each run its images as they are)"
    return None


def stack_groups(cfgs: list[Config], k: int, mode: str = "auto") -> tuple[list[list[int]], dict[int, str]]:
    """Indices of `cfgs` in groups of at most `k` stackable runs (in sweep order; a vmap stack's share one
    structure), and the reason each unstackable run runs alone (those are groups of one too)."""
    alone: dict[int, str] = {}
    by_key: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        how = stack_mode(cfg, mode)
        why = why_not_stackable(cfg, how)
        if why is not None:
            alone[i] = why
            by_key[f"alone-{i}"] = [i]
        else:
            by_key.setdefault(structure_key(cfg) if how == "vmap" else how, []).append(i)
    groups = [members[j:j + k] for members in by_key.values() for j in range(0, len(members), max(1, k))]
    return sorted(groups), alone


class _Run:
    """One run of a stack: its config, directory, modules, optimizer and bookkeeping. It carries the
    attributes of a solo run's TrainState that the loop's MetricsLog reads (run, ddp, plan, step, wall,
    last_loss, losses), so that each run's metrics are read, logged and checked for divergence by the solo code."""

    def __init__(self, cfg: Config, teacher: nn.Module, student: nn.Module, init_info: dict):
        self.cfg, self.run = cfg, RunDir(cfg.run_dir())
        self.teacher, self.student, self.init_info = teacher, student, init_info
        self.student_init = copy.deepcopy(student).requires_grad_(False)
        self.optimizer: torch.optim.Optimizer | None = None
        self.ddp = Dist()
        self.plan: Plan | None = None
        self.step = 0
        self.wall_before, self.t_start = 0.0, 0.0
        self.teacher_probe: dict | None = None
        self.rng = _seeded_rng(cfg.train.seed)
        self.status: str | None = None  # set when the run has finished (completed, diverged, interrupted)
        self.last_loss = float("nan")
        self.losses = LossMeans()
        self.metrics = MetricsLog(tqdm(disable=True))  # the step values, on the device until read
        self.pending: StepMetrics | None = None        # the last step's values, for self.metrics
        self.summary: dict = {}
        self.data_seed = seeds(cfg)["data"]

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start

    def state(self) -> dict:
        """last.pt in the format of a solo run: a solo `distill --resume` can continue it."""
        return {"student": _owned(self.student.state_dict()), "teacher": self.teacher.state_dict(),
                "student_init": self.student_init.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "wall_time_s": self.wall(), "bf16_on": False, "init": self.init_info,
                "center": None, "rng": self.rng, "teacher_probe": self.teacher_probe or {},
                "last_loss": self.last_loss, "loss_means": dataclasses.asdict(self.losses),
                "config_digest": self.cfg.digest()}  # a resume refuses a config.yaml edited since


def _seeded_rng(seed: int) -> dict:
    """The global RNG state a solo run has after `torch.manual_seed(train.seed)` (nothing draws from it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {"torch": torch.get_rng_state()}


def _owned(state: dict) -> dict:
    """Tensors that own their storage: a slice of a stacked tensor would otherwise save all K runs."""
    return {k: v.detach().clone() for k, v in state.items()}


def train_stacked(cfgs: list[Config], progress: bool = False, mode: str = "auto") -> list[dict]:
    """Train (or resume, or skip when finished) the runs `cfgs` stacked; one summary per config, in order (a
    run whose folder another process holds is not touched: its summary, "failed", says so). `mode`: see
    `stack_mode`.

    The configs must be stackable (`why_not_stackable`) and, in a vmap stack, share a structure (`structure_key`)."""
    mode = stack_mode(cfgs[0], mode)
    if mode == "vmap" and len({structure_key(c) for c in cfgs}) > 1:
        raise UserError("train_stacked: the runs differ in more than " + ", ".join(sorted(PER_RUN_KEYS)))
    for cfg in cfgs:
        why = why_not_stackable(cfg, mode)
        if why is not None:
            raise UserError(f"{cfg.run_dir()} cannot be stacked: {why}")
    if mode == "threads":
        from .side_by_side import train_side_by_side
        return train_side_by_side(cfgs, progress)
    summaries: dict[int, dict] = {}
    by_step: dict[int, list[int]] = {}
    with contextlib.ExitStack() as locks:
        for i, cfg in enumerate(cfgs):
            try:
                locks.enter_context(run_lock(cfg.run_dir(), create=True))  # one writer per run folder, as distill
            except RunInUse as e:  # that run is another process's; the others train
                summaries[i] = e.summary()
                continue
            run = RunDir(cfg.run_dir())
            run.remove_stale_temporaries()  # a kill mid-write leaves .*.tmp files
            run.refuse_another_config(cfg)
            done = run.summary()
            if done and done.get("status") in ("completed", "diverged"):
                check_config_digest(done.get("config_digest"), cfg, run.path)
                summaries[i] = done
                continue
            last = run.checkpoints / "last.pt"
            by_step.setdefault(int(load_checkpoint(last)["step"]) if last.exists() else 0, []).append(i)
        # A kill between two runs' checkpoints can leave them at different steps: each step resumes as its own stack.
        for members in by_step.values():
            with exact_fp32():
                for i, summary in zip(members, _train_group([cfgs[i] for i in members], progress)):
                    summaries[i] = summary
    return [summaries[i] for i in range(len(cfgs))]


class _Group:
    """A stack being trained: its runs, their stacked tensors and step function, the data, the step count."""

    def __init__(self, cfgs: list[Config]):
        cfg0 = cfgs[0]
        self.device = resolve_device(cfg0.train.device)
        keep_freed_memory(self.device)
        self.inputs, self.preprocess, data, size = load_training_inputs(cfg0)
        in_channels = data.images.shape[1]
        self.runs = [_start_run(cfg, in_channels, size, self.device) for cfg in cfgs]
        self.step = _resume_or_save_inits(self.runs, in_channels, size, self.preprocess)
        self.plan = Plan.of(cfg0, len(self.inputs))  # the solo loop's plan: the same steps, probes and checkpoints
        if cfg0.train.data_on_device:
            self.inputs = self.inputs.to(self.device)
        self.targets = (_teacher_targets(self.runs, self.inputs, self.preprocess, self.plan.batch, self.device)
                        if cfg0.train.teacher_cache else None)
        self.s_params, self.s_buffers, self.t_params, self.t_buffers = _stack(self.runs)
        self.channels_last = trains_channels_last(cfg0, self.inputs, self.runs[0].student.encoder, self.device,
                                                  bf16=False)  # a stack runs in fp32
        for r in self.runs:
            r.optimizer = build_optimizer(r.cfg.optim, r.student.parameters())
            last = r.run.checkpoints / "last.pt"
            if last.exists():
                load_optimizer_state(r.optimizer, load_checkpoint(last)["optimizer"])
        self.optimizers = _shared_optimizers(self.runs)
        self.losses_of = _stacked_losses(self.runs[0], cfg0, self.targets is not None, self.channels_last)
        self.prober = Prober(cfg0, in_channels, size, self.device) if cfg0.probe.which else None
        self.stop = StopFlag()
        t_start = time.perf_counter()
        for r in self.runs:
            r.plan, r.step, r.t_start = self.plan, self.step, t_start
        self._orders: tuple[int, list[torch.Tensor]] | None = None  # (epoch, each run's order of it)
        limits = [r.cfg.optim.grad_clip or math.inf for r in self.runs]  # on the device once, not per step
        self.clip_limits = (None if all(math.isinf(v) for v in limits) else
                            torch.tensor(limits, dtype=torch.float64, device=self.device))

    def batches(self, step: int) -> list[torch.Tensor]:
        """Each run's global batch of step `step`, from its own data order (drawn once per epoch: a randperm
        per run and step cost a stack of K runs on 5M images K x 137 ms of host time per step)."""
        epoch, rows = self.plan.batch_slice(step)
        if self._orders is None or self._orders[0] != epoch:
            self._orders = None  # the last epoch's orders go first (K x n indices)
            self._orders = epoch, [epoch_order(self.plan.n, r.data_seed, epoch) for r in self.runs]
        return [order[rows] for order in self._orders[1]]

    def active(self) -> list[tuple[int, _Run]]:
        return [(k, r) for k, r in enumerate(self.runs) if r.status is None]

    def finish(self, r: _Run, status: str, step: int, **extra) -> None:
        _finish(r, self.plan, status, step, self.device, stack={"mode": "vmap", "runs": len(self.runs)}, **extra)


def _train_group(cfgs: list[Config], progress: bool) -> list[dict]:
    """The group's loop, as the solo loop: the first probe, then steps with what follows each, then the end."""
    g = _Group(cfgs)
    if progress:
        print(f"  stacked: {len(g.runs)} runs as one vmapped model from step {g.step} of {g.plan.total_steps}",
              file=sys.stderr, flush=True)
    with g.stop:
        for _, r in g.active():  # the start's probe, or one that a signal stopped
            epoch = unlogged_probe(g.plan, g.step, r.run)
            if epoch is not None and g.prober is not None:
                _probe(g, r, g.step, epoch)
        while g.step < g.plan.total_steps and g.active() and g.stop.signal is None:
            _group_step(g)
            g.step += 1
            for _, r in g.active():
                _after_step(g, r)
        for _, r in g.active():
            if g.stop.signal is None:
                _complete(g, r)
        if g.stop.signal is not None:  # before, between or during the steps or the final probes
            _interrupt(g, g.stop.signal)
    return [r.summary for r in g.runs]


def _stack(runs: list[_Run]) -> tuple[dict, dict, dict, dict]:
    """Stack, then make each run's student parameters views of its slice: the per-run optimizers,
    metrics, probes and checkpoints work on ordinary modules while the step runs stacked."""
    s_params, s_buffers = stack_module_state([r.student for r in runs])
    t_params, t_buffers = stack_module_state([r.teacher for r in runs])
    t_params = {k: v.detach() for k, v in t_params.items()}
    with torch.no_grad():
        for k, r in enumerate(runs):
            for name, p in r.student.named_parameters():
                p.data = s_params[name][k]
            for name, b in r.student.named_buffers():
                b.data = s_buffers[name][k]
    return s_params, s_buffers, t_params, t_buffers


def _group_step(g: _Group) -> None:
    """One step of every run: each run's own batch, one stacked forward/backward, per-run gradient norms and
    clipping computed on the stacked gradients, then each run's optimizer step. Nothing is read to the host:
    each run's loss and gradient norm stay on the device until its MetricsLog reads them."""
    plan, step = g.plan, g.step
    idx = g.batches(step)
    x = _side_by_side([_batch(g.inputs, i, g.preprocess, g.device) for i in idx], g.channels_last)  # (K, B, ...)
    teacher_in = (torch.stack([g.targets[k][i.to(g.device, non_blocking=True)] for k, i in enumerate(idx)])
                  if g.targets is not None else x)
    for p in g.s_params.values():
        p.grad = None
    losses = g.losses_of(g.s_params, g.s_buffers, g.t_params, g.t_buffers, x, teacher_in)     # (K,)
    losses.sum().backward()  # runs are independent: each slice's gradient is its own run's
    norms = _norms_per_run([p.grad for p in g.s_params.values() if p.grad is not None])
    _clip(g, norms)
    losses = losses.detach().double()
    for k, r in enumerate(g.runs):  # a finished run's parameters get no gradient: the optimizers skip them
        for name, p in r.student.named_parameters():
            p.grad = g.s_params[name].grad[k] if r.status is None else None
    # torch.optim's own step on each run's slice, so per-run lr, weight decay, momentum and betas follow
    # torch.optim's formulas exactly: AdamW (Loshchilov & Hutter 2019, Alg. 2)
    # theta <- theta - lr*wd*theta - lr * m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - b1^t),
    # v_hat = v / (1 - b2^t); SGD v <- mu*v + (g + wd*theta), theta <- theta - lr*v.
    for optimizer, members in g.optimizers:
        lr = lr_at(members[0].cfg.optim, step, plan.total_steps)
        set_lr(optimizer, lr)
        optimizer.step()
        for r in members:
            set_lr(r.optimizer, lr)  # what the run's checkpoint records
    # each run's ||theta|| after its update where its metrics are read every log_every > 1 steps (as solo)
    weights = _norms_per_run([p.detach() for p in g.s_params.values()]) if plan.log_every > 1 else None
    for k, r in g.active():
        r.pending = StepMetrics(losses[k], norms[k], r.optimizer.param_groups[0]["lr"], False,
                                None if weights is None else weights[k])


def _shared_optimizers(runs: list[_Run]) -> list[tuple[torch.optim.Optimizer, list[_Run]]]:
    """One torch.optim optimizer over the parameters of all runs with equal optimizer settings: one fused
    step (one multi-tensor kernel) for them per step instead of one per run, with the same arithmetic per
    element. Each of a run's parameters has one state entry, held by both optimizers (torch.optim fills an
    entry in place), so the run's own optimizer's state_dict, and with it the run's checkpoint, is what a
    solo run's would be."""
    by_settings: dict[str, list[_Run]] = {}
    for r in runs:
        by_settings.setdefault(json.dumps(dataclasses.asdict(r.cfg.optim), sort_keys=True), []).append(r)
    shared = []
    for members in by_settings.values():
        optimizer = build_optimizer(members[0].cfg.optim, [p for r in members for p in r.student.parameters()])
        for r in members:
            for p in r.student.parameters():  # the entry loaded from the run's last.pt, or a new one
                optimizer.state[p] = r.optimizer.state[p]
        shared.append((optimizer, members))
    return shared


@torch.no_grad()
def _norms_per_run(stacked: list[torch.Tensor]) -> torch.Tensor:
    """(K,) L2 norms, one per run, of stacked tensors (K, ...) such as the gradients, by the rule of a solo
    run's `init.total_grad_norm` (float64, non-finite exactly when a run's values are): the norms of every
    tensor's K run slices, then per run the root of their sum of squares."""
    k = stacked[0].shape[0]
    return l2_norms([t[i] for t in stacked for i in range(k)]).view(len(stacked), k).pow(2).sum(0).sqrt()


@torch.no_grad()
def _clip(g: _Group, norms: torch.Tensor) -> None:
    """Each run's optim.grad_clip, on the stacked gradients: torch.nn.utils.clip_grad_norm_'s rule
    g <- g * min(1, max_norm / (||g|| + 1e-6)), with max_norm = inf for a run without clipping."""
    if g.clip_limits is None:
        return
    coef = (g.clip_limits / (norms + 1e-6)).clamp(max=1.0)
    for p in g.s_params.values():
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype).view(-1, *[1] * (p.grad.dim() - 1)))


def _after_step(g: _Group, r: _Run) -> None:
    """What follows a step for one run, as the solo loop's hooks: its metrics (read every log_every steps and
    before a probe or a checkpoint, where a non-finite step ends the run as diverged), a probe, a checkpoint."""
    r.step = g.step
    try:
        r.metrics.after_step(r, r.pending)
    except StopRun as stop:
        g.finish(r, stop.status, stop.steps, **stop.extra)
        return
    step, plan = g.step, g.plan
    if g.prober is not None and step in plan.probe_steps and step != plan.total_steps:
        _probe(g, r, step, plan.probe_steps[step])
    if step in plan.checkpoint_steps:
        save_checkpoint(r.state(), r.run.checkpoints / "last.pt")
        _save_student(r, step, r.run.checkpoints / f"student_step{step}.pt")


def _flushed(g: _Group, r: _Run) -> bool:
    """Read the run's last steps; False (and the run ends as diverged) if one of them was non-finite."""
    try:
        r.metrics.flush(r)
        return True
    except StopRun as stop:
        g.finish(r, stop.status, stop.steps, **stop.extra)
        return False


def _interrupt(g: _Group, signum: int) -> None:
    """SIGTERM/SIGINT: every active run writes its resumable state and ends as "interrupted"."""
    for _, r in g.active():
        if _flushed(g, r):
            save_checkpoint(r.state(), r.run.checkpoints / "last.pt")
            g.finish(r, "interrupted", g.step, signal=signal.Signals(signum).name)


def _complete(g: _Group, r: _Run) -> None:
    """The end of a run that trained all its steps: the final probe, last.pt, student.pt and summary.json."""
    if not _flushed(g, r):
        return
    # A stop inside the last step may have logged the final probe already (then it is not repeated).
    if g.prober is not None and not any(p.get("step") == g.step for p in r.run.probes()):
        _probe(g, r, g.step, g.step / g.plan.steps_per_epoch)
    if g.stop.signal is not None:  # stopped during the final probe: `_interrupt` ends the run
        return
    save_checkpoint(r.state(), r.run.checkpoints / "last.pt")
    _save_student(r, g.step, r.run.checkpoints / "student.pt")
    g.finish(r, "completed", g.step, final_loss=r.losses.epoch_mean())


def _start_run(cfg: Config, in_channels: int, size: int, device: torch.device) -> _Run:
    run = RunDir(cfg.run_dir()).create()
    open_data_folder(run, cfg)
    run.config_path.write_text(cfg.to_yaml())
    run.track(cfg)  # TensorBoard / W&B sinks mirror every run.log record, as in a solo run
    teacher, student = build_teacher_and_student(cfg, in_channels, size)
    r = _Run(cfg, teacher, student, init_report(teacher, student))
    teacher.to(device).eval().requires_grad_(False)  # the paper's frozen teacher in eval mode
    student.to(device).train()
    r.student_init.to(device)
    return r


def _resume_or_save_inits(runs: list[_Run], in_channels: int, size: int, preprocess) -> int:
    """Load each run's last.pt (all at one step), or write its teacher.pt and student_init.pt; the step."""
    step = 0
    for r in runs:
        last = r.run.checkpoints / "last.pt"
        if last.exists():
            state = load_checkpoint(last)
            check_config_digest(state.get("config_digest"), r.cfg, r.run.path)
            r.student.load_state_dict(state["student"])
            r.teacher.load_state_dict(state["teacher"])
            r.student_init.load_state_dict(state["student_init"])
            r.wall_before, r.init_info, r.rng = float(state["wall_time_s"]), state["init"], state["rng"]
            r.teacher_probe = state.get("teacher_probe") or None
            r.last_loss = float(state.get("last_loss", float("nan")))
            r.losses = LossMeans.from_dict(state.get("loss_means"))
            step = int(state["step"])
            r.run.truncate_after(step)
        else:
            for f in (r.run.metrics_path, r.run.summary_path):
                f.unlink(missing_ok=True)
            save_teacher(r.run.checkpoints / "teacher.pt", r.teacher.state_dict(), in_channels, size, preprocess)
            save_checkpoint({"model": r.student.state_dict(), "role": "student_init"},
                            r.run.checkpoints / "student_init.pt")
    return step


def _teacher_targets(runs: list[_Run], inputs, preprocess, batch: int, device) -> list[torch.Tensor]:
    """Each run's cached teacher bottleneck outputs (the same files a solo run reads or writes)."""
    from . import teacher_cache
    from ..data import resolve_root
    folder = resolve_root(runs[0].cfg.data.root) / "teacher-targets"
    return [teacher_cache.load_or_compute(r.cfg, r.teacher, inputs, preprocess, batch, device, folder)[0].to(device)
            for r in runs]


def _side_by_side(batches: list[torch.Tensor], channels_last: bool) -> torch.Tensor:
    """The K runs' batches as one (K, B, ...) tensor. Images in channels-last are laid out in memory as
    (B, H, W, K, C): the (B, K*C, H, W) input that vmap gives the first grouped convolution is then a
    channels-last view, and every layer after it keeps that layout (see stack_layers)."""
    if not channels_last:
        return torch.stack(batches)
    return torch.stack([b.permute(0, 2, 3, 1) for b in batches], dim=3).permute(3, 0, 4, 1, 2)


def _batch(inputs: torch.Tensor, idx: torch.Tensor, preprocess, device) -> torch.Tensor:
    x = inputs[idx.to(inputs.device, non_blocking=True)].to(device, non_blocking=True)  # no host round trip
    return preprocess(x) if preprocess is not None else x


class _HeadLast(nn.Module):
    """`head.last` as a forward, so that functional_call can apply it to cached teacher targets."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, z):
        return self.head.last(z)


def _stacked_losses(run: _Run, cfg: Config, cached: bool, channels_last: bool):
    """(K stacked student params, buffers, teacher params, buffers, inputs, teacher inputs) -> (K,) losses:
    one run's step (student and teacher outputs, the loss of `losses.distill_loss`) vmapped over K."""
    # the code of the step (the weights come stacked), with layers that keep the runs side by side in the channels
    student = fold_runs_into_channels(copy.deepcopy(run.student).to("meta"), channels_last)
    teacher = fold_runs_into_channels(copy.deepcopy(run.teacher).to("meta"), channels_last)
    last = _HeadLast(teacher.head)
    c = cfg.loss

    def one(sp, sb, tp, tb, x, t_in):
        s = functional_call(student, (sp, sb), (x,))
        with torch.no_grad():
            if cached:
                t = functional_call(last, {k: v for k, v in tp.items() if k.startswith("head.")}, (t_in,))
            else:
                t = functional_call(teacher, (tp, tb), (t_in,))
        return distill_loss(c.name, s, t, c.teacher_temp, c.student_temp)

    return vmap(one)


def _probe(g: _Group, r: _Run, step: int, epoch: float) -> None:
    """A probe record as a solo run writes it; none where a signal stops it (the run's resume makes it)."""
    try:
        with g.stop.interrupting():
            record = probe_record(g.prober, r, step, epoch)
    except Interrupted:
        return
    r.run.log(record)


def _save_student(r: _Run, step: int, path: Path) -> None:
    save_checkpoint({"model": _owned(r.student.state_dict()), "role": "student", "step": step}, path)


def _finish(r: _Run, plan: Plan, status: str, step: int, device, **extra) -> None:
    """summary.json as a solo run writes it."""
    r.status = status
    r.summary = run_summary(r.run, status=status, steps=step, epochs=step / plan.steps_per_epoch, wall=r.wall(),
                            init=r.init_info, digest=r.cfg.digest(), device=device, precision="fp32", **extra)
    r.run.write_summary(r.summary)
