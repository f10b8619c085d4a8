"""Sweeps: a grid of config values x seeds, expanded into content-addressed runs and executed.

A sweep file names a preset, base overrides, a grid and seeds:

    preset: cpu
    name: alpha
    base: {train.epochs: 4}
    grid: {init.alpha: [1.0e-10, 0.1, 1.0]}
    seeds: [0, 1, 2]
    out: runs/alpha

Every run lives in `<out>/<name>-<digest>` (the digest hashes the resolved config), so running
the same sweep again does no finished work twice: completed and diverged runs are skipped,
interrupted ones resumed from their last checkpoint, new ones started. Runs execute in local
worker processes (one fresh process per run, or per stack of up to K runs with --stack K; on a machine with
GPUs each worker is pinned to one of them) or as SLURM jobs through submitit.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..config import (Config, ConfigError, build_config, canonical_key, config_from_dict, leaves, load_yaml,
                      outside_the_address)
from ..errors import UserError
from ..text import counted
from .rundir import RunDir, RunInUse, run_lock, wait_until_free

SWEEP_KEYS = ("preset", "name", "base", "grid", "seeds", "out", "slurm")
DONE = ("completed", "diverged")  # a diverged run is a result, not something to retry
# Keys of the `slurm` mapping -> submitit AutoExecutor parameters.
SLURM_KEYS = {"partition": "slurm_partition", "time": "timeout_min", "gpus_per_node": "gpus_per_node",
              "cpus_per_task": "cpus_per_task", "mem_gb": "mem_gb", "array_parallelism": "slurm_array_parallelism",
              "account": "slurm_account", "qos": "slurm_qos", "constraint": "slurm_constraint",
              "exclude": "slurm_exclude", "additional_parameters": "slurm_additional_parameters",
              "signal_delay_s": "slurm_signal_delay_s"}
SLURM_OWN_KEYS = ("cluster", "folder")  # read by the launcher itself, not passed to submitit


@dataclass
class SweepSpec:
    preset: str | None = None
    base: dict[str, Any] = field(default_factory=dict)     # dotted key -> value, applied to every run
    grid: dict[str, list] = field(default_factory=dict)     # dotted key -> values (cartesian product)
    seeds: list[int] = field(default_factory=list)          # train.seed values; empty: the config's own seed
    out: str | None = None                                  # root folder of the run directories (default runs/)
    name: str = "sweep"                                     # readable prefix of every run directory
    slurm: dict[str, Any] = field(default_factory=dict)     # submitit parameters for --launcher slurm


def _seeds(seeds, where: str) -> list[int]:
    """A sweep file's seeds: a list of integers (absent: none, the config's own seed)."""
    if seeds is None:
        return []
    if isinstance(seeds, int) and not isinstance(seeds, bool):  # `randteach experiment --seeds 3` is a count
        example = list(range(seeds)) if 1 <= seeds <= 10 else [0, 1, 2]
        raise ConfigError(f"{where}: seeds: {seeds} is a number; a sweep lists its seeds: seeds: {example} for "
                          f"{len(example)} seeds, or seeds: [{seeds}] for seed {seeds} alone")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            for s in seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers, e.g. seeds: [0, 1, 2], got "
                          f"{seeds!r} (leave seeds out for the config's own train.seed)")
    repeated = _first_repeat(seeds)
    if repeated is not None:
        raise ConfigError(f"{where}: seeds lists {seeds[repeated]} more than once; each seed is one run, so give it "
                          "once")
    return seeds


def _first_repeat(values: list) -> int | None:
    """Where a value is first listed a second time (equal, as a grid or the seeds compare them), else None."""
    return next((i for i, v in enumerate(values) if v in values[:i]), None)


def _spelled_once(mapping: dict, where: str) -> dict:
    """Dotted keys in the config's spelling (train.max-steps is train.max_steps), so the checks on varied keys
    see each once; a key written two ways (or nested and dotted) is refused: one would silently replace the
    other's values."""
    out: dict[str, Any] = {}
    written: dict[str, str] = {}
    for key, value in leaves(mapping):
        canon = canonical_key(key)
        if canon in out:
            raise ConfigError(f"{where}: {written[canon]!r} and {key!r} are one key ({canon}); give it once")
        out[canon], written[canon] = value, key
    return out


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; every mistake raises ConfigError naming the file and the key."""
    path = Path(path)
    raw = load_yaml(path, "sweep file")
    where = f"sweep file {str(path)!r}"
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; a sweep file has the keys "
                          f"{', '.join(SWEEP_KEYS)} (config keys go under base: or grid:)")
    for key in ("base", "grid", "slurm"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(f"{where}: {key} must be a mapping of dotted config keys, "
                              f"got {type(raw[key]).__name__}")
    base, grid = (_spelled_once(raw.get(section) or {}, f"{where}, {section}") for section in ("base", "grid"))
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid key {key!r} needs a non-empty list of values, e.g. {key}: [a, b], "
                              f"got {values!r}")
        repeated = _first_repeat(values)
        if repeated is not None:  # one run, where the file reads as two: a typo that reports would show as n = 1
            raise ConfigError(f"{where}: grid key {key!r} lists {values[repeated]!r} more than once; each value is one "
                              "run, so give it once")
        if outside_the_address(key) and len({repr(v) for v in values}) > 1:
            raise ConfigError(f"{where}: grid key {key!r} does not change what a run computes (a run's address "
                              "leaves it out), so its values would all be one run; set it under base instead")
    if not raw:
        raise ConfigError(f"{where} is empty: a sweep names at least one of {', '.join(SWEEP_KEYS)}, e.g. "
                          "grid: {init.alpha: [0.1, 0.5]} and seeds: [0, 1, 2]")
    seeds = _seeds(raw.get("seeds"), where)
    for owned in ("out", "name"):
        if owned in base or owned in grid:
            raise ConfigError(f"{where}: set {owned} at the top level of the sweep file, not under base/grid")
    if seeds and ("train.seed" in grid or "train.seed" in base):
        raise ConfigError(f"{where}: train.seed is both in {'grid' if 'train.seed' in grid else 'base'} and in "
                          "seeds; keep one")
    for owned in ("out", "name"):
        if isinstance(raw.get(owned), (list, dict)):
            raise ConfigError(f"{where}: {owned} names one folder, got {raw[owned]!r}; vary a config key under grid:")
    name = raw.get("name") or path.stem
    spec = SweepSpec(preset=raw.get("preset"), base=base, grid=grid, seeds=list(seeds),
                     out=None if raw.get("out") is None else str(raw["out"]), name=str(name),
                     slurm=dict(raw.get("slurm") or {}))
    _check_slurm(spec.slurm, where)
    check_grid(spec, where)
    return spec


def check_grid(spec: SweepSpec, where: str) -> None:
    """Surface bad keys and values now, naming `where`, rather than in the middle of a sweep: every
    combination of the grid must build (a key may need another's value, e.g. local crops their dino views);
    an error that the base alone has is the base's, one of a combination names the combination."""
    keys = list(spec.grid)
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        try:
            build_config(spec.preset, None, {**spec.base, **dict(zip(keys, combo)), "name": spec.name})
        except ConfigError as e:
            try:
                build_config(spec.preset, None, {**spec.base, "name": spec.name})
            except ConfigError as in_base:
                if str(in_base) == str(e):
                    raise ConfigError(f"{where}: {e}") from None
            shown = ", ".join(f"{k}={v}" for k, v in zip(keys, combo))
            raise ConfigError(f"{where}, the run {shown}: {e}") from None


def _check_slurm(slurm: dict, where: str) -> None:
    """Names and values of the slurm options, before anything is submitted (submitit refuses a wrong type only
    at submission, with a traceback)."""
    unknown = sorted(set(slurm) - set(SLURM_KEYS) - set(SLURM_OWN_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown slurm key(s) {', '.join(unknown)}; valid: "
                          f"{', '.join([*SLURM_KEYS, *SLURM_OWN_KEYS])}")
    for key, value in slurm.items():
        why = _slurm_value_problem(key, value)
        if why:
            raise ConfigError(f"{where}: {key}={value!r}: {why}")


SLURM_COUNTS = ("gpus_per_node", "cpus_per_task", "array_parallelism", "signal_delay_s")


def _slurm_value_problem(key: str, value) -> str | None:
    """What is wrong with one slurm option's value, or None."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in SLURM_COUNTS and not (isinstance(value, int) and number and value >= 0):  # 4.0 fails in submitit
        return f"expected a whole number, e.g. {key}=4"
    if key == "mem_gb" and not (number and 0 < value < math.inf):  # nan fails the comparison too
        return "expected gigabytes as a number, e.g. mem_gb=32"
    if key == "additional_parameters" and not isinstance(value, dict):
        return ("expected a mapping of sbatch options; give it under slurm: in the sweep file, e.g. "
                "additional_parameters: {mail-type: END}")
    if key == "cluster" and value not in ("slurm", "local", "debug"):
        return "expected slurm, local (the jobs on this machine) or debug (in this process)"
    return None


def expand(spec: SweepSpec) -> list[Config]:
    """The grid's cartesian product x seeds (seeds vary fastest), validated, duplicates removed.

    Each config's `out` is `<spec.out>/<name>-<digest>` (and, for an image folder, a key of its contents, as
    `Config.run_dir`); the order follows the grid as written.
    """
    root = Path(spec.out).expanduser() if spec.out else Path("runs")
    keys = list(spec.grid)
    configs: list[Config] = []
    seen: set[Path] = set()
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        for seed in spec.seeds or [None]:
            overrides = {**spec.base, **dict(zip(keys, combo)), "name": spec.name}
            if seed is not None:
                overrides["train.seed"] = seed
            try:
                cfg = build_config(spec.preset, None, overrides)
            except ConfigError as e:
                shown = ", ".join(f"{k}={v}" for k, v in overrides.items() if k in keys or k == "train.seed")
                raise ConfigError(f"sweep {spec.name!r}, run {shown}: {e}") from None
            where = cfg.address(root)  # <name>-<digest>, and an image folder's contents key
            if where in seen:
                continue
            seen.add(where)
            cfg.out = str(where)
            configs.append(cfg)
    return configs


# ------------------------------------------------------------------ results on disk

def finished_summary(cfg: Config) -> dict | None:
    """The summary of a run of exactly this config that needs no more work, else None."""
    summary = RunDir(cfg.run_dir()).summary()
    if summary and summary.get("status") in DONE and cfg.matches(summary.get("config_digest")):
        return summary
    return None


def run_state(cfg: Config) -> str:
    """What a dry run says of a run: done; the status its summary records (failed, interrupted, ...);
    "conflict" where its folder holds a run of another config; "resumable" where a kill left a checkpoint and
    no summary; else new."""
    run = RunDir(cfg.run_dir())
    if run.holds_another_config(cfg):
        return "conflict"
    if finished_summary(cfg):
        return "done"
    summary = run.summary()
    if summary:
        return summary.get("status", "unknown")
    return "resumable" if (run.checkpoints / "last.pt").exists() else "new"


def record_failure(cfg: Config, error: str, detail: str = "") -> dict:
    """Write a "failed" summary into the run directory, so reports list the run and a re-run retries it
    (unless the directory holds another config's run, or this run is finished, or another process holds
    its lock: those are left alone)."""
    summary = {"status": "failed", "error": error, "traceback": detail, "config_digest": cfg.digest()}
    run = RunDir(cfg.run_dir())
    try:
        with run_lock(run.path, create=True):
            _write_failure(run, cfg, summary)
    except RunInUse:  # another process is writing the run (e.g. it failed to start here because of that)
        pass
    return summary


def _write_failure(run: RunDir, cfg: Config, summary: dict) -> None:
    try:
        existing = run.summary()
    except ValueError:  # unreadable JSON: replace it
        existing = None
    recorded = existing.get("config_digest") if existing else None
    if existing and ((recorded is not None and not cfg.matches(recorded)) or finished_summary(cfg)):
        return
    if not run.config_path.exists():
        run.config_path.write_text(cfg.to_yaml())
    run.write_summary(summary)


def run_one(cfg: Config, progress: bool = False, stop=None) -> dict:
    """Run (resume, or skip) one config; an exception becomes a "failed" summary, never a crash. A run that
    another process is training (two sweeps or experiments sharing runs) is waited for, then taken as that
    process left it: finished, or resumed here. stop: a train.callbacks.StopFlag the caller has entered."""
    from ..train.loop import distill
    while True:
        try:
            return distill(cfg, progress=progress, stop=stop).summary  # continues from last.pt where there is one
        except RunInUse as e:
            print(f"waiting: {e}", file=sys.stderr, flush=True)
            wait_until_free(cfg.run_dir())
        except Exception as e:  # noqa: BLE001 - one broken run must not stop a sweep
            return record_failure(cfg, f"{type(e).__name__}: {e}", traceback.format_exc())


def _summary_stamp(cfg: Config) -> tuple[int, int] | None:
    """Identity of the summary file; write_json replaces it atomically, so any rewrite changes it."""
    try:
        st = (Path(cfg.run_dir()) / "summary.json").stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _with_path(summary: dict, cfg: Config) -> dict:
    return {**summary, "run_dir": str(cfg.run_dir())}


# ------------------------------------------------------------------ local launcher

@dataclass(frozen=True)
class _Slot:
    """What a worker process gets besides its runs: torch threads, and the GPU it may use (None: all that
    CUDA_VISIBLE_DEVICES shows it, or none); `say`: print the GPU it took; `stack_mode`: how its stacks train."""
    threads: int
    gpu: str | None = None
    say: bool = False
    stack_mode: str = "auto"

    def enter(self, run_dir: str) -> None:
        """Set up this worker process, first thing: CUDA reads CUDA_VISIBLE_DEVICES once, when it starts."""
        _stop_with_parent()
        if self.gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = self.gpu
            if self.say:  # one write of the whole line: workers share the sweep's stderr
                sys.stderr.write(f"  {run_dir}: GPU {os.environ['CUDA_VISIBLE_DEVICES']}\n")
                sys.stderr.flush()
        import torch
        torch.set_num_threads(self.threads)


def _local_worker(cfg_dict: dict, slot: _Slot) -> None:
    """Entry point of one worker process: one run, result in the run directory."""
    cfg = config_from_dict(cfg_dict)
    slot.enter(str(cfg.run_dir()))
    run_one(cfg)


def _stacked_worker(cfg_dicts: list[dict], slot: _Slot) -> None:
    """Entry point of one worker process that trains several runs stacked (randteach.train.stacked)."""
    cfgs = [config_from_dict(d) for d in cfg_dicts]
    slot.enter(", ".join(str(c.run_dir()) for c in cfgs))
    run_stacked(cfgs, slot.stack_mode, progress=slot.say)


def run_stacked(cfgs: list[Config], mode: str = "auto", progress: bool = False) -> list[dict]:
    """Train `cfgs` stacked (`mode`: train.stacked.stack_mode); an exception becomes a "failed" summary, never a
    crash. A stack that raises as a whole (a vmap stack whose one run cannot start) trains its runs alone, so
    that the one run's failure is its own and the others finish."""
    from ..train.stacked import train_stacked
    try:
        results = train_stacked(cfgs, progress, mode)
    except Exception as e:  # noqa: BLE001 - one broken group must not stop a sweep
        if len(cfgs) == 1:
            return [record_failure(cfgs[0], f"{type(e).__name__}: {e}", traceback.format_exc())]
        print(f"  the stack failed ({type(e).__name__}: {e}); its {len(cfgs)} runs train alone", file=sys.stderr,
              flush=True)
        results: list[dict] = []
        for c in cfgs:  # a run interrupted by the sweep's stop leaves the rest unbegun, as a stopped sweep does
            stopped = results and results[-1].get("status") == "interrupted"
            results.append({"status": "pending"} if stopped else run_one(c))
        return results
    return [_after_stack(r, c) for r, c in zip(results, cfgs)]


def _after_stack(result: dict, cfg: Config) -> dict:
    """A stacked run's result as a sweep keeps it: a run another process was training when the stack began is
    waited for (as a run alone is), and a run that failed alone in the stack gets its failed summary written."""
    if result.get("in_use"):
        return run_one(cfg)
    if result["status"] == "failed":
        return record_failure(cfg, result["error"], result.get("traceback", ""))
    return result


def _jobs(configs: list[Config], todo: list[int], stack: int, mode: str) -> tuple[list[list[int]], list[str]]:
    """The runs to do as worker jobs: one run each, or (stack > 1) groups of up to `stack` stackable runs; and
    what the sweep says about them (the runs that train alone and why)."""
    if stack <= 1:
        return [[i] for i in todo], []
    from ..train.setup import resolve_device
    from ..train.stacked import stack_groups, stack_mode
    groups, alone = stack_groups([configs[i] for i in todo], stack, mode)
    lines = [f"not stacked: {configs[todo[j]].run_dir()}: {why}" for j, why in alone.items()]
    stacked = [configs[todo[g[0]]] for g in groups if len(g) > 1]
    if stacked and stack_mode(stacked[0], mode) == "vmap" and resolve_device(stacked[0].train.device).type == "cpu":
        lines.append("note: on a CPU a vmap stack pays only where per-operation overhead bounds the step (tiny models "
                     "and batches); a conv encoder at batch 64 trains 1.1-2.6x faster one run at a time, or side by "
                     "side with --stack-mode threads (docs/PERFORMANCE.md, Stacked runs)")
    return [[todo[j] for j in g] for g in groups], lines


class LocalPlan(NamedTuple):
    """How the local launcher will do a sweep's runs: what it says before it starts (`lines`), and the jobs."""
    results: list[dict | None]  # the finished runs' summaries; None where a run is still to do
    jobs: list[list[int]]       # the runs to do, as worker jobs (indices into the configs)
    gpus: list[str]
    workers: int
    threads: int                # torch threads of each worker
    lines: list[str]


def plan_local(configs: list[Config], workers: int | None, stack: int = 1, stack_mode: str = "auto") -> LocalPlan:
    """The local launcher's plan (`--dry-run` prints its lines; `_run_local` says them and carries it out)."""
    from ..train.stacked import stack_mode as resolve_mode
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1 (or left out: one per visible GPU, else 1), got {workers}")
    results, todo = _split_done(configs)
    jobs, lines = _jobs(configs, todo, stack, stack_mode)
    refused = [r for r in results if r is not None and r["status"] == "failed"]
    lines += [f"not run: {r['error']}" for r in refused]
    gpus = visible_gpus() if any(_wants_gpu(configs[i]) for i in todo) else []
    workers = max(1, min(workers if workers is not None else len(gpus) or 1, len(jobs) or 1))
    threads = threads_per_worker(workers)
    stacks = [job for job in jobs if len(job) > 1]
    modes = sorted({resolve_mode(configs[job[0]], stack_mode) for job in stacks})
    lines.append(f"sweep: {counted(len(configs), 'run')}, {len(configs) - len(todo) - len(refused)} already done, "
                 + (f"{len(refused)} not run (above), " if refused else "") + f"{len(todo)} to run"
                 + (f" as {counted(len(stacks), 'stack')} of up to {stack} ({', '.join(modes)})" if stacks else "")
                 + (f" and {counted(len(jobs) - len(stacks), 'run')} alone" if stacks and len(jobs) > len(stacks) else "")
                 + (f" on {counted(workers, 'worker process', 'worker processes')} with "
                    f"{counted(threads, 'torch thread')} each" if todo else "")
                 + (f", each on one of the GPUs {', '.join(gpus)}" if gpus and todo else ""))
    return LocalPlan(results, jobs, gpus, workers, threads, lines)


def _stop_with_parent() -> None:
    """SIGTERM this worker when the sweep process dies (even by SIGKILL), so that the run checkpoints and
    stops instead of living on beside a re-started sweep that would run it a second time."""
    import multiprocessing
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="watch-sweep", daemon=True).start()


