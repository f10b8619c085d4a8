"""Runs that survive: real processes, real signals, bitwise-equal resumes, torchrun with real processes."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from randteach.runs.checkpoint import load_checkpoint
from randteach.runs.rundir import RunDir

from tiny import TINY

CLI = [sys.executable, "-m", "randteach.cli", "--quiet", "distill"]
# 24 epochs = 552 steps, about 2 s of loop on an idle machine: long enough that a signal sent as soon as the
# first step is logged always lands mid-run (8 epochs finished within the old 0.5 s wait on an idle machine).
EPOCHS = 24
LONG = {**TINY, "model.encoder": "mlp", "train.epochs": str(EPOCHS), "train.checkpoint_every": "0.5", "train.probe_every": "0",
        "probe.which": "[]", "head.out_dim": "256"}


def _args(options: dict, out: Path) -> list[str]:
    return [a for k, v in {**options, "out": str(out)}.items() for a in (f"--{k}", v)]


def _student(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "student.pt")["model"]


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(CLI + _args(LONG, out), check=True, capture_output=True)
    return out


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen(CLI + _args(LONG, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until metrics.jsonl has logged `step`: a known point of the run, not a guess of its speed."""
    t0 = time.time()
    while not any(r.get("step", 0) >= step for r in RunDir(out).records()):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() - t0 < timeout, f"step {step} was never logged"
        time.sleep(0.01)


