"""Where one distillation step spends its time: torch.profiler over the plain loop's step (the benchmark
workload, VGG11, batch 256) in fp32 and under bf16 autocast, each in NCHW and in channels-last.

With --compile, teacher and student go through torch.compile (as train.compile does) in each mode.
Prints, per mode, the step time and the self CPU time grouped by kind of operator, then the top operators.
This is how the benchmark's bf16 result was explained (docs/PERFORMANCE.md).

    .venv/bin/python benchmarks/profile_step.py [--batch 256] [--top 12] [--compile] [--threads 1]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_distill import Workload, _ce, _plain_setup

GROUPS = [  # (group, substrings of aten operator names), first match wins
    ("conv forward", ("mkldnn_convolution", "convolution_overrideable", "_convolution", "conv2d")),
    ("conv backward", ("convolution_backward",)),
    ("matmul (linear)", ("addmm", "mm", "bmm", "linear", "matmul")),
    ("dtype casts / copies", ("_to_copy", "copy_", "to", "contiguous", "clone")),
    ("optimizer", ("_foreach", "adam")),
]


def _group(name: str) -> str:
    if "cpp_fused" in name:
        return "inductor fused kernels"
    short = name.split("::", 1)[-1]
    for group, keys in GROUPS:
        if any(short == k or short.startswith(k) for k in keys):
            return group
    return "other"


def profile_mode(x, teacher, student, bf16: bool, channels_last: bool, top: int, compile: bool) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher.to(memory_format=fmt)
    student.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    teacher_fwd, student_fwd = (torch.compile(teacher), torch.compile(student)) if compile else (teacher, student)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                t = teacher_fwd(x)
            s = student_fwd(x)
        loss = _ce(s, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: kernel selection
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        secs = time.perf_counter() - start
    events = list(prof.key_averages())
    groups = defaultdict(float)
    for e in events:
        groups[_group(e.key)] += e.self_cpu_time_total / 1e6
    total = sum(groups.values())
    name = ("bf16" if bf16 else "fp32") + (" + channels-last" if channels_last else "") + (" + compile" if compile else "")
    print(f"\n## {name}: step {secs:.2f} s (profiled), operator self time {total:.2f} s")
    for g, s in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:22s} {s:7.2f} s  {100 * s / total:5.1f} %")
    print("  top operators (self CPU s, calls):")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"    {e.key:40s} {e.self_cpu_time_total / 1e6:7.2f}  {e.count}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--compile", action="store_true", help="torch.compile teacher and student")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1, as the benchmark)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    w = Workload(batch=args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        x_all, teacher, student = _plain_setup(w, Path(tmp))
    x = x_all[:w.batch]
    print(f"{w.encoder}, batch {w.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for bf16, cl in ((False, False), (False, True), (True, False), (True, True)):
        profile_mode(x, teacher, student, bf16, cl, args.top, args.compile)


if __name__ == "__main__":
    main()