def _worker_context():
    """A fresh process per run, never a fork of the (threaded) sweep: the forkserver, whose one-time
    preload of torch and randteach saves each run the ~3-7 s import, else spawn."""
    import multiprocessing
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["randteach.runs.sweep", "randteach.train.loop", "randteach.train.stacked",
                                    "torch._dynamo"])
        return ctx
    return multiprocessing.get_context("spawn")


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices, UUIDs or MIG ids), or
    their indices when the variable is not set; [] without CUDA."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def _wants_gpu(cfg: Config) -> bool:
    """A run that takes whichever GPU it sees ("auto", "cuda"); one pinned to "cpu" or "cuda:N" is left as is."""
    return cfg.train.device in ("auto", "cuda")


def _least_used(gpus: list[str], in_use: list[str | None]) -> str:
    """The GPU with the fewest running workers (`in_use`: each worker's GPU), the first of those: one worker
    per GPU before a second."""
    return min(gpus, key=lambda g: (in_use.count(g), gpus.index(g)))


class _Worker(NamedTuple):
    """A running worker process: its jobs' indices, their summary stamps before the start, its GPU."""
    proc: Any
    job: list[int]
    stamps: list
    started: float
    gpu: str | None


def _start_worker(ctx, configs: list[Config], job: list[int], slot: _Slot) -> _Worker:
    target, arg = ((_local_worker, configs[job[0]].to_dict()) if len(job) == 1 else
                   (_stacked_worker, [configs[i].to_dict() for i in job]))
    stamps = [_summary_stamp(configs[i]) for i in job]
    for attempt in range(3):
        proc = ctx.Process(target=target, args=(arg, slot), name=f"randteach-sweep-{job[0]}")
        try:
            proc.start()
            break
        except (EOFError, ConnectionError):
            # The forkserver was killed (by hand, or by a kill of its process group) and not yet reaped: the
            # next start finds it dead and launches a new one.
            if attempt == 2:
                raise
            time.sleep(0.5)
    return _Worker(proc, job, stamps, time.perf_counter(), slot.gpu)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_worker(workers: int) -> int:
    """Torch threads of each of `workers` processes: $OMP_NUM_THREADS where the user set it (as torch itself
    reads it), else the cores this process may use shared out."""
    given = re.fullmatch(r"\s*(\d+)\s*(,.*)?", os.environ.get("OMP_NUM_THREADS", ""), re.ASCII)  # "4" or "4,2"
    if given and int(given.group(1)) > 0:
        return int(given.group(1))
    return max(1, available_cores() // workers)


def _signal_worker(proc, sig: int) -> None:
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:  # it has just exited
        pass


@contextlib.contextmanager
def _stop_workers_on_signal(workers: dict):
    """In the sweep's parent: the first SIGTERM/SIGINT asks the running workers to checkpoint and stop (they
    write status "interrupted") and starts no new run; a second one kills them outright. Yields a dict
    whose "signal" is the first signal received (None until then)."""
    state = {"signal": None, "count": 0}

    def handle(signum, frame):
        state["signal"] = state["signal"] or signum
        state["count"] += 1
        for w in workers.values():
            _signal_worker(w.proc, signal.SIGTERM if state["count"] == 1 else signal.SIGKILL)

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield state
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _split_done(configs: list[Config]) -> tuple[list[dict | None], list[int]]:
    """(results with the finished runs filled in, and a "failed" result for each run whose folder holds a
    run of another config, which no worker could write into; indices of the runs still to do)."""
    results: list[dict | None] = [None] * len(configs)
    todo = []
    for i, cfg in enumerate(configs):
        try:
            RunDir(cfg.run_dir()).refuse_another_config(cfg)
        except UserError as e:
            results[i] = _with_path({"status": "failed", "error": str(e)}, cfg)
            continue
        done = finished_summary(cfg)
        if done is not None:
            results[i] = _with_path(done, cfg)
        else:
            todo.append(i)
    return results, todo


def _run_local(configs: list[Config], workers: int | None, progress: bool, stack: int = 1,
               stack_mode: str = "auto") -> list[dict]:
    """Run the jobs in worker processes, `workers` at a time (None: one per visible GPU when the runs use
    GPUs, else one); on GPUs each worker is pinned to the least used GPU when it starts."""
    from multiprocessing.connection import wait

    ctx = _worker_context()
    plan = plan_local(configs, workers, stack, stack_mode)
    results, gpus, workers, threads = plan.results, plan.gpus, plan.workers, plan.threads
    log = _Progress(sum(map(len, plan.jobs)), progress)
    for line in plan.lines:
        log.line(line)
    pending = list(reversed(plan.jobs))
    running: dict[Any, _Worker] = {}  # by the process's sentinel
    with _stop_workers_on_signal(running) as stop:
        while running or (pending and stop["signal"] is None):
            while pending and stop["signal"] is None and len(running) < workers:
                job = pending.pop()
                in_use = [w.gpu for w in running.values()]
                gpu = _least_used(gpus, in_use) if gpus and _wants_gpu(configs[job[0]]) else None
                worker = _start_worker(ctx, configs, job, _Slot(threads, gpu, progress, stack_mode))
                running[worker.proc.sentinel] = worker
                if stop["signal"] is not None:  # the signal came while this worker was starting
                    _signal_worker(worker.proc, signal.SIGTERM)
            for sentinel in wait(list(running), timeout=1.0):
                w = running.pop(sentinel)
                w.proc.join()
                for i, stamp in zip(w.job, w.stamps):
                    collected = _collect_local(configs[i], w.proc.pid, w.proc.exitcode, stamp, stop["signal"])
                    results[i] = _with_path(collected, configs[i])
                    log.finished(results[i], time.perf_counter() - w.started)
    for job in pending:
        for i in job:
            results[i] = _with_path({"status": "pending"}, configs[i])
    return results  # type: ignore[return-value]


def _collect_local(cfg: Config, worker: int, exitcode: int | None, stamp, stopping: int | None) -> dict:
    """The result a worker left in its run directory — or a completed run's summary that another process
    wrote after this sweep was planned (two sweeps sharing runs; the worker then had nothing to do); a
    worker that died without either is a failure, unless the sweep itself was being stopped (then a run that
    never took a step, one a stack had not begun, is "pending")."""
    # A worker reported gone may still be writing: one started by a forkserver that was killed is reported
    # at once (exit code 255) while it checkpoints and stops. Its run's lock says when it is done; a lock
    # that another process holds (a second sweep sharing the run) is not this worker's to wait for.
    wait_until_free(cfg.run_dir(), holder=worker)
    summary = RunDir(cfg.run_dir()).summary() if _summary_stamp(cfg) != stamp else finished_summary(cfg)
    if summary is not None:
        return summary
    if stopping is not None:
        run = RunDir(cfg.run_dir())
        began = (run.checkpoints / "last.pt").exists() or any(r.get("event") == "step" for r in run.records())
        return {"status": "interrupted" if began else "pending", "signal": signal.Signals(stopping).name}
    if exitcode is not None and exitcode < 0:
        how = f"was killed by {signal.Signals(-exitcode).name} before writing a summary (out of memory?)"
    else:
        how = f"exited with code {exitcode} without writing a summary"
    return record_failure(cfg, f"worker process {how}")


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = total, enabled, 0

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def finished(self, result: dict, seconds: float) -> None:
        self.done += 1
        probe = result.get("probe", {}).get("student", {})
        acc = " ".join(f"{k} {100 * v:.1f}%" for k, v in probe.items() if isinstance(v, (int, float)))
        extra = f"student {acc}" if acc else result.get("error", "")
        if acc and result["status"] != "completed" and result.get("probe_epoch") is not None:
            extra += f" (its last probe, of epoch {result['probe_epoch']:.4g})"  # not the run's result
        self.line(f"[{self.done}/{self.total}] {result['status']:<11} {result['run_dir']} ({seconds:.0f} s) {extra}")


# ------------------------------------------------------------------ SLURM launcher (submitit)

class SlurmRun:
    """The submitit job: one run. On pre-emption or time-out (SIGUSR2 from SLURM) or SIGTERM, the run
    checkpoints first, then submitit requeues the job, which resumes from that checkpoint."""

    def __init__(self, threads: int | None = None):
        self.threads = threads  # torch threads: the job's cpus_per_task

    def __call__(self, cfg_dict: dict) -> dict:
        from ..train.callbacks import StopFlag
        if self.threads:
            import torch
            torch.set_num_threads(self.threads)
        cfg = config_from_dict(cfg_dict)
        requeue_handler = signal.getsignal(signal.SIGUSR2)
        asked: list[int] = []

        def checkpoint_first(signum, frame):
            asked.append(signum)
            os.kill(os.getpid(), signal.SIGTERM)  # distill's own handler: checkpoint, status "interrupted"

        if callable(requeue_handler):
            signal.signal(signal.SIGUSR2, checkpoint_first)
        # The flag catches SIGTERM from the job's start: one sent while the run loads its data, builds its
        # models or computes its teacher cache was dropped by submitit's handler, and the job not requeued.
        with StopFlag() as stop:
            summary = run_one(cfg, stop=stop)
        if summary.get("status") == "interrupted" and callable(requeue_handler):
            requeue_handler(asked[0] if asked else signal.SIGUSR2, None)  # requeues and exits
        return summary

    def checkpoint(self, cfg_dict: dict):
        import submitit
        return submitit.helpers.DelayedSubmission(self, cfg_dict)


def _minutes(value) -> int:
    """SLURM --time or minutes -> whole minutes (rounded up). SLURM's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
    A sweep file's `time: 2:00:00` arrives as text: `config.load_yaml` reads no base-60 numbers."""
    wrong = ConfigError(f"slurm time {value!r}: expected a positive number of minutes or SLURM's M:S, H:M:S, D-H, "
                        "D-H:M or D-H:M:S (e.g. 1-12:00 for a day and a half)")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        minutes = math.ceil(value) if math.isfinite(value) else 0
    else:
        days, _, clock = str(value).strip().rpartition("-")
        try:
            parts = [int(p) for p in clock.split(":")]
            if len(parts) > 3 or (days and int(days) < 0):
                raise ValueError
        except ValueError:
            raise wrong from None
        # after a day count the fields are H[:M[:S]]; without one, M, M:S or H:M:S
        h, m, sec = (parts + [0, 0])[:3] if days else (parts if len(parts) == 3 else [0, *parts, 0][:3])
        minutes = int(days or 0) * 1440 + h * 60 + m + (1 if sec else 0)
    if minutes <= 0:  # SLURM reads a limit of 0 as none at all
        raise wrong
    return minutes


def submitit_parameters(slurm: dict, name: str) -> dict:
    _check_slurm(slurm, "slurm options")
    params: dict[str, Any] = {"name": name, "timeout_min": 24 * 60}
    for key, value in slurm.items():
        if key in SLURM_KEYS:
            params[SLURM_KEYS[key]] = _minutes(value) if key == "time" else value
    return params


def _cannot_submit(slurm: dict) -> str | None:
    """Why `--launcher slurm` cannot submit from this machine, or None."""
    try:
        import submitit
    except ImportError:
        return "--launcher slurm needs submitit: pip install 'randteach[slurm]'"
    if not slurm.get("cluster") and submitit.AutoExecutor.which() != "slurm":  # submitit's fallback, unasked for
        return ("--launcher slurm: there is no SLURM here (no srun on PATH), and submitit would run the jobs on "
                "this machine; say so with --slurm cluster=local, or use --launcher local")
    return None


def _run_slurm(configs: list[Config], slurm: dict, progress: bool) -> list[dict]:
    why = _cannot_submit(slurm)
    if why:
        raise ConfigError(why)
    import submitit
    results, todo = _split_done(configs)
    log = _Progress(len(todo), progress)
    folder = _submitit_folder(configs, slurm)
    log.line(f"sweep: {counted(len(configs), 'run')}, {len(configs) - len(todo)} already done, submitting "
             f"{counted(len(todo), 'job')}; submitit logs in {folder}")
    if todo:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=slurm.get("cluster"))
        executor.update_parameters(**submitit_parameters(slurm, f"randteach-{configs[todo[0]].name}"))
        jobs = executor.map_array(SlurmRun(slurm.get("cpus_per_task")), [configs[i].to_dict() for i in todo])
        for i, job in zip(todo, jobs):
            t0 = time.perf_counter()
            try:
                summary = job.result()
            except Exception as e:  # noqa: BLE001 - a failed job is a result of the sweep
                last_line = (str(e).strip().splitlines() or [""])[-1]
                summary = record_failure(configs[i], f"SLURM job {job.job_id} failed: {type(e).__name__}: "
                                         f"{last_line} (log: {job.paths.stderr})", str(e))
            results[i] = _with_path(summary, configs[i])
            log.finished(results[i], time.perf_counter() - t0)
    return results  # type: ignore[return-value]


