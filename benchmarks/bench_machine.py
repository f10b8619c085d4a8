"""The machine a benchmark ran on, its load, and its matrix-multiply throughput (the FLOP/s yardstick).

The matmul figures are the reference for "achieved FLOP/s": measured in the same run as the training
steps, fp32 and bf16 alternating (A/B/A/B...) so that a change of load hits both alike.
"""
from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from randteach.precision import cpuinfo_field, read_cpuinfo

_ONEDNN_PROBE = ("import torch; a = torch.ones(256, 256, dtype=torch.bfloat16); a @ a; "
                 "torch.nn.functional.conv2d(torch.ones(1, 8, 8, 8), torch.ones(8, 8, 3, 3))")


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def cpu_model() -> str:
    return " ".join(cpuinfo_field(read_cpuinfo(), "model name")) or platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    return set(cpuinfo_field(read_cpuinfo(), "flags"))


def onednn_kernels() -> dict:
    """oneDNN's own report (ONEDNN_VERBOSE) of the ISA it dispatches to and the bf16 matmul kernel it picks.

    Runs in a child process: the variable is read once, at oneDNN's first use."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    try:
        out = subprocess.run([sys.executable, "-c", _ONEDNN_PROBE], env=env, capture_output=True, text=True,
                             timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return {"isa": "unknown", "bf16_matmul": "unknown"}
    isa = re.search(r"cpu,isa:([^\n]+)", out)
    matmul = re.search(r"exec,cpu,matmul,([^,]+)", out)
    return {"isa": isa.group(1).strip() if isa else "unknown", "bf16_matmul": matmul.group(1) if matmul else "unknown"}


def code_version() -> str:
    """The commit measured, and whether src/ differed from it (the working tree is what ran)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes in src/' if dirty else ''}"


def describe(onednn: bool = True) -> dict:
    """Date, host, CPU, bf16 hardware and software versions; `onednn=False` skips the child process."""
    flags = cpu_flags()
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "host": platform.node(),
            "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "code": code_version(),
            "amx": sorted(f for f in flags if f.startswith("amx")), "avx512_bf16": "avx512_bf16" in flags,
            "onednn": onednn_kernels() if onednn else {"isa": "not checked", "bf16_matmul": "not checked"},
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a clock read after it counts it (a no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_flops(n: int = 2048, reps: int = 5, device: str = "cpu") -> dict:
    """FLOP/s of an (n x n) @ (n x n) product in fp32 and in bf16, alternating, median over `reps`: per
    wall second ("fp32", "bf16") and per process CPU second ("fp32_cpu", "bf16_cpu", all threads).
    On a GPU the fp32 product runs as torch's default says (TF32 off for matmul)."""
    mats = {dt: (torch.randn(n, n).to(device, dt), torch.randn(n, n).to(device, dt))
            for dt in (torch.float32, torch.bfloat16)}
    for a, b in mats.values():
        a @ b  # first call: kernel selection and page faults
    sync(device)
    wall = {dt: [] for dt in mats}
    cpu = {dt: [] for dt in mats}
    for _ in range(reps):
        for dt, (a, b) in mats.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            a @ b
            sync(device)
            wall[dt].append(time.perf_counter() - start)
            cpu[dt].append(time.process_time() - start_cpu)
    flops = 2.0 * n ** 3
    out = {"n": n}
    for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        out[name] = flops / statistics.median(wall[dt])
        out[name + "_cpu"] = flops / statistics.median(cpu[dt])
        out[name + "_samples"] = [flops / t for t in wall[dt]]
    return out
