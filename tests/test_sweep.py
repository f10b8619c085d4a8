"""Sweeps: grid expansion, real worker processes, real signals, submitit's local executor."""
import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from randteach.cli import main
from randteach.config import ConfigError, build_config
from randteach.runs.rundir import RunDir
from randteach.runs.sweep import SlurmRun, expand, load_sweep, run_sweep

from tiny import TINY

# A run of a few seconds: 6 steps, k-NN probes only, on small probe subsets.
FAST = {**TINY, "train.max_steps": 6, "train.probe_every": 0, "probe.linear": "none",
        "probe.n_train": 200, "probe.n_test": 100}


def write_sweep(tmp_path, name="s", **spec) -> Path:
    doc = {"preset": "cpu", "name": name, "base": dict(FAST), "out": str(tmp_path / "runs"), **spec}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_sweep_dry_run_names_data_that_is_not_on_disk(tmp_path, capsys):
    path = write_sweep(tmp_path, base={**FAST, "data.name": "cifar10", "data.root": str(tmp_path / "empty")})
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert f"note: CIFAR-10 is not on disk (searched under {tmp_path / 'empty'}); get it with: randteach data " \
        "fetch cifar10" in capsys.readouterr().out
    # probe data the runs do not read (probe.which empty) is no note
    path = write_sweep(tmp_path, name="t", base={**FAST, "probe.data": "cifar10", "probe.which": [],
                                                 "data.root": str(tmp_path / "empty")})
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "CIFAR-10" not in capsys.readouterr().out


def summaries(root: Path) -> dict[Path, dict]:
    return {p.parent: RunDir(p.parent).summary() for p in sorted(root.glob("*/summary.json"))}


def stamps(root: Path) -> dict[Path, tuple[int, int]]:
    out = {}
    for p in root.glob("*/summary.json"):
        st = p.stat()
        out[p.parent] = (st.st_ino, st.st_mtime_ns)
    return out


# ------------------------------------------------------------------ expansion

def test_expand_is_the_product_times_seeds_with_distinct_stable_digests(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, grid={"init.alpha": [1e-10, 0.5], "optim.lr": [1e-3, 1e-2]},
                                  seeds=[0, 1, 2]))
    configs = expand(spec)
    assert len(configs) == 2 * 2 * 3
    assert len({c.digest() for c in configs}) == 12
    assert [c.train.seed for c in configs[:3]] == [0, 1, 2]          # seeds vary fastest
    assert {(c.init.alpha, c.optim.lr) for c in configs} == {(a, lr) for a in (1e-10, 0.5) for lr in (1e-3, 1e-2)}
    for c in configs:
        assert Path(c.out) == tmp_path / "runs" / f"s-{c.digest()}"
        assert c.run_dir() == Path(c.out)
        assert c.train.max_steps == 6 and c.data.name == "digits"   # base applied
    # Stable: the same file expands to the same runs; a run's address is Config.digest() of its values.
    assert [c.out for c in expand(load_sweep(tmp_path / "s.yaml"))] == [c.out for c in configs]
    same = build_config("cpu", None, {**FAST, "name": "s", "init.alpha": 0.5, "optim.lr": 1e-2, "train.seed": 1})
    assert any(c.digest() == same.digest() for c in configs)


def test_expand_removes_duplicates_and_accepts_nested_sections(tmp_path):
    import dataclasses
    spec = load_sweep(write_sweep(tmp_path, name="a", grid={"init.alpha": [0.5, 1]}, seeds=[0, 1]))
    dotted = expand(dataclasses.replace(spec, grid={"init.alpha": [0.5, 0.5, 1]}))  # as a recipe's arms may
    assert len(dotted) == 4
    nested = expand(load_sweep(write_sweep(tmp_path, name="a", grid={"init": {"alpha": [0.5, 1.0]}}, seeds=[0, 1],
                                           base={"train": {"max_steps": 6}, **{k: v for k, v in FAST.items()
                                                                                if k != "train.max_steps"}})))
    assert [c.out for c in nested] == [c.out for c in dotted]