def _submitit_folder(configs: list[Config], slurm: dict) -> Path:
    roots = {str(Path(cfg.run_dir()).parent) for cfg in configs}
    return Path(slurm.get("folder") or Path(os.path.commonpath(sorted(roots)) if roots else "runs") / ".submitit")


def plan_slurm(configs: list[Config], slurm: dict) -> str:
    """What `--launcher slurm` would submit, for a dry run: jobs, cluster, submitit parameters, log folder."""
    _, todo = _split_done(configs)
    params = submitit_parameters(slurm, f"randteach-{configs[todo[0]].name}" if todo else "randteach")
    why = _cannot_submit(slurm)
    return (f"would submit {counted(len(todo), 'job')} as one job array to {slurm.get('cluster') or 'slurm'} ("
            + ", ".join(f"{k}={v}" for k, v in params.items()) + f"); submitit logs in {_submitit_folder(configs, slurm)}"
            + (f"\nnote: not from this machine: {why}" if why else ""))


def check_slurm_given(slurm: dict, launcher: str) -> None:
    """SLURM options given beside the file's or recipe's: only the slurm launcher reads them."""
    if slurm and launcher != "slurm":
        raise ConfigError(f"SLURM options ({', '.join(f'{k}={v}' for k, v in slurm.items())}) do nothing with "
                          f"--launcher {launcher}; add --launcher slurm, or drop them")


