"""Many runs in one process, side by side on the cores: each run trained by the solo loop, L runs at a time.

On a CPU the step of a small encoder is bound by arithmetic, so one model of K runs under vmap
(`train.stacked`) has little per-operation overhead to save and adds memory traffic: it trains below one run at
a time there (docs/PERFORMANCE.md, Stacked runs). What a small model leaves unused on a CPU of several cores is
the cores: torch spreads one small convolution poorly over threads. Here a stack's runs are trained side by
side instead, each by the solo loop itself (`loop.opened`, `loop.Training`, `loop.solo_loop`: its steps,
logging, divergence check, probes and checkpoints), on L = min(T, runs to train) threads of T // L torch threads
each (T: the process's torch threads); a thread that finishes a run takes the next one. The runs are opened
first, on the calling thread with T // L torch threads too (locks, random state, files); a run's teacher cache
is computed on its lane as it starts (`Training.start`), beside the others'. A SIGTERM/SIGINT stops every training run after its current step, with its resumable checkpoint;
runs that have not begun stay as they are ("pending"). A run that fails is reported "failed", the others train.

Each run is its solo run with T // L torch threads, arithmetic and files: its student is bitwise the student of
`OMP_NUM_THREADS=T//L randteach distill` of its config (tested). The runs share one copy of each data set they
are opened with (`data.registry.shared_loads`).
"""
from __future__ import annotations

import contextlib
import signal
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor

import torch

from ..config import Config
from ..data.registry import shared_loads
from ..runs.rundir import RunInUse
from ..runs.sweep import finished_summary
from ..text import counted
from .callbacks import StopFlag
from .loop import RunResult, Training, opened, solo_loop


def train_side_by_side(cfgs: list[Config], progress: bool = False) -> list[dict]:
    """Train (or resume, or skip when finished) the runs `cfgs` side by side; one summary per config, in order.
    A run whose folder another process holds is not touched (its summary, "failed" with "in_use", says so); a
    run that raised is "failed" with its error and traceback (written by the caller, as a sweep's runs are);
    a run that a signal kept from starting is "pending"."""
    threads = torch.get_num_threads()
    lanes = max(1, min(threads, _to_train(cfgs)))
    stack = {"mode": "threads", "runs": len(cfgs), "lanes": lanes, "torch_threads": max(1, threads // lanes)}
    summaries: dict[int, dict] = {}
    stop = StopFlag()
    with contextlib.ExitStack() as runs:
        torch.set_num_threads(stack["torch_threads"])
        try:
            with shared_loads():  # one copy of each data set for all the runs
                waiting = _open_all(cfgs, runs, stop, summaries)
        finally:
            torch.set_num_threads(threads)
        if progress:
            print(f"  side by side: {counted(len(waiting), 'run')} on {counted(lanes, 'thread')} of "
                  f"{counted(stack['torch_threads'], 'torch thread')} each"
                  + (" (one after another)" if lanes == 1 and len(waiting) > 1 else ""),
                  file=sys.stderr, flush=True)
        with stop:  # signals are caught from here on: a stop while the runs were opened ends the process
            summaries.update(_on_lanes(waiting, stack, threads, stop))
    return [summaries[i] for i in range(len(cfgs))]


def _to_train(cfgs: list[Config]) -> int:
    """How many of `cfgs` have steps left: all but those a sweep would skip as finished."""
    def finished(cfg: Config) -> bool:
        try:
            return finished_summary(cfg) is not None
        except ValueError:  # an unreadable summary.json: the run is opened, and the loop's checks decide
            return False
    return sum(not finished(c) for c in cfgs)


def _failure(e: Exception) -> dict:
    return {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def _open_all(cfgs: list[Config], runs: contextlib.ExitStack, stop: StopFlag, summaries: dict) -> dict[int, Training]:
    """Each run opened (its lock, random state and files), kept open by `runs`; the runs to train, by index (a
    finished run's summary, a busy run's or a failed start's goes into `summaries`)."""
    waiting: dict[int, Training] = {}
    for i, cfg in enumerate(cfgs):
        try:
            training = runs.enter_context(opened(cfg, progress=False, stop=stop))
        except RunInUse as e:  # that run is another process's; the others train
            summaries[i] = e.summary()
            continue
        except Exception as e:  # noqa: BLE001 - one run that cannot start must not stop the others
            summaries[i] = _failure(e)
            continue
        if isinstance(training, RunResult):
            summaries[i] = training.summary
        else:
            # Runs side by side share the process's random state: each saves its own, as it was at its start
            # (a built-in encoder draws nothing from it; an imported one cannot join, see why_not_stackable).
            training.state.rng = {"torch": torch.get_rng_state()}
            waiting[i] = training
    return waiting


def _on_lanes(waiting: dict[int, Training], stack: dict, threads: int, stop: StopFlag) -> dict[int, dict]:
    """Each run's summary after its solo loop, the runs on stack["lanes"] threads of stack["torch_threads"]."""
    def train(training: Training) -> dict:
        if stop.signal is not None:
            return {"status": "pending", "signal": signal.Signals(stop.signal).name}
        try:
            status, steps, extra = solo_loop(training)
            return training.finish(status, steps, {**extra, "stack": stack}).summary
        except Exception as e:  # noqa: BLE001 - one failing run must not stop the others
            return _failure(e)

    if stack["lanes"] == 1:
        # One lane: the calling thread, with all its torch threads. On a thread of its own each parallel
        # operation would wake its OpenMP workers the slow way: GNU OpenMP stops spinning for work once it
        # manages more threads than there are cores, and the calling thread's idle workers count. A 200k-element
        # add with two torch threads took 14-17 us on the calling thread and 59-66 on another (benchmarks/
        # omp_lane.py); a convnet step ran 0.7x (2-core AMD VM). Lanes of one torch thread each start no parallel region and do not pay this.
        return {i: train(t) for i, t in waiting.items()}
    try:
        with ThreadPoolExecutor(stack["lanes"], initializer=torch.set_num_threads,
                                initargs=(stack["torch_threads"],)) as pool:
            futures = {i: pool.submit(train, t) for i, t in waiting.items()}
            return {i: f.result() for i, f in futures.items()}
    finally:
        torch.set_num_threads(threads)  # a lane's setting reaches the process's BLAS too: restored