@pytest.mark.parametrize("text, message", [
    ("grdi: {init.alpha: [1]}", "unknown key(s) grdi"),
    ("grid: {init.alfa: [0.1]}", "init.alfa"),
    ("grid: {init.alpha: 0.5}", "non-empty list"),
    ("grid: {init.alpha: []}", "non-empty list"),
    ("grid: {init.alpha: [0.5, 2.0]}", "init.alpha: 2.0 is out of range; valid: a finite number in [0, 1]"),
    ("grid: {optim.name: [adamw, lion]}", "optim.name: 'lion' is not a valid choice"),
    ("seeds: [0, one]", "seeds must be a non-empty list of integers"),
    ("seeds: []", "seeds must be a non-empty list of integers"),
    ("grid: {log.tensorboard: [true, false]}", "grid key 'log.tensorboard' does not change what a run computes"),
    ("grid: {data.root: [/a, /b]}", "grid key 'data.root' does not change what a run computes"),
    ("seeds: 3", "seeds: [0, 1, 2] for 3 seeds, or seeds: [3] for seed 3 alone"),
    ("", "is empty"),
    ("base: {out: elsewhere}", "top level"),
    ("grid: {train.seed: [0, 1]}\nseeds: [0]", "both in grid and in seeds"),
    ("slurm: {partitoin: gpu}", "unknown slurm key(s) partitoin"),
    ("preset: nope", "unknown preset 'nope'"),
    ("- a\n- b", "must hold a mapping"),
    ("grid: [", "not valid YAML"),
    ("name: [a, b]", "name names one folder"),
    ("grid: {data.local_crops: [0, 2]}", "the run data.local_crops=2: data.local_crops / data.local_crop_size"),
    # each lost values without a word: one spelling replaced the other, a repeat was one run
    ("grid: {train.max-steps: [3, 4], train.max_steps: [5]}",
     "'train.max-steps' and 'train.max_steps' are one key (train.max_steps)"),
    ("grid: {train: {max_steps: [3]}, train.max_steps: [4, 5]}", "are one key (train.max_steps)"),
    ("base: {optim.lr: 0.1, optim: {lr: 0.2}}", "base: 'optim.lr' and 'optim.lr' are one key"),
    ("grid: {init.alpha: [0.1, 0.5, 0.1]}", "grid key 'init.alpha' lists 0.1 more than once"),
    ("seeds: [0, 1, 0]", "seeds lists 0 more than once"),
])
def test_bad_sweep_files_give_clear_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert message in str(e.value)


def test_grid_keys_that_need_each_other_are_checked_together(tmp_path):
    """Local crops need dino views: valid when the grid sets both, whatever base alone would say."""
    path = write_sweep(tmp_path, grid={"data.augment": ["dino"], "data.local_crops": [2, 4]})
    assert [c.data.local_crops for c in expand(load_sweep(path))] == [2, 4]


