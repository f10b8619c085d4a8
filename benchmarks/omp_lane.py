"""What a parallel operation costs on a thread other than the calling one (why a stack side by side trains a
single lane on the calling thread, docs/PERFORMANCE.md, Stacked runs). Times a 200,000-element add with two
torch threads: on the main thread, on a new thread while the main thread's OpenMP workers exist, and on a new
thread of a process whose main thread never ran a parallel region (each case in a fresh process).

    PYTHONPATH=src .venv/bin/python benchmarks/omp_lane.py
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import torch

CASES = {"main": "the calling (main) thread",
         "other": "a new thread, the main thread's OpenMP workers idle beside it",
         "other-alone": "a new thread, no OpenMP workers of the main thread"}


def add_time(reps: int = 3000) -> float:
    """Mean seconds of one add of 200,000 floats with two torch threads, on the calling thread."""
    torch.set_num_threads(2)
    x = torch.randn(200_000)
    for _ in range(200):
        x.add(1.0)
    t0 = time.perf_counter()
    for _ in range(reps):
        x.add(1.0)
    return (time.perf_counter() - t0) / reps


def case(name: str) -> float:
    torch.set_num_threads(1 if name == "other-alone" else 2)
    if name != "other-alone":
        torch.randn(200_000).add(1.0)  # the main thread's workers start (as a run's set-up starts them)
    if name == "main":
        return add_time()
    out = []
    worker = threading.Thread(target=lambda: out.append(add_time()))
    worker.start()
    worker.join()
    return out[0]


def main() -> None:
    if len(sys.argv) > 1:
        print(case(sys.argv[1]))
        return
    print(f"torch {torch.__version__}; a 200,000-element add with two torch threads, µs (3 fresh processes each):")
    for name, what in CASES.items():
        runs = [float(subprocess.run([sys.executable, __file__, name], capture_output=True, text=True,
                                     check=True).stdout) * 1e6 for _ in range(3)]
        print(f"  {what}: " + ", ".join(f"{v:.1f}" for v in runs))


if __name__ == "__main__":
    main()
