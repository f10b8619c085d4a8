"""The plan of a run (which step does what) and its state (models, optimizer, counters), created or resumed.

Everything that a resumed run needs in order to continue bitwise is in `TrainState.payload()`: weights,
optimizer moments, the step, the bf16 switch, DINO's center, the RNG and the frozen teacher's probe.
The data order is a pure function of (seed, epoch) and the learning rate one of the step, so neither
is saved.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..data.augment import Augment, augmenter, local_side
from ..errors import UserError
from ..init import init_report, parameter_norm
from ..losses import Centering
from ..optim import build_optimizer, load_optimizer_state
from ..precision import Float64Start, fp32_state, uses_bf16
from ..runs.checkpoint import load_checkpoint, load_weights, save_checkpoint, save_teacher
from ..runs.rundir import RunDir, check_config_digest
from .distributed import Dist
from .setup import build_teacher_and_student, epoch_order, load_training_inputs, seeds, trains_channels_last


def probe_epochs(cfg: Config, total_epochs: float) -> list[float]:
    """The epochs at which a run of `total_epochs` probes: the start, the end, every train.probe_every, and
    train.probe_at."""
    marks = {0.0, float(total_epochs)}
    if cfg.train.probe_every > 0:
        e = cfg.train.probe_every
        while e < total_epochs - 1e-9:
            marks.add(round(e, 6))
            e += cfg.train.probe_every
    marks.update(float(e) for e in cfg.train.probe_at if 0 <= e <= total_epochs)
    return sorted(marks)


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """One permutation per epoch, not one per step (a randperm of 60,000 costs about a millisecond)."""
    return epoch_order(n, seed, epoch)


def steps_per_epoch(n: int, batch_size: int | None) -> int:
    """Optimizer steps of one pass over n samples in batches of `batch_size` (None or 0: the full batch; the
    last batch of an epoch may be smaller)."""
    return math.ceil(n / min(batch_size or n, n))


@dataclass(frozen=True)
class Plan:
    """Batch sizes, step counts and the steps at which probes, checkpoints and log records happen."""
    n: int
    batch: int
    micro: int
    steps_per_epoch: int
    total_steps: int
    data_seed: int
    log_every: int
    probe_steps: dict = field(default_factory=dict)       # step -> epoch
    checkpoint_steps: frozenset = frozenset()

    @classmethod
    def of(cls, cfg: Config, n: int) -> "Plan":
        batch = min(cfg.train.batch_size or n, n)
        per_epoch = steps_per_epoch(n, batch)
        total = max(1, math.ceil(cfg.train.epochs * per_epoch))
        if cfg.train.max_steps:
            total = min(total, cfg.train.max_steps)
        probes = {round(e * per_epoch): e for e in probe_epochs(cfg, total / per_epoch)}
        every = cfg.train.checkpoint_every
        stride = max(1, round(every * per_epoch)) if every > 0 else 0
        extra = {round(e * per_epoch) for e in cfg.train.checkpoint_at}
        ckpts = frozenset(range(stride, total, stride) if stride else ()) | {s for s in extra if 0 < s < total}
        return cls(n, batch, cfg.train.micro_batch or batch, per_epoch, total, seeds(cfg)["data"],
                   cfg.train.log_every, probes, ckpts)

    @property
    def total_epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def indices(self, step: int) -> torch.Tensor:
        """The global batch of optimizer step `step` (0-based)."""
        epoch, rows = self.batch_slice(step)
        return _epoch_order(self.n, self.data_seed, epoch)[rows]

    def batch_slice(self, step: int) -> tuple[int, slice]:
        """(epoch, the part of that epoch's data order) of optimizer step `step` (0-based)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        return epoch, slice(offset * self.batch, (offset + 1) * self.batch)

    def logs_at(self, step: int) -> bool:
        """Whether the step that brought the count to `step` writes a record."""
        return step % self.log_every == 0 or step == self.total_steps


def check_every_rank_has_rows(plan: Plan, world: int) -> None:
    """Refuse a data-parallel run whose smallest global batch (the epoch's last, when the batch does not
    divide n) has fewer images than processes: a process without rows has no loss to take part with."""
    smallest = plan.n % plan.batch or plan.batch
    if smallest < world:
        fix = f"--data.n_samples {plan.n - plan.n % plan.batch}" if plan.n % plan.batch else \
            f"--train.batch_size {world * math.ceil(plan.batch / world)}"
        raise UserError(f"the epoch's {'last ' if plan.n % plan.batch else ''}batch holds {smallest} images, fewer "
                        f"than the {world} processes: one would get none. Choose train.batch_size and "
                        f"data.n_samples so that every batch has at least {world} images (e.g. {fix}).")


def check_sync_bn_chunks(plan: Plan, world: int) -> None:
    """Refuse train.sync_bn where processes would run different numbers of micro-batches in a step:
    SyncBatchNorm gathers statistics over all processes in every forward and backward, so a process with
    one chunk more would wait forever for the others (each rank's shard of a batch is B // world or one
    more rows, cut into chunks of train.micro_batch)."""
    reached = {plan.batch} | ({plan.n % plan.batch} if plan.n % plan.batch and
                              plan.total_steps >= plan.steps_per_epoch else set())  # the epoch's last batch
    for batch in sorted(reached):
        shards = {batch // world, -(-batch // world)}
        chunks = {-(-rows // plan.micro) for rows in shards}
        if len(chunks) > 1:
            raise UserError(f"train.sync_bn with train.micro_batch {plan.micro}: a batch of {batch} images over "
                            f"{world} processes gives shards of {' and '.join(map(str, sorted(shards)))} images, "
                            f"cut into {' and '.join(map(str, sorted(chunks)))} micro-batches, and SyncBatchNorm "
                            "needs every process to run the same number. A micro batch of a whole shard gives one "
                            f"each: --train.micro_batch {-(-plan.batch // world)}.")


def check_local_crops(model: nn.Module, cfg: Config, in_channels: int, side: int) -> None:
    """Refuse, before training, a model that cannot take DINO's local crops of `side` px (a ViT's position
    embedding or a flattening encoder fix the input size; the convnet, VGG (ceil-mode pools) and ResNets
    pool adaptively and take any side). The forward runs on a copy on the meta device: shapes only."""
    shape_only = copy.deepcopy(model).to("meta")
    x = torch.zeros(2, in_channels, side, side, device="meta", dtype=next(model.parameters()).dtype)
    try:
        shape_only.eval().head(shape_only.encoder(x))
    except NotImplementedError:  # an operation without a meta kernel: the first step will tell
        return
    except (RuntimeError, ValueError, AssertionError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"data.local_crops: the encoder {cfg.model.encoder!r} cannot take {side} px local crops "
                        f"({why}); set --data.local_crop_size to a side it accepts (for the ViTs, flatten and mlp: the "
                        "image side), or use an encoder with adaptive pooling (convnet, vgg*, resnet*)") from None


@dataclass
class LossMeans:
    """Host sums of the per-step losses that MetricsLog reads from the device: since the last metrics record
    (that record's `loss_mean`: a read between records, before a probe or a checkpoint, loses no step) and
    over the current epoch (a run's `final_loss` is its last epoch's mean: one batch's loss varies more than
    the differences between runs that RT App. D, Fig. 17, plots). Saved with the checkpoint."""
    window_sum: float = 0.0
    window_n: int = 0
    epoch: int = -1
    epoch_sum: float = 0.0
    epoch_n: int = 0

    def add(self, step: int, loss: float, steps_per_epoch: int) -> None:
        """The loss of `step` (the count of steps done: step 1 is the first of epoch 0)."""
        epoch = (step - 1) // steps_per_epoch
        if epoch != self.epoch:
            self.epoch, self.epoch_sum, self.epoch_n = epoch, 0.0, 0
        self.epoch_sum += loss
        self.epoch_n += 1
        self.window_sum += loss
        self.window_n += 1

    def take_window(self) -> float:
        """The mean since the last call, and a new window."""
        mean = self.window_sum / self.window_n if self.window_n else float("nan")
        self.window_sum, self.window_n = 0.0, 0
        return mean

    def epoch_mean(self) -> float:
        return self.epoch_sum / self.epoch_n if self.epoch_n else float("nan")

    @classmethod
    def from_dict(cls, saved: dict | None) -> "LossMeans":
        return cls(**saved) if saved else cls()  # checkpoints written before the sums were kept


def keep_running_statistics(teacher: nn.Module) -> None:
    """A frozen teacher in train mode (teacher.train_mode) normalizes by each batch's statistics without
    updating its batch norms' running averages: those, which eval mode and so its probes use, stay as drawn,
    and the teacher probed at every step is teacher.pt."""
    for m in teacher.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False


@dataclass
class TrainState:
    cfg: Config
    run: RunDir
    ddp: Dist
    device: torch.device
    plan: Plan
    teacher: nn.Module
    student: nn.Module
    student_init: nn.Module
    optimizer: torch.optim.Optimizer
    centering: Centering | None
    inputs: torch.Tensor                     # uint8 images (or bf16 noise / API floats), sliced per batch
    preprocess: object | None
    in_channels: int
    image_size: int
    bf16_requested: bool                     # the run is a bf16 run (it starts in fp32 until the gate opens)
    conv_like: bool                          # channels-last inputs
    init_info: dict
    gate: Float64Start                       # the float64 start (precision.py)
    step: int = 0
    bf16_on: bool = False
    wall_before: float = 0.0
    teacher_probe: dict | None = None
    targets: torch.Tensor | None = None      # the teacher cache's bottleneck outputs, one row per image
    augment: Augment | None = None           # data.augment, applied to each batch on the device
    teacher_norm: float = 0.0                # ||theta_T|| at the start: the bf16 gate's scale
    last_loss: float = float("nan")          # the loss of the last step read from the device
    losses: LossMeans = field(default_factory=LossMeans)
    t_start: float = 0.0                     # set by start_clock() as the first step begins
    rng: dict | None = None                  # the random state to save; None: the process's, as it is then

    @property
    def last_path(self) -> Path:
        return self.run.checkpoints / "last.pt"

    @classmethod
    def create_or_resume(cls, cfg: Config, run: RunDir, ddp: Dist, device: torch.device, *,
                         train_data=None, encoder=None) -> "TrainState":
        torch.manual_seed(cfg.train.seed)
        inputs, preprocess, data, size = load_training_inputs(cfg, train_data, builtin_encoder=encoder is None)
        in_channels = data.images.shape[1]
        gate = Float64Start(cfg.train.float64_until_distance)
        teacher, student = build_teacher_and_student(cfg, in_channels, size, encoder, gate.init_dtype)
        if cfg.data.local_crops:
            check_local_crops(student, cfg, in_channels, cfg.data.local_crop_size or local_side(size))
        init_info = init_report(teacher, student)
        gate.start(teacher, student)
        teacher.to(device)
        student.to(device)
        teacher.train(cfg.teacher.train_mode)
        if cfg.teacher.mode == "frozen":
            keep_running_statistics(teacher)
        teacher.requires_grad_(False)
        student.train()
        bf16 = uses_bf16(cfg.train.precision, device)
        conv_like = trains_channels_last(cfg, inputs, student.encoder, device, bf16)
        if conv_like:
            teacher.to(memory_format=torch.channels_last)
            student.to(memory_format=torch.channels_last)
        plan = Plan.of(cfg, len(inputs))
        check_every_rank_has_rows(plan, ddp.world)
        if cfg.train.sync_bn and ddp.enabled:
            check_sync_bn_chunks(plan, ddp.world)
        state = cls(cfg, run, ddp, device, plan, teacher, student,
                    copy.deepcopy(student).requires_grad_(False), build_optimizer(cfg.optim, student.parameters()),
                    Centering(cfg.loss.center_momentum) if cfg.loss.center else None, inputs, preprocess,
                    in_channels, size, bf16, conv_like, init_info, gate)
        if state.last_path.exists():
            state._resume(load_checkpoint(state.last_path))
        elif ddp.is_main:
            state._start_fresh()
        if cfg.train.data_on_device:
            state.inputs = inputs.to(device)  # one tensor on the device; batches are slices of it
        if not state.teacher_norm:  # a resume keeps the start's: a moving teacher's norm changes
            state.teacher_norm = parameter_norm(teacher)
        state.augment = augmenter(cfg.data.augment, preprocess, seeds(cfg)["data"], in_channels,
                                  cfg.data.local_crops, cfg.data.local_crop_size)
        return state

    def _resume(self, saved: dict) -> None:
        check_config_digest(saved.get("config_digest"), self.cfg, self.run.path)  # a hand-edited config.yaml
        self.gate.load_state_dict(saved.get("precision"), [self.teacher, self.student, self.student_init],
                                  self.optimizer)
        load_weights(self.student, saved["student"], self.last_path)  # another architecture's checkpoint
        self.teacher.load_state_dict(saved["teacher"])
        self.student_init.load_state_dict(saved["student_init"])
        load_optimizer_state(self.optimizer, saved["optimizer"])
        self.step = int(saved["step"])
        self.wall_before = float(saved["wall_time_s"])
        self.bf16_on = bool(saved["bf16_on"])
        self.init_info = saved["init"]
        if self.centering is not None and saved.get("center") is not None:
            self.centering.center = saved["center"].to(self.device)
        torch.set_rng_state(saved["rng"]["torch"])
        self.teacher_probe = saved.get("teacher_probe") or None
        self.last_loss = float(saved.get("last_loss", float("nan")))  # a kill after the final checkpoint
        self.losses = LossMeans.from_dict(saved.get("loss_means"))
        self.teacher_norm = float(saved.get("teacher_norm", 0.0))
        if self.ddp.is_main:
            self.run.truncate_after(self.step)

    def _start_fresh(self) -> None:
        for f in (self.run.metrics_path, self.run.summary_path):
            f.unlink(missing_ok=True)
        self.save_teacher("teacher.pt")
        save_checkpoint({"model": fp32_state(self.student), "role": "student_init"},
                        self.run.checkpoints / "student_init.pt")

    def start_clock(self) -> None:
        self.t_start = time.perf_counter()

    def wall(self) -> float:
        """Seconds of training so far, over every process that ran this run (setup excluded)."""
        return self.wall_before + time.perf_counter() - self.t_start

    def payload(self) -> dict:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "student_init": self.student_init.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "wall_time_s": self.wall(), "bf16_on": self.bf16_on, "init": self.init_info,
                "center": self.centering.center if self.centering is not None else None,
                "rng": self.rng or {"torch": torch.get_rng_state()}, "teacher_probe": self.teacher_probe or {},
                "precision": self.gate.state_dict(), "config_digest": self.cfg.digest(), "last_loss": self.last_loss,
                "loss_means": asdict(self.losses), "teacher_norm": self.teacher_norm}

    def save(self) -> None:
        """The resumable state, atomically, to checkpoints/last.pt (rank 0 writes)."""
        if self.ddp.is_main:
            save_checkpoint(self.payload(), self.last_path)

    def save_teacher(self, name: str) -> None:
        """The teacher as it is now: teacher.pt at the start; at the end teacher_final.pt too where the teacher
        moves (teacher.mode ema or previous-epoch), which the run's last probe measured."""
        if self.ddp.is_main:
            save_teacher(self.run.checkpoints / name, fp32_state(self.teacher), self.in_channels, self.image_size,
                         self.preprocess, self.step)

    def save_student(self, name: str) -> None:
        if self.ddp.is_main:
            save_checkpoint({"model": fp32_state(self.student), "role": "student", "step": self.step},
                            self.run.checkpoints / name)