def test_bad_sweep_file_on_the_command_line_is_one_message(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("grid: {init.alpha: [0.5, 2.0]}\n")
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "init.alpha: 2.0 is out of range" in err and "Traceback" not in err


def test_dry_run_lists_the_runs_with_command_line_overrides(tmp_path, capsys):
    path = write_sweep(tmp_path, grid={"init.alpha": [1e-10, 1.0]}, seeds=[0, 1])
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "elsewhere"), "--train.max_steps", "3"]) == 0
    out = capsys.readouterr().out
    spec = load_sweep(path)
    spec.out, spec.base["train.max_steps"] = str(tmp_path / "elsewhere"), 3
    for cfg in expand(spec):
        assert f"new         {cfg.out}  init.alpha={cfg.init.alpha:g} train.seed={cfg.train.seed}" in out
    assert not (tmp_path / "elsewhere").exists()                    # nothing run
    assert "sweep: 4 runs, 0 already done, 4 to run on 1 worker process with" in out  # the plan, as a run says it
    assert main(["sweep", str(path), "--dry-run", "--stack", "4", "--stack-mode", "threads", "--workers", "3"]) == 0
    assert "4 to run as 1 stack of up to 4 (threads) on 1 worker process with" in capsys.readouterr().out
    assert main(["sweep", str(path), "--dry-run", "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert main(["sweep", str(path), "--launcher", "slurm", "--slurm", "partitoin=gpu"]) == 2
    assert "unknown slurm key(s) partitoin" in capsys.readouterr().err


def test_dry_run_says_which_runs_a_kill_left_resumable_and_which_folders_hold_another_run(tmp_path, capsys):
    path = write_sweep(tmp_path, grid={"init.alpha": [0.1, 0.5, 1.0]})
    killed, foreign, fresh = expand(load_sweep(path))
    (killed.run_dir() / "checkpoints").mkdir(parents=True)
    (killed.run_dir() / "checkpoints" / "last.pt").write_bytes(b"")  # a kill: a checkpoint, no summary
    other = RunDir(foreign.run_dir()).create()  # a run of another config, `distill --out` into this folder
    other.config_path.write_text(killed.to_yaml())
    other.write_summary({"status": "completed", "config_digest": killed.digest()})
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for cfg, state in ((killed, "resumable"), (foreign, "conflict"), (fresh, "new")):
        assert f"  {state:<11} {cfg.run_dir()}  " in out
    assert f"not run: {foreign.run_dir()} holds a run with a different config" in out
    assert "3 runs, 0 already done, 1 not run (above), 2 to run" in out
    # run, it is a failure with that reason (no worker could write into that folder), the other run untouched
    [result] = run_sweep([foreign], progress=False)
    assert result["status"] == "failed" and "holds a run with a different config" in result["error"]
    assert RunDir(foreign.run_dir()).summary()["config_digest"] == killed.digest()


def test_dry_run_lists_a_swept_teacher_checkpoint(tmp_path, capsys):
    teachers = [str(tmp_path / "teacher-a"), str(tmp_path / "teacher-b")]
    path = write_sweep(tmp_path, grid={"init.teacher_checkpoint": teachers}, seeds=[0, 1])
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for cfg in expand(load_sweep(path)):
        assert f"{cfg.out}  init.teacher_checkpoint={cfg.init.teacher_checkpoint} train.seed={cfg.train.seed}" in out


# ------------------------------------------------------------------ running

def _start_sweep(path: Path, *args) -> subprocess.Popen:
    log = open(path.with_suffix(".log"), "ab")
    return subprocess.Popen([sys.executable, "-m", "randteach.cli", "sweep", str(path), *args],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def session_alive(sid: int) -> bool:
    """Is any process of this session (the sweep, its forkserver, its workers) still running?"""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == sid:
                return True
        except (OSError, IndexError, ValueError):
            continue
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_sweep_reruns_only_the_missing_runs_and_reports_each_once(tmp_path, sig, capsys):
    # 2 alphas x 2 seeds on 2 workers; the sweep's parent is signalled once a run has finished. SIGTERM: the
    # parent passes it on (running runs checkpoint, status "interrupted") and starts nothing new. SIGKILL: the
    # workers see their parent die and stop the same way, rather than run on beside a re-started sweep.
    path = write_sweep(tmp_path, grid={"init.alpha": [1e-10, 1.0]}, seeds=[0, 1])
    root = tmp_path / "runs"
    proc = _start_sweep(path, "--workers", "2")
    deadline = time.time() + 120
    while not any(s and s["status"] == "completed" for s in summaries(root).values()):
        assert proc.poll() is None and time.time() < deadline, path.with_suffix(".log").read_text()
        time.sleep(0.1)
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=60) == (3 if sig == signal.SIGTERM else -signal.SIGKILL)  # 3: as distill, experiment
    while session_alive(proc.pid):
        assert time.time() < deadline + 60, "workers outlived their sweep"
        time.sleep(0.1)
    for p in root.glob("*/metrics.jsonl"):                          # every started run stopped cleanly
        assert summaries(root)[p.parent]["status"] in ("completed", "interrupted")
    done = {p: st for p, st in stamps(root).items() if summaries(root)[p]["status"] == "completed"}
    assert 1 <= len(done) < 4

    results = run_sweep(expand(load_sweep(path)), workers=2)     # the re-run
    assert f"{len(done)} already done, {4 - len(done)} to run" in capsys.readouterr().err
    final = summaries(root)
    assert [r["status"] for r in results] == ["completed"] * 4
    assert len(final) == 4 and all(s["status"] == "completed" for s in final.values())
    assert {p: stamps(root)[p] for p in done} == done              # finished results untouched
    for p, s in final.items():
        assert s["steps"] == 6
        assert len([r for r in RunDir(p).records() if "loss" in r]) == 6   # resumed runs log each step once

    assert main(["report", str(root), str(root / next(iter(final)).name)]) == 0   # overlapping dirs
    with open(root / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert sorted(r["run_dir"] for r in runs) == sorted(str(p.resolve()) for p in final)
    with open(root / "report.csv") as f:
        groups = list(csv.DictReader(f))
    assert [(g["init.alpha"], g["n"]) for g in groups] == [("1e-10", "2"), ("1.0", "2")]


def test_workers_take_the_least_used_gpu_one_per_gpu_before_a_second():
    from randteach.runs.sweep import _least_used
    gpus = ["3", "GPU-5f1e", "1"]                          # as CUDA_VISIBLE_DEVICES names them, in its order
    in_use = []
    for _ in range(5):
        in_use.append(_least_used(gpus, in_use))
    assert in_use == ["3", "GPU-5f1e", "1", "3", "GPU-5f1e"]
    in_use.remove("1")                                      # the worker on GPU 1 ends: GPU 1 is the freest
    assert _least_used(gpus, in_use) == "1"
    assert _least_used(gpus, in_use + ["1", "1"]) == "3"    # two on each: the first GPU again
    assert _least_used(gpus, [None, "1"]) == "3"            # a worker without a GPU (a CPU run) counts nowhere


def test_a_local_sweep_runs_one_worker_per_visible_gpu_each_pinned_to_its_own(tmp_path):
    # Real worker processes; the GPUs are named by CUDA_VISIBLE_DEVICES (none exists here, so the runs fall
    # back to the CPU, and on a GPU machine the names hide its real GPUs the same way). Each worker prints
    # the CUDA_VISIBLE_DEVICES it runs under. A run pinned to the CPU gets no GPU.
    base = {**FAST, "train.device": "auto", "probe.which": "[]"}
    path = write_sweep(tmp_path, seeds=[0, 1, 2], base=base)
    pinned = write_sweep(tmp_path, name="cpu", seeds=[0], base={**base, "train.device": "cpu"})
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "5,7", "OMP_NUM_THREADS": "2"}
    out = [subprocess.run([sys.executable, "-m", "randteach.cli", "sweep", str(p)], env=env, capture_output=True,
                          text=True, timeout=300) for p in (path, pinned)]
    assert [r.returncode for r in out] == [0, 0], out[0].stderr + out[1].stderr
    assert "on 2 worker processes with 2 torch threads each, each on one of the GPUs 5, 7" in out[0].stderr
    gpus = {line.rsplit(": GPU ", 1)[0].strip(): line.rsplit(": GPU ", 1)[1]
            for line in out[0].stderr.splitlines() if ": GPU " in line}
    assert sorted(gpus) == sorted(str(c.run_dir()) for c in expand(load_sweep(path)))
    assert set(gpus.values()) == {"5", "7"}                  # the first two runs start at once, one per GPU
    assert "on 1 worker process with" in out[1].stderr and ": GPU " not in out[1].stderr


@pytest.mark.parametrize("workers, stack", [(0, 1), (-1, 1), (1, 0)])
def test_local_worker_and_stack_counts_below_one_are_refused(workers, stack):
    with pytest.raises(ConfigError, match="must be at least 1"):
        run_sweep([build_config("cpu")], workers=workers, stack=stack, progress=False)


def test_worker_threads_are_omp_num_threads_where_set_else_the_cores_shared_out(monkeypatch):
    from randteach.runs.sweep import available_cores, threads_per_worker
    for given in ("3", " 3", "3,2"):  # an OpenMP list names the outer level first
        monkeypatch.setenv("OMP_NUM_THREADS", given)
        assert threads_per_worker(2) == 3
    for unset in ("", "0", "many", "²"):
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert threads_per_worker(1) == available_cores() and threads_per_worker(10 ** 6) == 1


def test_failed_and_diverged_runs_are_results_not_crashes(tmp_path):
    failing = expand(load_sweep(write_sweep(tmp_path, name="bad", base={**FAST, "data.n_samples": 5000})))
    diverging = expand(load_sweep(write_sweep(tmp_path, name="div", base={
        **FAST, "optim.name": "sgd", "optim.lr": 1e12, "loss.name": "mse", "init.mode": "independent",
        "probe.which": "[]"})))
    results = run_sweep(failing + diverging, workers=2, progress=False)
    assert [r["status"] for r in results] == ["failed", "diverged"]
    assert "n_samples=5000" in results[0]["error"]
    assert RunDir(results[0]["run_dir"]).summary()["status"] == "failed"   # on disk: the report lists it
    assert results[1]["diverged_step"] >= 1


def test_a_sweep_with_a_failed_run_says_the_same_command_retries_it(tmp_path, capsys):
    from randteach.cli import main
    path = write_sweep(tmp_path, name="bad", seeds=[0], base={**FAST, "data.n_samples": 5000})
    assert main(["--quiet", "sweep", str(path)]) == 3
    out = capsys.readouterr().out
    assert "sweep bad: 1 failed" in out and "then run the same command again: it retries them" in out


def test_a_run_completed_by_another_sweep_after_planning_stays_completed(tmp_path):
    # Two sweeps that share a run: the second planned it before the first finished it, so its worker
    # found it done and wrote nothing. That is the run's result, not a failure — and the completed
    # summary on disk must not be overwritten with "failed".
    from randteach.runs.sweep import _collect_local, _summary_stamp, record_failure
    cfg = expand(load_sweep(write_sweep(tmp_path, seeds=[0], base={**FAST, "probe.which": "[]"})))[0]
    done = run_sweep([cfg], workers=1, progress=False)[0]
    assert done["status"] == "completed"
    stamp = _summary_stamp(cfg)  # the summary was there when the late worker started
    assert _collect_local(cfg, os.getpid(), 0, stamp, None)["status"] == "completed"
    assert record_failure(cfg, "some later failure")["status"] == "failed"
    assert RunDir(cfg.run_dir()).summary()["status"] == "completed"


def test_submitit_local_executor_runs_a_two_run_sweep(tmp_path):
    configs = expand(load_sweep(write_sweep(tmp_path, grid={"init.alpha": [1e-10, 1.0]}, seeds=[0],
                                            base={**FAST, "probe.which": "[]"})))
    slurm = {"cluster": "local", "time": "0:10:00", "cpus_per_task": 1}
    results = run_sweep(configs, launcher="slurm", slurm=slurm, progress=False)
    assert [r["status"] for r in results] == ["completed", "completed"]
    assert [r["run_dir"] for r in results] == [c.out for c in configs]
    assert (tmp_path / "runs" / ".submitit").is_dir()
    again = run_sweep(configs, launcher="slurm", slurm=slurm, progress=False)
    assert again == results                                               # nothing resubmitted


def _preempted_slurm_job(cfg, ready) -> tuple[dict, dict, list]:
    """A SlurmRun job sent SLURM's pre-emption signal (SIGUSR2) once `ready()` holds, then the job submitit
    requeues: (first summary, second summary, the signals the requeue handler got in all). A recording handler stands
    in for submitit's."""
    requeued = []
    old = signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(signum))

    def preempt():
        while not ready():
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGUSR2)

    watcher = threading.Thread(target=preempt, daemon=True)
    try:
        watcher.start()
        first = SlurmRun(threads=1)(cfg.to_dict())
        watcher.join()
        return first, SlurmRun(threads=1)(cfg.to_dict()), requeued
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_slurm_job_checkpoints_before_submitit_requeues_it(tmp_path):
    # SLURM's pre-emption/time-out signal reaches submitit's requeue handler only after the run has
    # checkpointed; the requeued job resumes.
    (cfg,) = expand(load_sweep(write_sweep(tmp_path, base={**FAST, "train.epochs": 10, "train.max_steps": 230,
                                                                     "probe.which": "[]"})))
    metrics = Path(cfg.out) / "metrics.jsonl"
    first, second, signals = _preempted_slurm_job(cfg, lambda: metrics.exists() and '"loss"' in metrics.read_text())
    assert first["status"] == "interrupted" and 0 < first["steps"] < 230 and signals == [signal.SIGUSR2]
    assert second["status"] == "completed" and second["steps"] == 230


