"""Distillation throughput: our loop (`randteach.distill`) with each optimization on and off, against a
minimal plain-PyTorch fp32 loop of the same model and batch, in images/s.

The plain loop (`plain_steps`) is what one would write by hand: float32 inputs held in memory, teacher
forward under no_grad, student forward and backward, cross-entropy between the two softmaxes, AdamW step.
Our loop is timed from its own metrics.jsonl ("time" is the run's wall clock at the end of each step),
so every per-step cost of the real loop counts: logging, distances, gradient norm, the bf16 switch.

Two clocks per step: wall seconds, and the process's CPU seconds (all threads). On a machine shared with
other work the wall clock measures our share of the cores as much as our code; the CPU clock does not,
so ratios of CPU seconds are the steadier figure there (both are reported).

Each measurement runs in its own process (`python bench_distill.py '<json>'`): peak RSS is then that
variant's own, and neither torch.compile's state nor the allocator carries over between variants.
"""
from __future__ import annotations

import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench_machine import sync
from randteach.config import build_config
from randteach.data import Preprocess, load_dataset, stratified_subset
from randteach.models import build_model
from randteach.precision import exact_fp32, uses_bf16
from randteach.runs.rundir import RunDir
from randteach.train import teacher_cache
from randteach.train.host_memory import keep_freed_memory
from randteach.train.loop import distill
from randteach.train.setup import (build_teacher_and_student, load_training_inputs, model_image_size,
                                   trains_channels_last)

loop_state = importlib.import_module("randteach.train.state")  # its clock (`time`) stamps each record

# Each optimization alone, and all together. For the wide encoders (VGG, ImageNet ResNets) channels-last
# applies only under bf16, so it is measured on top of bf16; the narrow ones (convnet, CIFAR ResNets) use it
# in fp32 on a CPU too (the `cpu` variant).
VARIANTS = {  # key: (label, config overrides on top of everything off)
    "off": ("ours, all off (fp32)", {}),
    "bf16": ("bf16 autocast", {"train.precision": "bf16"}),
    "bf16-cl": ("bf16 + channels-last", {"train.precision": "bf16", "train.channels_last": "true"}),
    "cache": ("teacher cache", {"train.teacher_cache": "true"}),
    "compile": ("torch.compile", {"train.compile": "true"}),
    "fast": ("bf16 + channels-last + teacher cache (no compile)", {"train.precision": "bf16",
                                                                   "train.channels_last": "true",
                                                                   "train.teacher_cache": "true"}),
    "all": ("all on", {"train.precision": "bf16", "train.channels_last": "true", "train.teacher_cache": "true",
                       "train.compile": "true"}),
    "graphs": ("all on + CUDA graphs (GPU only)", {"train.precision": "bf16", "train.channels_last": "true",
                                                   "train.teacher_cache": "true", "train.compile": "true",
                                                   "train.cuda_graphs": "true"}),
    # not ours: the hand-tuned baseline a GPU user would write (`tuned_steps`); no overrides apply to it
    "tuned": ("tuned hand-written loop: bf16 + precomputed teacher + compiled step", {}),
    # ours as the CPU demo runs: fp32, the teacher cache, channels-last (on by default for the narrow encoders)
    "cpu": ("ours, CPU path: fp32 + teacher cache (+ channels-last for narrow encoders)",
            {"train.teacher_cache": "true", "train.channels_last": "true"}),
    "cpu-compile": ("ours, CPU path + train.compile (the loss and the teacher's head compiled on a CPU)",
                    {"train.teacher_cache": "true", "train.channels_last": "true", "train.compile": "true"}),
    "tuned-cpu": ("tuned hand-written CPU loop: fp32 + precomputed teacher + channels-last + fused AdamW", {}),
}
PLAIN = ("plain", "plain fp32 loop")
BASELINES = (PLAIN[0], "tuned", "tuned-cpu")  # measured by their own loops, not by `distill`


