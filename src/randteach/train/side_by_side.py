"""Many runs in one process, side by side on the cores: each run trained by the solo loop, L runs at a time.

On a CPU the step of a small encoder is bound by arithmetic, so one model of K runs under vmap
(`train.stacked`) has little per-operation overhead to save and adds memory traffic: it trains below one run at
a time there (docs/PERFORMANCE.md, Stacked runs). What a small model leaves unused on a CPU of several cores is
the cores: torch spreads one small convolution poorly over threads. Here a stack's runs are trained side by
side instead, each by the solo loop itself (`loop.opened`, `loop.Training`, `loop.solo_loop`: its steps, logging,
divergence check, probes and checkpoints), on L = min(T, K) threads of T // L torch threads each (T: the
process's torch threads); a thread that finishes a run takes the next. The runs are opened first, on the
calling thread (random state, locks, files), and a SIGTERM/SIGINT caught there stops every run after its
current step, each with its resumable checkpoint.

Each run's arithmetic is its solo run's with T // L torch threads: the same code on the same tensors, so its
student is bitwise the student of `OMP_NUM_THREADS=T//L randteach distill` of its config (tested).
"""
from __future__ import annotations

import contextlib
import signal
from concurrent.futures import ThreadPoolExecutor

import torch

from ..config import Config
from ..runs.rundir import RunInUse
from .callbacks import StopFlag
from .loop import RunResult, Training, opened, solo_loop


def train_side_by_side(cfgs: list[Config], progress: bool = False) -> list[dict]:
    """Train (or resume, or skip when finished) the runs `cfgs` side by side; one summary per config, in order
    (a run whose folder another process holds is not touched: its summary, "failed", says so; a run that a
    signal kept from starting is "pending")."""
    threads = torch.get_num_threads()
    lanes = max(1, min(threads, len(cfgs)))
    summaries: dict[int, dict] = {}
    with contextlib.ExitStack() as runs, StopFlag() as stop:
        waiting: dict[int, Training] = {}
        for i, cfg in enumerate(cfgs):
            try:
                training = runs.enter_context(opened(cfg, progress=False, stop=stop))
            except RunInUse as e:  # that run is another process's; the others train
                summaries[i] = {"status": "failed", "error": f"{type(e).__name__}: {e}", "in_use": True}
                continue
            if isinstance(training, RunResult):
                summaries[i] = training.summary
            else:
                waiting[i] = training
        if progress:
            print(f"side by side: {len(waiting)} runs on {lanes} thread(s) of {max(1, threads // lanes)} torch "
                  "thread(s) each", flush=True)

        def train(training: Training) -> dict:
            if stop.signal is not None:
                return {"status": "pending", "signal": signal.Signals(stop.signal).name}
            return training.finish(*solo_loop(training)).summary

        try:
            with ThreadPoolExecutor(lanes, initializer=torch.set_num_threads, initargs=(max(1, threads // lanes),)) \
                    as pool:
                futures = {i: pool.submit(train, t) for i, t in waiting.items()}
                summaries.update({i: f.result() for i, f in futures.items()})
        finally:
            torch.set_num_threads(threads)  # a lane's setting reaches the process's BLAS too: restored
    return [summaries[i] for i in range(len(cfgs))]