def test_slurm_job_signalled_while_it_sets_up_checkpoints_and_is_requeued(tmp_path):
    # The signal as the run's folder appears, before its data, models and first step: it was dropped (submitit's
    # SIGTERM handler only logs) and the job trained on to its time limit without a requeue.
    (cfg,) = expand(load_sweep(write_sweep(tmp_path, base={**FAST, "train.max_steps": 40, "probe.which": "[]"})))
    first, second, signals = _preempted_slurm_job(cfg, (Path(cfg.out) / "config.yaml").exists)
    assert (first["status"], first["steps"], signals) == ("interrupted", 0, [signal.SIGUSR2])
    assert second["status"] == "completed" and second["steps"] == 40


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-12", 2160),
                                           ("1-12:00", 2160), ("1-12:00:30", 2161), (45, 45),
                                           (0.5, 1), (90.2, 91)])  # fractions were cut: 0.5 gave 0, no limit
def test_slurm_times_follow_slurms_grammar(text, minutes):
    from randteach.runs.sweep import _minutes
    assert _minutes(text) == minutes


@pytest.mark.parametrize("option, message", [
    ("mem_gb=32G", "mem_gb='32G': expected gigabytes as a number"),     # submitit: an AssertionError traceback
    ("gpus_per_node=one", "gpus_per_node='one': expected a whole number"),
    ("cpus_per_task=-3", "cpus_per_task=-3: expected a whole number"),
    ("cpus_per_task=4.0", "cpus_per_task=4.0: expected a whole number"),  # a TypeError in torch.set_num_threads
    ("gpus_per_node=inf", "gpus_per_node=inf: expected a whole number"),  # an OverflowError in the check
    ("mem_gb=inf", "mem_gb=inf: expected gigabytes as a number"),         # submitted
    ("mem_gb=nan", "mem_gb=nan: expected gigabytes as a number"),
    ("additional_parameters=foo", "expected a mapping of sbatch options"),  # a ValueError traceback
    ("cluster=slrum", "expected slurm, local")])
