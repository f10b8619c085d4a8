"""The distillation loop: a student is trained to match a frozen, randomly initialized teacher.

No labels and no augmentation: teacher and student see the same image. Per step the loop logs loss,
gradient norm, the student's distance from the teacher and from its own init, and the learning rate
to metrics.jsonl; it probes teacher, student and raw input at the configured epochs; it checkpoints
atomically, resumes bitwise-exactly on CPU, stops cleanly with status "diverged" on a non-finite loss
or parameter, and with status "interrupted" on SIGTERM/SIGINT (after writing a resumable checkpoint).
"""
from __future__ import annotations

import copy
import math
import platform
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, load_state_dict, save_checkpoint
from .config import Config, config_from_dict
from .data import ImageData, Preprocess, load_configured, noise_like, stratified_subset
from .distributed import from_environment
from . import teacher_cache
from .errors import UserError
from .evaluate import Prober, autocast, exact_fp32, uses_bf16
from .init import (exact_copy, gradient_norm, init_report, locality_init, neighborhood_init, parameter_distance,
                   parameter_norm)
from .losses import Centering, distill_loss
from .models import DistillModel, build_model
from .optim import build_optimizer, lr_at, set_lr
from .rundir import RunDir, write_json

_SEED_STRIDE = 1_000_003  # separates the teacher, fresh-init and data-order streams of one train.seed
NEEDS_32PX = ("vgg", "resnet", "vit")
PYTHON_OBJECTS = "python_objects.json"  # marks a run whose encoder or data came from the Python API


@dataclass
class RunResult:
    path: Path
    summary: dict


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is available; use --train.device cpu (or auto)")
    return torch.device(name)


def model_image_size(cfg: Config, native: int) -> int:
    """VGG/ResNet/ViT need 32 px inputs at least (five 2x poolings, patch 8): 28 px images are zero-padded."""
    if cfg.data.image_size:
        return cfg.data.image_size
    if cfg.model.encoder.startswith(NEEDS_32PX) and native < 32:
        return 32
    return native


