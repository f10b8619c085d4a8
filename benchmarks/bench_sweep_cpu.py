"""Ways to train a sweep's runs on a 2-core CPU, timed as a user runs them: `randteach sweep` one run at a
time (one worker with all the cores' threads), `--workers 2` (two processes of one thread each), and `--stack K`
side by side (one worker, `--stack-mode threads`) — wall seconds of the whole command, start-up and set-up
included, rounds in alternating order. The workload: benchmarks/sweep_stack_cpu.yaml.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_sweep_cpu.py [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_machine

HERE = Path(__file__).resolve().parent
WAYS = {"one at a time": [], "--workers 2": ["--workers", "2"], "--stack 4 (threads)": ["--stack", "4"]}


def timed(args: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the sweep shares out the cores
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "randteach.cli", "--quiet", "sweep", str(HERE / "sweep_stack_cpu.yaml"),
                    "--out", str(out), *args], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    seconds: dict[str, list[float]] = {w: [] for w in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for way in (list(WAYS) if r % 2 == 0 else list(reversed(WAYS))):
                seconds[way].append(timed(WAYS[way], Path(tmp) / "runs"))
    base = statistics.mean(seconds["one at a time"])
    print(f"{bench_machine.cpu_model()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"commit {bench_machine.code_version()}, load {bench_machine.load_average()[0]:.1f}; 4 runs x 300 steps "
          "(benchmarks/sweep_stack_cpu.yaml)")
    print("| way | wall s (rounds) | × one at a time |\n|---|---|---|")
    for way, s in seconds.items():
        print(f"| {way} | {statistics.mean(s):.1f} ({', '.join(f'{v:.1f}' for v in s)}) | {base / statistics.mean(s):.2f}× |")


if __name__ == "__main__":
    main()