def test_a_slurm_value_submitit_would_refuse_is_refused_by_a_dry_run(tmp_path, capsys, option, message):
    path = write_sweep(tmp_path)
    assert main(["sweep", str(path), "--launcher", "slurm", "--dry-run", "--slurm", option]) == 2
    assert message in capsys.readouterr().err
    assert main(["sweep", str(path), "--launcher", "slurm", "--dry-run", "--slurm", "mem_gb=32.5"]) == 0
    out = capsys.readouterr().out  # the dry run says what would be submitted
    assert "would submit 1 job as one job array to slurm (" in out and "mem_gb=32.5" in out, out
    assert main(["sweep", str(path), "--dry-run", "--slurm", "mem_gb=32"]) == 2  # the local launcher: ignored
    assert "(mem_gb=32) do nothing with --launcher local" in capsys.readouterr().err


def test_slurm_without_slurm_is_refused_unless_the_local_cluster_is_asked_for(tmp_path, capsys, monkeypatch):
    # submitit falls back to running the jobs on this machine when srun is not on PATH, without a word
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # a PATH without srun
    path = write_sweep(tmp_path)
    assert main(["sweep", str(path), "--launcher", "slurm"]) == 2
    assert "there is no SLURM here (no srun on PATH)" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    # its dry run says so too, and not where the local cluster is asked for
    assert main(["sweep", str(path), "--launcher", "slurm", "--dry-run"]) == 0
    assert "\nnote: not from this machine: --launcher slurm: there is no SLURM here" in capsys.readouterr().out
    assert main(["sweep", str(path), "--launcher", "slurm", "--dry-run", "--slurm", "cluster=local"]) == 0
    assert "note: not from this machine" not in capsys.readouterr().out