def seeds(cfg: Config) -> dict:
    s = cfg.train.seed
    return {"teacher": cfg.init.teacher_seed if cfg.init.teacher_seed is not None else s * 3 + 1,
            "fresh": cfg.init.fresh_seed if cfg.init.fresh_seed is not None else s * 3 + 2,
            "data": s * 3 + 3}


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a pure function of (seed, epoch), so a resumed run replays it."""
    g = torch.Generator().manual_seed(seed * _SEED_STRIDE + epoch)
    return torch.randperm(n, generator=g)


def build_teacher_and_student(cfg: Config, in_channels: int, image_size: int, encoder=None):
    """Teacher (random init, or a checkpoint) and the student by the configured init rule.

    `encoder` (Python API): a factory or module instance that replaces cfg.model.encoder."""
    sd = seeds(cfg)
    teacher = build_model(cfg, in_channels, image_size, seed=sd["teacher"], encoder=encoder)
    if cfg.init.teacher_checkpoint:
        teacher.load_state_dict(load_state_dict(cfg.init.teacher_checkpoint, "student"))
    mode = cfg.init.mode
    if mode == "copy":
        return teacher, exact_copy(teacher)
    if mode == "checkpoint":
        student = exact_copy(teacher)
        student.load_state_dict(load_state_dict(cfg.init.checkpoint, "student"))
        return teacher, student
    fresh = build_model(cfg, in_channels, image_size, seed=sd["fresh"], encoder=encoder)
    if mode == "independent":
        return teacher, fresh
    if mode == "neighborhood":
        return teacher, neighborhood_init(teacher, fresh, cfg.init.epsilon)
    return teacher, locality_init(teacher, fresh, cfg.init.alpha, cfg.init.variance_preserving)


def load_training_inputs(cfg: Config, train_data: ImageData | None = None):
    """(inputs, preprocess, data): uint8 images + their preprocess, or float noise (preprocess None)."""
    data = train_data or load_configured(cfg.data, "train")
    if cfg.data.n_samples:
        if cfg.data.n_samples > len(data):
            raise UserError(f"data.n_samples={cfg.data.n_samples} but {data.name} has only {len(data)} training images")
        data = data.subset(stratified_subset(data.labels, cfg.data.n_samples, seed=cfg.data.subset_seed))
    native = data.images.shape[-1]
    if data.images.is_floating_point():  # Python API: float images are used as given
        return data.images, None, data, native
    size = model_image_size(cfg, native)
    preprocess = Preprocess.fit(data, size=size)
    if cfg.data.inputs == "noise":
        # Gaussian inputs of the same shape as the (padded) images, in normalized units.
        shaped = ImageData(torch.zeros((len(data), data.images.shape[1], size, size), dtype=torch.uint8),
                           data.labels, data.num_classes, data.name)
        return noise_like(shaped, std=cfg.data.noise_std, seed=cfg.data.subset_seed), None, data, size
    return data.images, preprocess, data, size


def _freeze(teacher: nn.Module, train_mode: bool) -> None:
    teacher.train(train_mode)
    for p in teacher.parameters():
        p.requires_grad_(False)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits at the end of the current step."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _probe_epochs(cfg: Config, total_epochs: float) -> list[float]:
    marks = {0.0, float(total_epochs)}
    if cfg.train.probe_every > 0:
        e = cfg.train.probe_every
        while e < total_epochs - 1e-9:
            marks.add(round(e, 6))
            e += cfg.train.probe_every
    marks.update(float(e) for e in cfg.train.probe_at if 0 <= e <= total_epochs)
    return sorted(marks)


def _checkpoint_steps(cfg: Config, steps_per_epoch: int, total_steps: int) -> set[int]:
    every = cfg.train.checkpoint_every
    if every <= 0:
        return set()
    stride = max(1, round(every * steps_per_epoch))
    return set(range(stride, total_steps, stride))


def distill(cfg: Config, *, resume: bool = False, progress: bool = True, train_data: ImageData | None = None,
            encoder=None, probe_splits: tuple[ImageData, ImageData] | None = None) -> RunResult:
    """Run (or resume, or skip if already completed) the distillation described by `cfg`.

    train_data, encoder, probe_splits: objects from the Python API (`randteach.distill`) that replace
    cfg.data.name, cfg.model.encoder and the probe data set."""
    with exact_fp32():
        return _distill(cfg, resume=resume, progress=progress, train_data=train_data, encoder=encoder,
                        probe_splits=probe_splits)


def _distill(cfg: Config, *, resume: bool, progress: bool, train_data: ImageData | None, encoder,
             probe_splits: tuple[ImageData, ImageData] | None) -> RunResult:
    run = RunDir(cfg.run_dir())
    existing = run.summary()
    last_path = run.checkpoints / "last.pt"
    if run.config_path.exists():  # checked first: a finished run of another config is not this run's result
        import yaml
        saved = config_from_dict(yaml.safe_load(run.config_path.read_text()))
        if saved.digest() != cfg.digest():
            raise UserError(f"{run.path} holds a run with a different config; choose another --out, "
                            f"or resume it with `randteach distill --resume {run.path}`")
    if existing and existing.get("status") in ("completed", "diverged"):
        return RunResult(run.path, existing)
    resuming = last_path.exists()
    device = resolve_device(cfg.train.device)
    ddp = from_environment(device)
    if ddp.enabled and device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
    if ddp.is_main:
        run.create()
        run.config_path.write_text(cfg.to_yaml())
        if encoder is not None or train_data is not None or probe_splits is not None:
            # config.yaml cannot name Python objects: mark the run so the CLI refuses to resume it wrongly.
            write_json(run.path / PYTHON_OBJECTS, {"encoder": encoder is not None, "train": train_data is not None,
                                                   "probe": probe_splits is not None})
    ddp.barrier()
    torch.manual_seed(cfg.train.seed)
    inputs, preprocess, data, size = load_training_inputs(cfg, train_data)
    in_channels = data.images.shape[1]
    teacher, student = build_teacher_and_student(cfg, in_channels, size, encoder)
    init_info = init_report(teacher, student)
    teacher.to(device)
    student.to(device)
    _freeze(teacher, cfg.teacher.train_mode)
    student.train()
    student_init = copy.deepcopy(student).requires_grad_(False)
    optimizer = build_optimizer(cfg.optim, student.parameters())
    centering = Centering(cfg.loss.center_momentum) if cfg.loss.center else None

    n = len(inputs)
    batch = cfg.train.batch_size or n
    batch = min(batch, n)
    steps_per_epoch = math.ceil(n / batch)
    total_steps = max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    total_epochs = total_steps / steps_per_epoch
    probe_steps = {round(e * steps_per_epoch): e for e in _probe_epochs(cfg, total_epochs)}
    ckpt_steps = _checkpoint_steps(cfg, steps_per_epoch, total_steps)
    data_seed = seeds(cfg)["data"]
    micro = cfg.train.micro_batch or batch
    use_bf16_requested = uses_bf16(cfg.train.precision, device)
    conv_like = inputs.dim() == 4 and cfg.train.channels_last and use_bf16_requested
    if conv_like:
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)

    step = 0
    wall_before = 0.0
    bf16_on = False
    teacher_probe: dict | None = None
    if resuming:
        state = load_checkpoint(last_path)
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        student_init.load_state_dict(state["student_init"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        wall_before = float(state["wall_time_s"])
        bf16_on = bool(state["bf16_on"])
        init_info = state["init"]
        if centering is not None and state.get("center") is not None:
            centering.center = state["center"].to(device)
        torch.set_rng_state(state["rng"]["torch"])
        if ddp.is_main:
            run.truncate_after(step)
        teacher_probe = state.get("teacher_probe") or None
    elif ddp.is_main:
        for f in (run.metrics_path, run.summary_path):
            f.unlink(missing_ok=True)
        save_checkpoint({"model": teacher.state_dict(), "role": "teacher", "in_channels": in_channels,
                         "image_size": size}, run.checkpoints / "teacher.pt")
        save_checkpoint({"model": student.state_dict(), "role": "student_init"}, run.checkpoints / "student_init.pt")

    if cfg.train.data_on_device:
        inputs = inputs.to(device)  # one tensor on the device; batches are slices of it
    student_enc, teacher_enc = student.encoder, teacher.encoder
    if cfg.train.compile:
        student_enc, teacher_enc = torch.compile(student.encoder), torch.compile(teacher.encoder)
    targets = None
    if cfg.train.teacher_cache:
        ok, why = teacher_cache.usable(cfg)
        if not ok:
            raise UserError(f"train.teacher_cache=true cannot be used: {why}; set --train.teacher_cache false")
        from .data import resolve_root
        targets, origin = teacher_cache.load_or_compute(
            teacher, inputs, preprocess, batch, device, resolve_root(cfg.data.root) / "teacher-targets", conv_like)
        targets = targets.to(device)
        if progress and ddp.is_main:
            print(f"teacher targets: {origin}")
    prober = Prober(cfg, in_channels, size, device, bf16=use_bf16_requested, splits=probe_splits) \
        if cfg.probe.which and ddp.is_main else None
    teacher_norm = parameter_norm(teacher)
    t_start = time.perf_counter()

    def wall() -> float:
        return wall_before + time.perf_counter() - t_start

    def save_state(path: Path) -> None:
        if not ddp.is_main:
            return
        save_checkpoint({"student": student.state_dict(), "teacher": teacher.state_dict(),
                         "student_init": student_init.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step, "wall_time_s": wall(), "bf16_on": bf16_on, "init": init_info,
                         "center": centering.center if centering is not None else None,
                         "rng": _rng_state(), "teacher_probe": teacher_probe or {}}, path)

    def do_probe(epoch: float) -> dict:
        nonlocal teacher_probe
        record = {"event": "probe", "step": step, "epoch": epoch}
        if "teacher" in cfg.probe.which:
            if cfg.teacher.mode != "frozen":
                teacher_probe = prober.probe(teacher.encoder)
            elif teacher_probe is None:
                teacher_probe = prober.frozen(teacher.encoder)
            record["teacher"] = teacher_probe
        if "student" in cfg.probe.which:
            record["student"] = prober.probe(student.encoder)
        if "input" in cfg.probe.which:
            record["input"] = prober.input()
        run.log(record)
        return record

    def log(record: dict) -> None:
        if ddp.is_main:
            run.log(record)

    def save_model(path: Path) -> None:
        if ddp.is_main:
            save_checkpoint({"model": student.state_dict(), "role": "student", "step": step}, path)

    def finish(status: str, **extra) -> RunResult:
        ddp.barrier()
        if not ddp.is_main:
            return RunResult(run.path, {"status": status, "steps": step, "rank": ddp.rank})
        probes = run.probes()
        final = probes[-1] if probes else {}
        summary = {"status": status, "steps": step, "epochs": step / steps_per_epoch, "wall_time_s": wall(),
                   "probe": {k: final[k] for k in ("teacher", "student", "input") if k in final},
                   "init": init_info, "config_digest": cfg.digest(), "device": str(device),
                   "precision": "bf16" if use_bf16_requested else "fp32", "torch": torch.__version__, "host": platform.node(), **extra}
        run.write_summary(summary)
        return RunResult(run.path, summary)

    last_loss = float("nan")
    bar = tqdm(total=total_steps, initial=step, disable=not progress or not ddp.is_main, desc=f"distill {run.path.name}",
               unit="step", dynamic_ncols=True)
    with _StopFlag() as stop:
        if step == 0 and prober is not None and 0 in probe_steps:
            do_probe(0.0)
        while step < total_steps:
            epoch, offset = divmod(step, steps_per_epoch)
            idx = epoch_order(n, data_seed, epoch)[offset * batch:(offset + 1) * batch]
            lr = lr_at(cfg.optim, step, total_steps)
            set_lr(optimizer, lr)
            if use_bf16_requested and not bf16_on:
                # bf16 cannot see a student that sits within fp32 resolution of its teacher: the loss and
                # gradient are exactly 0 there. Stay in fp32 until the student has left the teacher.
                bf16_on = parameter_distance(student, teacher) > cfg.train.bf16_after_distance * teacher_norm
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for chunk in ddp.shard(idx).split(micro):
                chunk = chunk.to(inputs.device)
                x = inputs[chunk].to(device, non_blocking=True)
                x = preprocess(x) if preprocess is not None else x
                if conv_like:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, bf16_on):  # the encoders only
                    with torch.no_grad():
                        t_feat = teacher_enc(x) if targets is None else None
                    s_feat = student_enc(x)
                # The heads run in fp32. With the paper's head (unit bottleneck, unit rows, 2^16 outputs,
                # temperature 1) the logits are cosines of about 0.06 and the softmax is nearly uniform: bf16's
                # 8-bit rounding of them drowns the teacher-student difference (VGG11 on an H100, Fashion-MNIST,
                # 5 epochs: student linear probe 53 % under a bf16 head, 83 % in fp32).
                with torch.no_grad():
                    t = (teacher.head.last(targets[chunk.to(device)]) if targets is not None
                         else teacher.head(t_feat.float()))
                s = student.head(s_feat.float())
                if centering is not None:
                    t = centering(t.float())
                loss = distill_loss(cfg.loss.name, s, t, cfg.loss.teacher_temp, cfg.loss.student_temp)
                (loss * (len(chunk) / len(idx))).backward()
                loss_sum += float(loss.detach()) * len(chunk) / len(idx)
            ddp.sum_gradients(student.parameters())
            loss_sum = ddp.sum_scalar(loss_sum, device)
            grad_norm = gradient_norm(student)
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
            if not math.isfinite(loss_sum) or not math.isfinite(grad_norm):
                bar.close()
                log({"step": step + 1, "loss": loss_sum, "grad_norm": grad_norm, "lr": lr})
                return finish("diverged", diverged_step=step + 1, reason="non-finite loss or gradient")
            optimizer.step()
            step += 1
            if cfg.teacher.mode == "ema":
                with torch.no_grad():
                    for pt, ps in zip(teacher.parameters(), student.parameters()):
                        pt.mul_(cfg.teacher.ema_momentum).add_(ps.detach(), alpha=1 - cfg.teacher.ema_momentum)
            elif cfg.teacher.mode == "previous-epoch" and step % steps_per_epoch == 0:
                teacher.load_state_dict(student.state_dict())
            last_loss = loss_sum
            if step % cfg.train.log_every == 0 or step == total_steps:
                dist_teacher = parameter_distance(student, teacher)
                if not math.isfinite(dist_teacher):  # a non-finite parameter makes the distance non-finite
                    bar.close()
                    return finish("diverged", diverged_step=step, reason="non-finite parameters")
                log({"step": step, "epoch": step / steps_per_epoch, "loss": loss_sum, "grad_norm": grad_norm,
                     "dist_teacher": dist_teacher, "dist_init": parameter_distance(student, student_init),
                     "lr": lr, "bf16": bf16_on, "time": wall()})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3g}", refresh=False)
            if prober is not None and step in probe_steps and step != total_steps:
                rec = do_probe(probe_steps[step])
                if progress:
                    bar.write(_probe_line(rec))
            if step in ckpt_steps:
                save_state(last_path)
                save_model(run.checkpoints / f"student_step{step}.pt")
            if ddp.any(stop.signal is not None, device):
                save_state(last_path)
                bar.close()
                return finish("interrupted", signal=signal.Signals(stop.signal or signal.SIGTERM).name)
        bar.close()
        if prober is not None:
            rec = do_probe(total_epochs)
            if progress:
                print(_probe_line(rec))
        save_state(last_path)
        save_model(run.checkpoints / "student.pt")
        return finish("completed", final_loss=last_loss)


def _probe_line(rec: dict) -> str:
    parts = [f"epoch {rec['epoch']:g}"]
    for role in ("teacher", "student", "input"):
        if role in rec:
            parts.append(role + " " + " ".join(f"{k} {100 * v:.1f}%" for k, v in rec[role].items()))
    return " | ".join(parts)