def check_stack_options(stack: int, stack_mode: str, launcher: str, workers: int | None = None) -> None:
    """--stack K, --stack-mode and --workers as a sweep or an experiment can take them (before anything runs):
    none is ignored without a word."""
    from ..train.stacked import STACK_MODES
    if stack < 1:
        raise ConfigError(f"--stack must be at least 1, got {stack}")
    if stack_mode not in STACK_MODES:
        raise ConfigError(f"--stack-mode {stack_mode}: expected one of {', '.join(STACK_MODES)}")
    if stack_mode != "auto" and stack == 1:
        raise ConfigError(f"--stack-mode {stack_mode} says how stacks of runs train; add --stack K (K > 1) to make them")
    if launcher != "local" and (stack > 1 or workers is not None):
        raise ConfigError(f"{'--stack' if stack > 1 else '--workers'} works with --launcher local only (on SLURM "
                          "each run is its own job); drop it")


def run_sweep(configs: list[Config], launcher: str = "local", workers: int | None = None, progress: bool = True,
              slurm: dict | None = None, stack: int = 1, stack_mode: str = "auto") -> list[dict]:
    """Execute every config (skipping finished runs); one summary per config, in order.

    Each returned summary carries "run_dir". Status is completed, diverged, interrupted, failed
    (with "error"), or pending (the sweep was stopped before the run started). Local launcher: `workers`
    processes at a time (None: one per visible GPU when the runs use GPUs, else one), each pinned to one
    GPU where there are GPUs; stack > 1: up to `stack` runs at a time in one process, as `stack_mode` says
    (train.stacked.stack_mode: auto, vmap or threads).
    """
    check_stack_options(stack, stack_mode, launcher, workers)
    if launcher == "local":
        return _run_local(configs, workers, progress, stack, stack_mode)
    if launcher == "slurm":
        return _run_slurm(configs, dict(slurm or {}), progress)
    raise ConfigError(f"unknown launcher {launcher!r}; use local or slurm")