def test_a_slurm_time_in_a_sweep_file_is_read_as_slurm_writes_it(tmp_path):
    # YAML 1.1 reads an unquoted 2:00:00 as the base-60 number 7200, which became 7200 minutes (5 days)
    from randteach.runs.sweep import submitit_parameters
    path = write_sweep(tmp_path)
    for written, minutes in (("2:00:00", 120), ("1:30", 2), ("90", 90), ("'2:00:00'", 120)):
        path.write_text(path.read_text() + f"slurm:\n  time: {written}\n")
        assert submitit_parameters(load_sweep(path).slurm, "s")["timeout_min"] == minutes, written
        path.write_text(path.read_text().split("slurm:")[0])


@pytest.mark.parametrize("text", ["1-2:3:4:5", "an hour", "1:2:3:4", 0, 0.0, -5, float("nan"), "0:00", "0-0"])
def test_a_slurm_time_slurm_would_refuse_is_an_error(text):
    from randteach.runs.sweep import _minutes
    with pytest.raises(ConfigError, match="D-H:M:S"):
        _minutes(text)


def test_a_grid_key_or_seed_on_the_command_line_is_refused(tmp_path, capsys):
    path = write_sweep(tmp_path, grid={"optim.lr": [1e-3, 3e-4]}, seeds=[0, 1])
    for flag, value in (("--optim.lr", "0.1"), ("--train.seed", "5"), ("--name", "other")):
        assert main(["sweep", str(path), "--dry-run", flag, value]) == 2
        err = capsys.readouterr().err
        assert f"{flag}: {path} varies or names it (grid, seeds, name)" in err and "change the file" in err, err
    grid = write_sweep(tmp_path, name="wd", grid={"optim.weight_decay": [0.0, 0.1]})
    assert main(["sweep", str(grid), "--dry-run", "--optim.weight-decay", "0.5"]) == 2  # the hyphen spelling too
    hyphens = write_sweep(tmp_path, name="hy", grid={"optim.weight-decay": [0.0, 0.1]})
    assert main(["sweep", str(hyphens), "--dry-run", "--optim.weight_decay", "0.5"]) == 2  # in the file too
    capsys.readouterr()
    assert main(["sweep", str(path), "--dry-run", "--preset", "paper"]) == 2
    assert "--preset paper (on the command line): unknown key 'preset'" in capsys.readouterr().err
    seeded = write_sweep(tmp_path, name="seeded", base={**FAST, "train.seed": 7}, seeds=[0, 1])
    assert main(["sweep", str(seeded), "--dry-run"]) == 2
    assert "train.seed is both in base and in seeds" in capsys.readouterr().err
    assert main(["sweep", str(path), "--dry-run", "--optim.weight_decay", "0.1"]) == 0


