"""Where a stacked step spends its time: torch.profiler over the steps of K runs trained as one vmapped model
(`randteach sweep --stack K --stack-mode vmap`) and of one run alone, on the workloads of `bench_stacked.py` (convnet or
ResNet20 on Fashion-MNIST, batch 64, one thread). Prints, per case, the operators' self CPU time per step of
one run (a stack's divided by K; set-up included), then the top operators with their total self CPU time over
the profiled training, set-up included, and their share of it.
This is how the stacked batch norm and ReLU were found (docs/PERFORMANCE.md, "Stacked runs").

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/profile_stacked.py --encoder resnet20 --k 4
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

import bench_stacked
from randteach.train.loop import distill
from randteach.train.stacked import train_stacked


def train(cfgs: list) -> None:
    if len(cfgs) > 1:
        train_stacked(cfgs, mode="vmap")
    else:
        distill(cfgs[0], progress=False)


def profiled(encoder: str, k: int, steps: int, root: Path, top: int) -> None:
    workload = bench_stacked.WORKLOADS[encoder]
    train(bench_stacked.configs(workload, k, 2, root, f"warm{k}"))  # oneDNN's kernels chosen, caches filled
    cfgs = bench_stacked.configs(workload, k, steps, root, f"profiled{k}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(cfgs)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    what = f"{k} runs stacked" if k > 1 else "one run alone"
    print(f"\n{encoder}, {what}: {total / 1e3 / steps / k:.1f} ms of self CPU time per run-step "
          "(operators only; set-up included)")
    print(f"{'operator':<44} {'self CPU ms':>12} {'share':>7} {'calls':>7}")
    for e in events[:top]:
        print(f"{e.key[:44]:<44} {e.self_cpu_time_total / 1e3:>12.1f} {e.self_cpu_time_total / total:>7.1%} "
              f"{e.count:>7}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", choices=sorted(bench_stacked.WORKLOADS), default="resnet20")
    p.add_argument("--k", type=int, default=4, help="runs in the stack (profiled beside one run alone)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, args.k):
            profiled(args.encoder, k, args.steps, Path(tmp), args.top)


if __name__ == "__main__":
    main()