def test_sigkill_then_resume_is_bitwise_equal(tmp_path, reference):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for(out / "checkpoints" / "last.pt", proc)   # a resumable checkpoint exists (step 12)
    _wait_for_step(out, 20, proc)                      # and the run has gone on past it: steps to redo
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert RunDir(out).summary() is None                         # killed: no summary written
    r = subprocess.run(CLI[:3] + ["distill", "--resume", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = RunDir(out).summary()
    assert summary["status"] == "completed"
    _assert_bitwise_equal(_student(out), _student(reference))
    steps = [rec["step"] for rec in RunDir(out).records() if "loss" in rec]
    assert steps == list(range(1, summary["steps"] + 1))        # each step logged exactly once


def test_sigterm_interrupts_cleanly_and_resumes(tmp_path, reference):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_step(out, 1, proc)                       # training has begun: the handler is installed
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 3
    assert f"continue it with: randteach distill --resume {out}" in proc.stdout.read().decode()
    summary = RunDir(out).summary()
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    assert 0 < summary["steps"] < EPOCHS * 23
    moved = tmp_path / "data-on-another-node"  # a requeued job whose data lies elsewhere now
    r = subprocess.run(CLI[:3] + ["distill", "--resume", str(out), "--data.root", str(moved)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming {out} from its checkpoint of step " in r.stdout  # not silently: the bar starts past 0
    assert RunDir(out).summary()["status"] == "completed" and f"root: {moved}" in (out / "config.yaml").read_text()
    _assert_bitwise_equal(_student(out), _student(reference))


def test_a_run_recorded_before_the_root_left_the_digest_resumes_only_under_its_own_root(tmp_path, capsys):
    """Up to 2026-12-02 a run's digest hashed data.root: its checkpoint and summary hold that digest."""
    from randteach.cli import main
    from randteach.config import config_from_dict
    from randteach.runs.checkpoint import save_checkpoint
    from randteach.runs.rundir import write_json
    out, root = tmp_path / "run", str(tmp_path / "root")
    short = {**TINY, "train.max_steps": "2", "probe.which": "[]", "data.root": root}
    assert main(["--quiet", "distill", *_args(short, out)]) == 0
    cfg = config_from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    legacy = cfg.digest(before_2026_12=True)
    save_checkpoint({**load_checkpoint(out / "checkpoints" / "last.pt"), "config_digest": legacy},
                    out / "checkpoints" / "last.pt")
    write_json(out / "summary.json", {**RunDir(out).summary(), "config_digest": legacy})
    assert main(["--quiet", "distill", "--resume", str(out), "--data.root", str(tmp_path / "moved")]) == 2
    assert f"continues only with its own root, {root}" in capsys.readouterr().err
    assert main(["--quiet", "distill", "--resume", str(out), "--data.root", root]) == 0
    assert "completed: " + str(out) + " (finished before: reused, nothing trained)" in capsys.readouterr().out


def test_resume_rejects_overrides_and_foreign_dirs(tmp_path):
    r = subprocess.run(CLI[:3] + ["distill", "--resume", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "config.yaml" in r.stderr and "Traceback" not in r.stderr


def test_resume_given_the_runs_config_file_names_the_folder_to_give(tmp_path, capsys):
    from randteach.cli import main
    (tmp_path / "config.yaml").write_text("name: run\n")
    assert main(["distill", "--resume", str(tmp_path / "config.yaml")]) == 2
    assert f"expected the run directory, got a file; try --resume {tmp_path}" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_torchrun_two_gloo_processes_match_one(tmp_path):
    # with DINO centering: its center is updated once per step from the whole global batch (all-reduced)
    opts = {**TINY, "train.max_steps": "4", "train.probe_every": "0", "probe.which": "[]",
            "train.batch_size": "128", "optim.name": "sgd", "optim.lr": "0.5", "loss.center": "true"}
    one = tmp_path / "one"
    subprocess.run(CLI + _args(opts, one), check=True, capture_output=True)
    two = tmp_path / "two"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # torchelastic's folders: here
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "randteach", "--quiet",
                        "distill", *_args(opts, two)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _student(one), _student(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # rank-local centers moved the student 1e-5 relative; summation order alone moves it about 1e-8
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    assert float(diff) <= 1e-6 * float(torch.cat([a[k].flatten() for k in a]).norm())
    assert not all(torch.equal(a[k], load_checkpoint(one / "checkpoints" / "student_init.pt")["model"][k]) for k in a)
    assert len([x for x in RunDir(two).records() if "loss" in x]) == 4   # rank 0 alone wrote the log


def test_every_torchrun_rank_gets_the_runs_summary_from_the_python_api(tmp_path):
    script = tmp_path / "job.py"
    options = {**TINY, "train.max_steps": 2, "probe.which": ["student"], "probe.linear": "none"}
    script.write_text("import json, os\nimport randteach\n"
                      f"r = randteach.distill(preset='cpu', out={str(tmp_path / 'run')!r}, progress=False, "
                      f"**{options!r})\n"
                      # a file per rank: the ranks share torchrun's stdout, where their lines can interleave
                      f"open({str(tmp_path)!r} + '/rank' + os.environ['RANK'] + '.json', 'w')"
                      ".write(json.dumps(r.summary))\n"
                      # a script that takes the process group down itself, as torch recommends: randteach's
                      # own teardown at exit must then leave it be
                      "import torch.distributed as dist\ndist.destroy_process_group()\n")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Exception ignored" not in r.stderr, r.stderr[-3000:]
    import json
    results = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in ("0", "1")}
    assert results["1"]["probe"] == results["0"]["probe"] and results["1"]["rank"] == 1


@pytest.mark.parametrize("stacked", [False, True], ids=["solo", "stacked"])
@pytest.mark.parametrize("at", ["middle", "final"])
def test_a_signal_during_a_probe_stops_it_at_once_and_the_resume_makes_it(tmp_path, monkeypatch, at, stacked):
    # A real SIGINT, sent to this process from inside a student probe (epoch 1 of 2, or the final one): the
    # probe stops there, nothing of it is logged, the run ends "interrupted" at that step with its checkpoint
    # (before, the probe ran on, was logged, and a final one ended "completed"). The re-run makes that probe
    # first and ends with one probe per planned step. Stacked: two runs in one vmapped model, the first run's
    # probe is the one stopped, and the second's is not begun.
    from randteach.probes.embedding import Prober
    from randteach.train.loop import distill
    from randteach.train.stacked import train_stacked
    from tiny import tiny_config
    fast = {"probe__linear": "none", "probe__which": "[student]", "probe__n_train": 200, "probe__n_test": 100,
            "init__alpha": 0.5}  # (a start in float64 would keep a run out of a stack)
    cfgs = [tiny_config(tmp_path / str(seed), train__seed=seed, **fast) for seed in ((0, 1) if stacked else (0,))]
    plan_steps = [0, 23, 46]  # digits: 1,437 training images, batch 64, 2 epochs
    runs = len(cfgs)
    fire_at = runs * (1 if at == "middle" else 2) + 1  # the first run's probe at that step (a call counts 1)
    calls, finished, real = [], [], Prober.probe

    def probe(self, encoder):
        calls.append(1)
        if len(calls) == fire_at:
            os.kill(os.getpid(), signal.SIGINT)
        result = real(self, encoder)
        finished.append(1)
        return result

    def train() -> list[dict]:
        if stacked:
            return train_stacked(cfgs, mode="vmap")
        return [distill(cfgs[0], progress=False).summary]

    monkeypatch.setattr(Prober, "probe", probe)
    stopped_at = plan_steps[1 if at == "middle" else 2]
    for summary in train():
        assert (summary["status"], summary["steps"], summary["signal"]) == ("interrupted", stopped_at, "SIGINT")
    assert len(finished) == fire_at - 1
    for cfg in cfgs:
        run = RunDir(cfg.run_dir())
        assert [r["step"] for r in run.probes()] == [s for s in plan_steps if s < stopped_at]
        assert load_checkpoint(run.checkpoints / "last.pt")["step"] == stopped_at
    monkeypatch.setattr(Prober, "probe", real)
    for summary, cfg in zip(train(), cfgs):
        assert (summary["status"], summary["steps"]) == ("completed", 46)
        assert [r["step"] for r in RunDir(cfg.run_dir()).probes()] == plan_steps