def test_a_sweep_over_an_image_folder_is_new_when_the_folder_changes(tmp_path):
    import numpy as np
    from PIL import Image
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / c / "0.png")
    spec = load_sweep(write_sweep(tmp_path, base={"data.name": "folder", "data.path": str(tmp_path / "imgs")}))
    before = expand(spec)[0]
    assert Path(before.out).name == before.run_dir().name == Path(build_config(
        "cpu", overrides={"name": "s", "data.name": "folder", "data.path": str(tmp_path / "imgs")}).run_dir()).name
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "imgs" / "a" / "1.png")
    assert expand(spec)[0].out != before.out


def test_a_progress_line_says_when_the_probe_shown_is_not_the_runs_result(capsys):
    from randteach.runs.sweep import _Progress
    log = _Progress(2, True)
    probe = {"student": {"linear": 0.744}}
    log.finished({"status": "completed", "run_dir": "r0", "probe": probe, "probe_epoch": 3.0}, 1.0)
    log.finished({"status": "interrupted", "run_dir": "r1", "probe": probe, "probe_epoch": 0.0}, 1.0)
    done, stopped = capsys.readouterr().err.splitlines()
    assert "student linear 74.4%" in done and "epoch" not in done
    assert "student linear 74.4% (its last probe, of epoch 0)" in stopped