@dataclass
class Workload:
    """What one training step is: model, data, batch. The default is the papers' VGG11 setting."""
    encoder: str = "vgg11"
    width: int = 32                      # only read by the small encoders
    data: str = "fashion-mnist"          # 28 px, 1 channel, zero-padded to 32 px for VGG11
    n_samples: int = 2048                # distinct images cycled through (the step cost does not depend on it)
    batch: int = 256
    hidden_dims: list[int] = field(default_factory=lambda: [2048, 2048])
    bottleneck_dim: int = 256
    out_dim: int = 4096                  # the cpu preset's m; the paper's 2^16 adds a 256 x 65536 matmul
    warmup: int = 1                      # steps not timed (kernel selection, compilation), rounded up below
    steps: int = 2                       # timed steps per measurement
    device: str = "cpu"                  # or "cuda": both loops run there (the FLOP count stays on the CPU)

    def __post_init__(self):
        # Every loop runs the same untimed steps, a multiple of the timed ones: our loop writes a record (and
        # reads the device) every `steps` steps, as a real run does every train.log_every, so one record
        # closes the warm-up and the next one the timed window.
        self.warmup = -(-self.warmup // self.steps) * self.steps

    def overrides(self, out: Path, root: Path) -> dict[str, str]:
        """Config overrides of our loop for this workload: everything off, no probes, no checkpoints but
        the final ones, independent init (alpha = 1), so that bf16, when asked for, is on from step 1."""
        return {"data.name": self.data, "data.n_samples": str(self.n_samples), "data.root": str(root),
                "model.encoder": self.encoder, "model.width": str(self.width),
                "head.hidden_dims": json.dumps(self.hidden_dims), "head.bottleneck_dim": str(self.bottleneck_dim),
                "head.out_dim": str(self.out_dim), "init.mode": "independent",
                "train.batch_size": str(self.batch), "train.epochs": "1000",
                "train.max_steps": str(self.warmup + self.steps), "train.device": self.device,
                "train.precision": "fp32", "train.channels_last": "false", "train.compile": "false",
                "train.teacher_cache": "false", "train.probe_every": "0", "train.checkpoint_every": "0",
                "train.log_every": str(self.steps), "probe.which": "[]", "out": str(out)}


class _NotingClock:
    """Stands in for the `time` module inside randteach.train.state during a benchmark run: the loop's wall
    clock reads as before, and each reading also notes the process CPU clock at that instant, so every
    logged step time pairs with the CPU seconds spent up to it."""

    def __init__(self):
        self.readings: list[tuple[float, float]] = []  # (wall, cpu); the first is the loop's t_start

    def perf_counter(self) -> float:
        wall = time.perf_counter()
        self.readings.append((wall, time.process_time()))
        return wall

    def cpu_at(self, elapsed: float) -> float:
        """CPU seconds since the loop started, at the reading `elapsed` wall seconds after it started."""
        t0, c0 = self.readings[0]
        wall, cpu = min(self.readings, key=lambda r: abs(r[0] - t0 - elapsed))
        if abs(wall - t0 - elapsed) > 1e-6:
            raise RuntimeError("randteach.train.state no longer logs `time` as perf_counter() - t_start with t_start its "
                               "first reading; update _NotingClock in benchmarks/bench_distill.py")
        return cpu - c0

    def __getattr__(self, name):
        return getattr(time, name)


def _config(w: Workload, out: Path, root: Path, extra: dict | None = None):
    return build_config("cpu", None, {**w.overrides(out, root), **(extra or {})})


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _ce(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    return -(F.softmax(teacher_out, -1) * F.log_softmax(student_out, -1)).sum(-1).mean()


def _plain_setup(w: Workload, root: Path):
    cfg = _config(w, root / "unused", root)
    data = load_dataset(w.data, "train")
    data = data.subset(stratified_subset(data.labels, w.n_samples, seed=0))
    size = model_image_size(cfg, data.images.shape[-1])
    x_all = Preprocess.fit(data, size=size)(data.images).float()  # float32, in memory, once
    teacher = build_model(cfg, data.images.shape[1], size, seed=1).eval().requires_grad_(False)
    student = build_model(cfg, data.images.shape[1], size, seed=2).train()
    return x_all, teacher, student


def _plain_setup_on_device(w: Workload, root: Path):
    x_all, teacher, student = _plain_setup(w, root)
    return x_all.to(w.device), teacher.to(w.device), student.to(w.device)


def _timed_steps(w: Workload, n_images: int, step) -> dict:
    """Wall and CPU seconds of `w.warmup + w.steps` calls of step(rows), each on the next batch of a fixed
    random order of the images (a hand-written loop's data order). Each warm-up step is timed alone; the
    timed steps as one block, synchronized before and after only, as our loop is timed (over its windows):
    a synchronize after every step would keep a GPU's host from queueing the next step's kernels."""
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(0)).to(w.device)
    batches = [order[(i * w.batch) % n_images:][:w.batch] for i in range(w.warmup + w.steps)]
    times, cpu = [], []

    def timed(rows: list[torch.Tensor]) -> None:
        sync(w.device)
        start, start_cpu = time.perf_counter(), time.process_time()
        for idx in rows:
            step(idx)
        sync(w.device)
        times.extend([(time.perf_counter() - start) / len(rows)] * len(rows))
        cpu.extend([(time.process_time() - start_cpu) / len(rows)] * len(rows))

    with exact_fp32():  # the arithmetic of our loop, which runs under it: no TF32 on a GPU
        for rows in batches[:w.warmup]:
            timed([rows])
        timed(batches[w.warmup:])
    return {"step_s": times, "cpu_s": cpu}


def plain_steps(w: Workload, root: Path) -> dict:
    """The baseline: a minimal hand-written fp32 distillation loop over the same model and batch."""
    x_all, teacher, student = _plain_setup_on_device(w, root)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)

    def step(idx):
        x = x_all[idx]
        with torch.no_grad():
            t = teacher(x)
        loss = _ce(student(x), t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return _timed_steps(w, len(x_all), step)


def our_steps(w: Workload, root: Path, extra: dict) -> dict:
    """Our loop, `randteach.distill`, with config overrides `extra`; per-step times from metrics.jsonl."""
    out = root / "runs" / f"run-{time.time_ns()}"
    cfg = _config(w, out, root, extra)
    clock = _NotingClock()
    loop_state.time = clock
    try:
        result = distill(cfg, progress=False)
    finally:
        loop_state.time = time
    steps = RunDir(result.path).steps()
    shutil.rmtree(out, ignore_errors=True)
    if result.summary["status"] != "completed":
        raise RuntimeError(f"benchmark run ended with status {result.summary['status']}")
    (warm, timed), n = [r for r in steps if r["step"] in (w.warmup, w.warmup + w.steps)], w.steps
    wall = timed["time"] - warm["time"]
    cpu = clock.cpu_at(timed["time"]) - clock.cpu_at(warm["time"])
    warm_wall, warm_cpu = warm["time"] / w.warmup, clock.cpu_at(warm["time"]) / w.warmup
    return {"step_s": [warm_wall] * w.warmup + [wall / n] * n, "cpu_s": [warm_cpu] * w.warmup + [cpu / n] * n,
            "bf16": [r["bf16"] for r in steps]}


def _precomputed_targets(w: Workload, x_all, teacher) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([teacher(x_all[i:i + w.batch]) for i in range(0, len(x_all), w.batch)])


def tuned_steps(w: Workload, root: Path) -> dict:
    """The tuned baseline: the plain loop with the teacher's outputs precomputed once, bf16 autocast on the
    student's forward and the forward + loss compiled as one graph (its backward compiled by AOTAutograd),
    fused AdamW. What an engineer paying for GPU hours writes by hand; on a CPU it keeps freed memory as our
    loop does (randteach.train.host_memory: a tuned loop sets glibc's malloc so too)."""
    keep_freed_memory(torch.device(w.device))
    x_all, teacher, student = _plain_setup_on_device(w, root)
    targets = _precomputed_targets(w, x_all, teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    device_type = torch.device(w.device).type

    @torch.compile(dynamic=False)
    def loss_of(x, t):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            s = student(x)
        return _ce(s.float(), t)

    def step(idx):
        optimizer.zero_grad(set_to_none=True)
        loss_of(x_all[idx], targets[idx]).backward()
        optimizer.step()
    return _timed_steps(w, len(x_all), step)


def tuned_cpu_steps(w: Workload, root: Path) -> dict:
    """The tuned CPU baseline: the plain fp32 loop with the teacher's outputs precomputed once, model and
    images in channels-last memory format and fused AdamW, eager (on this CPU torch.compile and bf16
    without AMX are slower: docs/PERFORMANCE.md), freed memory kept as our loop keeps it. What an engineer
    tuning the step for a CPU writes by hand."""
    keep_freed_memory(torch.device(w.device))
    x_all, teacher, student = _plain_setup_on_device(w, root)
    targets = _precomputed_targets(w, x_all, teacher)
    x_all = x_all.contiguous(memory_format=torch.channels_last)
    student = student.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0, fused=True)

    def step(idx):
        optimizer.zero_grad(set_to_none=True)
        _ce(student(x_all[idx]), targets[idx]).backward()
        optimizer.step()
    return _timed_steps(w, len(x_all), step)


def build_teacher_cache(w: Workload, root: Path) -> dict:
    """Fill the teacher-target cache the bf16 variants' loop will read (fast, all, graphs: same teacher, inputs,
    memory format and fp32 without TF32 as `distill`, so the same key), timed. The fp32 variants lay the images
    out otherwise on some encoders and build their own file before their timed steps."""
    cfg = _config(w, root / "unused", root, VARIANTS["fast"][1])
    inputs, preprocess, data, size = load_training_inputs(cfg)
    teacher, _ = build_teacher_and_student(cfg, data.images.shape[1], size)
    teacher.eval().requires_grad_(False)
    device = torch.device(w.device)
    teacher.to(device)
    channels_last = trains_channels_last(cfg, inputs, teacher.encoder, device, uses_bf16(cfg.train.precision, device))
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
    sync(w.device)
    start = time.perf_counter()
    with exact_fp32():  # as the loop computes them
        targets, origin = teacher_cache.load_or_compute(cfg, teacher, inputs, preprocess, min(w.batch, len(inputs)),
                                                        device, root / "teacher-targets", channels_last)
    sync(w.device)
    secs = time.perf_counter() - start
    return {"images": len(inputs), "seconds": secs, "bytes": targets.numel() * targets.element_size(),
            "origin": origin.split(" ")[0]}


def count_flops(w: Workload, root: Path) -> dict:
    """FLOPs of one plain training step (teacher forward, student forward and backward), of the part a
    teacher cache removes (teacher encoder and bottleneck forward) and of the whole teacher forward, which
    the tuned loops' precomputed targets remove, by FlopCounterMode."""
    x_all, teacher, student = _plain_setup(w, root)
    x = x_all[:w.batch]
    with FlopCounterMode(display=False) as step:
        with torch.no_grad():
            t = teacher(x)
        _ce(student(x), t).backward()
    with FlopCounterMode(display=False) as cached, torch.no_grad():
        teacher.head.bottleneck(teacher.encoder(x))
    with FlopCounterMode(display=False) as whole, torch.no_grad():
        teacher(x)
    return {"step": step.get_total_flops(), "teacher_cached_part": cached.get_total_flops(),
            "teacher_forward": whole.get_total_flops()}


def measure(kind: str, w: Workload, root: Path, extra: dict | None = None) -> dict:
    """One measurement in this process: 'plain', 'tuned', 'tuned-cpu', 'ours' (with overrides `extra`), 'cache'
    or 'flops'."""
    load = os.getloadavg()[0]
    if kind == "plain":
        out = plain_steps(w, root)
    elif kind == "tuned":
        out = tuned_steps(w, root)
    elif kind == "tuned-cpu":
        out = tuned_cpu_steps(w, root)
    elif kind == "ours":
        out = our_steps(w, root, extra or {})
    elif kind == "cache":
        out = build_teacher_cache(w, root)
    elif kind == "flops":
        out = count_flops(w, root)
    else:
        raise ValueError(f"unknown measurement {kind!r}")
    return {**out, "peak_rss": _peak_rss(), "load": [load, os.getloadavg()[0]]}


def measure_isolated(kind: str, w: Workload, root: Path, extra: dict | None = None) -> dict:
    """`measure` in a fresh Python process (own peak RSS, no state shared with other variants), with
    this process's torch thread count."""
    spec = json.dumps({"kind": kind, "workload": asdict(w), "root": str(root), "extra": extra or {},
                       "threads": torch.get_num_threads()})
    proc = subprocess.run([sys.executable, __file__, spec], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker {kind} {extra} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    res = measure(spec["kind"], Workload(**spec["workload"]), Path(spec["root"]), spec["extra"])
    print("RESULT " + json.dumps(res), flush=True)
