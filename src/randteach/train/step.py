"""One optimizer step of distillation, without a host round trip.

`train_step` runs the micro-batches of one global batch (teacher targets, student forward, loss,
backward; with `data.local_crops`, DINO's multi-crop: the teacher on the 2 global views, the student on
all of them), lets DistributedDataParallel all-reduce the gradients once per step, clips, and updates.
What it returns stays on the device (`StepMetrics`): the loop reads it every `train.log_every` steps,
so a GPU never waits for the host between steps. The one exception is the bf16 gate while it is
still closed: it needs ||theta_S - theta_T|| on the host before the step (see `bf16_gate`).

`train.compile` on a GPU compiles the student's forward, its head, the loss and (through AOTAutograd)
their backward as one graph, and the teacher's forward as another; `train.cuda_graphs` also records both
as CUDA graphs. On a CPU it compiles the loss and the teacher's head and leaves the encoders and the
student's head eager (see `_cpu_compiled_parts`). Shapes are static (`dynamic=False`), and the compiled
forms run only at the shapes of a full batch and in the run's final precision (`StepFunctions.for_chunk`):
one graph per run each.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..data.augment import multicrop_loss
from ..errors import UserError
from ..init import l2_total, parameter_distance, total_grad_norm
from ..losses import distill_loss
from ..optim import set_lr
from ..precision import Float64Start, autocast
from .state import TrainState


class StudentForward(nn.Module):
    """x -> the student's head outputs: the encoder under the precision gate, the head in fp32.

    One module, so that DistributedDataParallel can wrap the whole student forward. The heads run in
    fp32: with the paper's head (unit bottleneck, unit rows, 2^16 outputs, temperature 1) the logits are
    cosines of about 0.06 and the softmax is nearly uniform, and bf16's 8-bit rounding of them drowns the
    teacher-student difference (VGG11 on an H100, Fashion-MNIST, 5 epochs: student linear probe 53 %
    under a bf16 head, 83 % in fp32)."""

    def __init__(self, model: nn.Module, device: torch.device, gate: Float64Start):
        super().__init__()
        self.model, self.device, self.gate = model, device, gate

    def forward(self, views: list[torch.Tensor], bf16: bool) -> list[torch.Tensor]:
        """The head outputs of each view. Consecutive views of one shape go through the encoder as one
        batch (the global crops together, the local crops together, as DINO's MultiCropWrapper does); the
        head takes all their features at once."""
        with autocast(self.device, bf16):  # the encoder only
            features = [self.model.encoder(_cat(group)) for group in _same_shape_runs(views)]
        out = self.model.head(self.gate.cast(_cat(features)))  # fp32 (float64 in the float64 start)
        return list(out.split([len(v) for v in views]))


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)  # one view: no copy


def _same_shape_runs(views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The views split where their image shape changes: [g1, g2, l1, l2, l3] -> [[g1, g2], [l1, l2, l3]]."""
    runs: list[list[torch.Tensor]] = []
    for v in views:
        if runs and runs[-1][0].shape[1:] == v.shape[1:]:
            runs[-1].append(v)
        else:
            runs.append([v])
    return runs


@dataclass
class StepFunctions:
    """What one micro-batch runs: the eager functions, and with train.compile their compiled forms, used for
    the batches of the run's final shapes and precision (`for_chunk`)."""
    student: nn.Module                        # StudentForward, DDP-wrapped when distributed
    teacher_out: Callable                     # (x, cached, bf16) -> teacher head outputs, no gradient
    student_loss: Callable                    # (student views, teacher outputs per view, bf16) -> batch-mean loss
    dtype: torch.dtype = torch.float32        # the models' dtype they were built for (float64 start)
    graphs: bool = False                      # CUDA graphs: mark each step's start
    compiled: tuple[Callable, Callable] | None = None   # (teacher_out, student_loss) compiled
    static_rows: frozenset[int] = frozenset()            # the micro-batch sizes of a full global batch

    def for_chunk(self, rows: int, final_precision: bool) -> tuple[Callable, Callable]:
        """(teacher_out, student_loss) for a micro-batch of `rows` rows. The compiled forms run only at the
        shapes of a full batch and in the run's final precision: the epoch's last, partial batch and the
        phases before it (the float64 start, fp32 until the bf16 gate opens) run eager, so each compiled
        function compiles one graph per run instead of one per shape and precision (a GPU compile takes
        about a minute, a CPU one tens of seconds)."""
        if self.compiled is not None and final_precision and rows in self.static_rows:
            return self.compiled
        return self.teacher_out, self.student_loss


@dataclass
class StepMetrics:
    """One step's values, on the device."""
    loss: torch.Tensor                        # float64: this rank's share of the global-batch mean loss
    grad_norm: torch.Tensor                   # float64: ||grad||_2 after the all-reduce, before clipping
    lr: float
    bf16: bool
    param_norm: torch.Tensor | None = None    # float64: ||theta||_2 after the step (log_every > 1: see train_step)


def build_step_functions(state: TrainState) -> StepFunctions:
    cfg, device = state.cfg, state.device
    if cfg.train.cuda_graphs and cfg.train.compile and device.type != "cuda":
        raise UserError(f"train.cuda_graphs=true needs a CUDA device, but the run is on {device}; "
                        "set --train.cuda_graphs false")
    student = state.ddp.wrap(StudentForward(state.student, device, state.gate), sync_bn=cfg.train.sync_bn)
    eager = _Parts(state.teacher.head, state.teacher.head.last, _loss_function(cfg))
    fns = StepFunctions(student, *_functions(state, student, eager), state.gate.dtype)
    if not cfg.train.compile:
        return fns
    compiled = _compiler(cfg)
    if device.type == "cpu":
        fns.compiled = _functions(state, student, _cpu_compiled_parts(state, compiled))
    else:
        fns.compiled = _whole_step_compiled(fns, compiled)
        fns.graphs = cfg.train.cuda_graphs
    full_batch = state.ddp.shard(torch.arange(state.plan.batch))
    fns.static_rows = frozenset(len(chunk) for chunk in full_batch.split(state.plan.micro))
    return fns


def _compiler(cfg) -> Callable:
    mode = "reduce-overhead" if cfg.train.cuda_graphs else None
    return lambda fn: torch.compile(fn, dynamic=False, mode=mode)


@dataclass
class _Parts:
    """The pieces of the step a compile scope may replace: the teacher's head, its last layer (applied to
    cached bottleneck outputs) and the loss."""
    teacher_head: Callable
    teacher_last: Callable
    loss: Callable


def _loss_function(cfg) -> Callable:
    c = cfg.loss
    return lambda s, t: distill_loss(c.name, s, t, c.teacher_temp, c.student_temp)


def _whole_step_compiled(fns: StepFunctions, compiled: Callable) -> tuple[Callable, Callable]:
    """train.compile on a GPU: the teacher's outputs and the student's loss (encoder, heads, loss; AOTAutograd
    compiles its backward), each compiled whole. Both trace as one graph each, without a break, in fp32 and
    bf16, with the teacher cache and with multi-crop views (tested on the CPU with fullgraph=True)."""
    return compiled(fns.teacher_out), compiled(fns.student_loss)


def _cpu_compiled_parts(state: TrainState, compiled: Callable) -> _Parts:
    """train.compile on a CPU: the loss (with its backward) and the teacher's head (a forward without
    gradient) compiled; the encoders and the student's head eager. Inductor's CPU code for a conv encoder
    (max-pooling, ReLU and layout changes around oneDNN's convolutions) is slower than eager's kernels: the
    demo's step (convnet width 16, head 512-512-256-4096, batch 64) on one core of the development Xeon runs
    0.54-0.58x eager with the whole step compiled (benchmarks/cpu_step_parts.py). A compiled student head
    (forward and backward) gained the demo 3-6 % but cost VGG11's step under bf16 (batch 256, head
    2048-2048-256-4096) about 10 %; without it neither is slower than eager (docs/PERFORMANCE.md)."""
    teacher = state.teacher.head
    return _Parts(compiled(lambda z: teacher(z)), compiled(lambda z: teacher.last(z)),
                  compiled(_loss_function(state.cfg)))


def _functions(state: TrainState, student: nn.Module, parts: _Parts) -> tuple[Callable, Callable]:
    """(teacher_out, student_loss) of one micro-batch, built from `parts`."""
    device, gate, teacher = state.device, state.gate, state.teacher

    @torch.no_grad()
    def teacher_out(x: torch.Tensor, cached: torch.Tensor | None, bf16: bool) -> torch.Tensor:
        if cached is not None:  # the cache: only the head's last layer runs per step
            return parts.teacher_last(cached)
        with autocast(device, bf16):  # the float64 start runs the live teacher in float64
            features = teacher.encoder(x)
        return parts.teacher_head(gate.cast(features))

    def student_loss(views: list[torch.Tensor], t: list[torch.Tensor], bf16: bool) -> torch.Tensor:
        s = student(views, bf16)
        if len(views) == 1:  # one view (the papers): the student matches the teacher on the same image
            return parts.loss(s[0], t[0])
        return multicrop_loss(t, s, parts.loss)

    return teacher_out, student_loss


def bf16_gate(state: TrainState) -> bool:
    """bf16 cannot see a student that sits within fp32 resolution of its teacher: the loss and gradient
    are exactly 0 there. Stay in fp32 until ||theta_S - theta_T|| > bf16_after_distance * ||theta_T||,
    then stay in bf16 (one host read per step while the gate is closed, none after)."""
    if state.bf16_requested and not state.bf16_on and not state.gate.active:
        state.bf16_on = parameter_distance(state.student, state.teacher) > \
            state.cfg.train.bf16_after_distance * state.teacher_norm
    return state.bf16_on


def _views(state: TrainState, rows: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the teacher's views, the student's views) of the images `rows`: one view that both see, or with
    data.local_crops DINO's 2 global views for the teacher and those plus the local crops for the student."""
    x = state.inputs[rows].to(state.device, non_blocking=True)
    x = state.preprocess(x) if state.preprocess is not None else x
    if state.augment.local_crops:
        teacher, student = state.augment.views(x, state.step, rows)
    else:
        teacher = student = [state.augment(x, state.step, rows)]  # data.augment: a no-op for none
    student = [_layout(state, state.gate.cast(v)) for v in student]  # float64 during the float64 start
    return student[:len(teacher)], student                           # the teacher's views lead the list


def _cached_targets(state: TrainState, rows: torch.Tensor) -> torch.Tensor | None:
    """The teacher cache's bottleneck outputs of `rows`, or None where the live teacher runs (no cache, or
    the float64 start). Gathered here, outside any compiled function: a compiled function that read the
    whole table would take it as an input, which CUDA graphs copy into their own buffer at every replay."""
    if state.targets is None or state.gate.active:
        return None
    return state.targets[rows.to(state.targets.device, non_blocking=True)]


def _layout(state: TrainState, x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if state.conv_like else x


def train_step(state: TrainState, fns: StepFunctions, idx: torch.Tensor, lr: float) -> StepMetrics:
    """One optimizer step on the global batch `idx` (this rank takes its shard, in micro-batches)."""
    set_lr(state.optimizer, lr)
    bf16 = bf16_gate(state)
    state.optimizer.zero_grad(set_to_none=True)
    if fns.graphs:
        torch.compiler.cudagraph_mark_step_begin()
    # the rows go where the images are once per step (the cache's targets are there too unless the images stay
    # on the host); non_blocking: a blocking copy to a GPU first waits for all queued work, a host round trip
    idx = idx.to(state.inputs.device, non_blocking=True)
    chunks = state.ddp.shard(idx).split(state.plan.micro)
    final_precision = not state.gate.active and bf16 == state.bf16_requested
    loss = torch.zeros((), dtype=torch.float64, device=state.device)
    center_sum = 0.0
    for i, rows in enumerate(chunks):
        teacher_out, student_loss = fns.for_chunk(len(rows), final_precision)
        teacher_views, student_views = _views(state, rows)
        t = teacher_out(_cat(teacher_views), _cached_targets(state, rows), bf16)
        if state.centering is not None:  # DINO: every chunk centered by the step's center, updated after it
            center_sum = center_sum + t.detach().float().sum(0)
            t = state.centering.apply(t)
        t = list(t.split(len(rows)))
        # DDP averages gradients over ranks: weighting each chunk by its share of the *global* batch times
        # the world size makes the average the gradient of the global-batch mean, for any number of ranks.
        sync = contextlib.nullcontext() if i == len(chunks) - 1 else state.ddp.no_sync(fns.student)
        with sync:
            chunk_loss = student_loss(student_views, t, bf16)
            (chunk_loss * (len(rows) * state.ddp.world / len(idx))).backward()
        loss = loss + chunk_loss.detach().double() * (len(rows) / len(idx))
    if state.centering is not None:  # the teacher's views of the whole global batch, over all processes
        state.centering.update(state.ddp.sum_(center_sum), len(idx) * len(teacher_views))
    grad_norm = total_grad_norm(state.student.parameters())
    if state.cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(state.student.parameters(), state.cfg.optim.grad_clip)
    state.optimizer.step()
    return StepMetrics(loss, grad_norm, lr, bf16, _param_norm(state))


def _param_norm(state: TrainState) -> torch.Tensor | None:
    """||theta||_2 of the student after the step, kept on the device, where the metrics are read only every
    train.log_every > 1 steps: an update that leaves a non-finite weight behind a finite loss and gradient is
    then still found at its own step (at log_every 1 the distances read after each step find it)."""
    if state.plan.log_every == 1:
        return None
    return l2_total([p.detach() for p in state.student.parameters()])