def _forkserver_of(pid: int) -> int | None:
    """The PID of the multiprocessing forkserver started by process `pid`, if it runs."""
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if b"forkserver" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
        except OSError:
            continue
    return None


def test_a_sweep_whose_forkserver_is_killed_waits_for_its_runs_and_starts_the_next(tmp_path):
    # The forkserver killed (SIGKILL) while two workers train: the sweep was told at once that both "exited
    # with code 255 without writing a summary" (reported failed while they trained on), and the next start
    # could end the sweep in an EOFError traceback. Now it waits for each run's lock, reports what the run
    # wrote, and starts the third run from a new forkserver.
    path = write_sweep(tmp_path, grid={"init.alpha": [1e-10, 0.5, 1.0]}, seeds=[0],
                       base={**FAST, "train.max_steps": 400, "model.encoder": "mlp"})
    root = tmp_path / "runs"
    proc = _start_sweep(path, "--workers", "2")
    deadline = time.time() + 120
    while not any(any(r.get("event") == "step" for r in RunDir(p.parent).records())
                  for p in root.glob("*/metrics.jsonl")):
        assert proc.poll() is None and time.time() < deadline, path.with_suffix(".log").read_text()
        time.sleep(0.05)
    server = _forkserver_of(proc.pid)
    assert server is not None
    os.kill(server, signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, path.with_suffix(".log").read_text()
    log = path.with_suffix(".log").read_text()
    assert "Traceback" not in log and "failed" not in log and log.count(" completed ") == 3, log
    assert [s["status"] for s in summaries(root).values()] == ["completed"] * 3


def test_a_stopped_sweep_does_not_wait_for_a_run_that_another_process_holds(tmp_path):
    # Another process holds the run's lock, so the sweep's worker waits for it; SIGTERM to the sweep then
    # ends the sweep at once (it waited on that other process's lock for as long as it lasted), the run
    # "pending" and untouched.
    path = write_sweep(tmp_path, seeds=[0])
    run = expand(load_sweep(path))[0].run_dir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from randteach.runs.rundir import run_lock\n"
                               "with run_lock(sys.argv[1], create=True):\n print('held', flush=True); time.sleep(120)",
                               str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        proc = _start_sweep(path)
        deadline = time.time() + 60
        while "waiting:" not in path.with_suffix(".log").read_text():
            assert proc.poll() is None and time.time() < deadline, path.with_suffix(".log").read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 3, path.with_suffix(".log").read_text()
        assert holder.poll() is None and "pending" in path.with_suffix(".log").read_text()
    finally:
        holder.kill()
        holder.wait()
