"""Nothing lost, nothing run that the user did not ask for: real processes, files and locks.

Run folders and sweep files cannot import code on their own; every bad value is one message and exit 2
before anything is written; one process writes into a run at a time; resumes are exact at the edges."""
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
import yaml

from randteach.cli import main
from randteach.reports.groups import collect
from randteach.runs.rundir import RunDir
from randteach.train.loop import distill

from tiny import TINY, tiny_config

CLI = [sys.executable, "-m", "randteach.cli", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _args(options: dict) -> list[str]:
    return [a for k, v in options.items() for a in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A completed tiny run (one epoch, probed), made once for the tests that only read it."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = tiny_config(tmp, train__epochs=1, train__probe_every=0, probe__which="[student]")
    return distill(cfg, progress=False).path


# ------------------------------------------------------------------------------ 1. no code from files

def _planted_run(tmp_path: Path, finished: Path, encoder: str) -> Path:
    """A copy of a finished run whose config.yaml names `encoder`, next to a module that would leave a mark."""
    run = tmp_path / "shared_run"
    subprocess.run(["cp", "-r", str(finished), str(run)], check=True)
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w').close()\ndef make(): pass\n")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["encoder"] = encoder
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    return run


@pytest.mark.parametrize("encoder", ["evil:make", "os:abort"])
def test_a_run_folder_cannot_import_code(tmp_path, finished_run, encoder):
    run = _planted_run(tmp_path, finished_run, encoder)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "base": {"model.encoder": encoder, "data.name": "digits"},
                                     "grid": {"train.seed": [0]}}))
    # the current folder holds evil.py and the run: `python -m` would put it first on sys.path
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    commands = [["probe", str(run)], ["distill", "--resume", str(run)], ["signal", str(run), "--no-probe"],
                ["sweep", str(sweep)]]
    for cmd in commands if encoder == "evil:make" else commands[:1]:  # each command once: seconds each
        r = subprocess.run(CLI + cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert r.returncode == 2, (cmd, r.stderr[-1500:])
        assert "--allow-import" in r.stderr and "Traceback" not in r.stderr, (cmd, r.stderr)
        assert not (tmp_path / "PWNED").exists(), cmd


def test_an_import_is_run_when_confirmed_on_the_command_line(tmp_path, finished_run):
    run = _planted_run(tmp_path, finished_run, "evil:make")
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    r = subprocess.run(CLI + ["probe", str(run), "--allow-import", "evil"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert (tmp_path / "PWNED").exists()  # imported: the user asked for it (make() then returns no module)
    assert r.returncode == 2 and "expected a torch.nn.Module" in r.stderr, r.stderr


@pytest.mark.parametrize("where", ["after the command", "at the end"])
def test_allow_import_is_read_wherever_it_stands_even_beside_a_commands_positional_arguments(tmp_path, finished_run,
                                                                                            where):
    """landscape takes run directories as positional arguments: they must not swallow the module name."""
    run = _planted_run(tmp_path, finished_run, "evil:make")
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    rest = ["--anchors", f"{run}:teacher", f"{run}:student_init", f"{run}:student", "--grid", "2", "--no-probe"]
    cmd = ["landscape", "--allow-import", "evil", *rest] if where == "after the command" else \
        ["landscape", *rest, "--allow-import", "evil"]
    r = subprocess.run(CLI + cmd, capture_output=True, text=True, env=env, timeout=120)
    assert (tmp_path / "PWNED").exists(), r.stderr  # imported: the flag was read
    assert r.returncode == 2 and "expected a torch.nn.Module" in r.stderr, r.stderr


def test_an_abbreviated_allow_import_is_refused_not_ignored(capsys):
    with pytest.raises(SystemExit) as before_the_command:  # argparse: 'evil' is no command
        main(["--allow-imp", "evil", "config", "--preset", "cpu"])
    assert before_the_command.value.code == 2
    assert main(["config", "--preset", "cpu", "--allow-imp", "evil"]) == 2
    assert "unknown key 'allow-imp'" in capsys.readouterr().err


def test_python_m_does_not_import_from_the_current_folder(tmp_path):
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w').close()\ndef make(): pass\n")
    opts = {**TINY, "model.encoder": "evil:make", "train.max_steps": "1", "out": str(tmp_path / "run")}
    r = subprocess.run(CLI + ["distill", "--preset", "cpu"] + _args(opts), capture_output=True, text=True,
                       cwd=tmp_path, env=ENV, timeout=120)
    assert r.returncode == 2 and "cannot import 'evil:make'" in r.stderr, r.stderr
    assert not (tmp_path / "PWNED").exists()


# ----------------------------------------------------------------------------- 2. values at the edge

BAD = [
    ("optim.lr", "-1"), ("optim.lr", "nan"), ("train.epochs", "nan"), ("train.epochs", "inf"),
    ("head.out_dim", "-3"), ("model.width", "0"), ("optim.betas", "[2,3]"), ("optim.weight_decay", "-1"),
    ("train.checkpoint_every", "nan"), ("probe.l2", "nan"), ("head.out_dim", "0"), ("head.bottleneck_dim", "0"),
    ("train.max_steps", "0"), ("data.n_samples", "0"), ("train.epochs", "0"), ("train.epochs", "-1"),
    ("optim.grad_clip", "-1"), ("model.encoder", "not.a.module:"), ("model.encoder", "pkg..mod:fn"),
    ("head.hidden_dims", "[64,0]"), ("optim.betas", "[0.9]"), ("train.max_steps", "inf"), ("train.seed", "1e20"),
    ("train.seed", "-1"), ("data.test_fraction", "1"), ("probe.knn_temperature", "0"), ("train.device", "gpu"),
]


@pytest.mark.parametrize("key,value", BAD)
def test_every_bad_value_is_one_message_and_nothing_written(tmp_path, capsys, key, value):
    out = tmp_path / "run"
    rc = main(["--quiet", "distill", "--preset", "cpu", "--out", str(out), f"--{key}", value])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and key in err and "Traceback" not in err, err
    assert not out.exists()


BAD_ANALYSIS = [
    (["finetune", "RUN", "--batch-size", "0"], "--batch-size: 0 is out of range"),
    (["finetune", "RUN", "--momentum", "2"], "--momentum: 2.0 is out of range; valid: a finite number in [0, 1)"),
    (["finetune", "RUN", "--epochs", "0"], "--epochs: 0.0 is out of range"),
    (["imp", "RUN", "--fraction", "1.5"], "--fraction: 1.5 is out of range; valid: a finite number in (0, 1)"),
    (["imp", "RUN", "--rounds", "-1"], "--rounds: -1 is out of range; valid: a finite number in [0, inf)"),
    (["lmc", "RUN", "--runs", "1"], "--runs: 1 is out of range; valid: a finite number in [2, inf)"),
    (["lmc", "RUN", "--bn-batches", "-1"], "--bn-batches: -1 is out of range"),
    (["imp", "RUN", "--n-train", "0"], "--n-train: 0 is out of range"),
    (["landscape", "--view", "non-local", "RUN", "--n-loss", "0"], "--n-loss: 0 is out of range"),
    (["landscape", "--view", "non-local", "RUN", "--extent", "1", "0"], "extent 1 0 1 0: each axis needs lo < hi"),
    (["signal", "RUN", "--n-samples", "0"], "--n-samples: 0 is out of range"),
    (["finetune", "RUN", "--device", "gpu"], "--device gpu: not a device; valid: auto, cpu, cuda, cuda:N"),
]


@pytest.mark.parametrize("argv,words", BAD_ANALYSIS)
def test_every_bad_analysis_option_is_one_message_and_nothing_written(finished_run, capsys, argv, words):
    before = sorted(p.relative_to(finished_run) for p in finished_run.rglob("*"))
    assert main(["--quiet", *[str(finished_run) if a == "RUN" else a for a in argv]]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err
    assert sorted(p.relative_to(finished_run) for p in finished_run.rglob("*")) == before


def test_an_out_that_is_a_file_is_one_message(finished_run, tmp_path, capsys):
    assert main(["--quiet", "report", str(finished_run), "--out", str(finished_run / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert "cannot use" in err and "config.yaml as a folder" in err and "choose another --out" in err, err


def test_quiet_after_the_command_is_the_switch(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--preset", "cpu", "--out", str(out), *_args({**TINY, "train.max_steps": "1",
                                                                          "probe.which": "[]"}), "--quiet"]) == 0
    assert RunDir(out).summary()["status"] == "completed" and "distill" not in capsys.readouterr().err


def test_bad_value_in_a_real_process_and_the_corrected_command_runs(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(CLI + ["distill", "--preset", "cpu", "--out", str(out), "--optim.lr", "-1"],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 2 and "optim.lr: -1.0 is out of range; valid: a finite number in (0, inf)" in r.stderr
    assert not out.exists()


def test_a_failed_start_leaves_no_folder_and_does_not_block_its_fix(tmp_path):
    # data.n_samples beyond the data set fails after the run folder was opened: the new folder goes again
    with pytest.raises(Exception, match="data.n_samples"):
        distill(tiny_config(tmp_path, data__n_samples=10 ** 6), progress=False)
    assert not (tmp_path / "run").exists()
    # a folder that was there before is the user's: it stays, with what they put in it, even when that is
    # only a config.yaml (`randteach distill --config run/config.yaml --out run`)
    (tmp_path / "run").mkdir()
    cfg = tiny_config(tmp_path, data__n_samples=10 ** 6)
    (tmp_path / "run" / "config.yaml").write_text(cfg.to_yaml())
    with pytest.raises(Exception, match="data.n_samples"):
        distill(cfg, progress=False)
    assert (tmp_path / "run" / "config.yaml").read_text() == cfg.to_yaml()
    result = distill(tiny_config(tmp_path, train__max_steps=2, probe__which="[]"), progress=False)
    assert result.summary["status"] == "completed"


def test_a_sweep_run_that_failed_before_its_first_checkpoint_does_not_block_its_fix(tmp_path):
    # its first probe fails (k-NN k above the probe set): the "failed" summary bound the folder to that config,
    # so the fix the advice names (the same config, another --probe.* value, the same folder) was refused
    from randteach.errors import CheckpointError
    from randteach.runs.checkpoint import load_state_dict
    from randteach.runs.sweep import run_one
    common = dict(data__n_samples=256, train__max_steps=2, probe__which="[student]", train__device="cpu")
    failed = run_one(tiny_config(tmp_path, probe__knn_k=5000, **common))
    assert failed["status"] == "failed" and "k-NN" in failed["error"]
    with pytest.raises(CheckpointError, match="it stopped on: .*k-NN.*--probe.\\* setting"):
        load_state_dict(tmp_path / "run")
    fixed = distill(tiny_config(tmp_path, probe__knn_k=3, **common), progress=False)
    assert fixed.summary["status"] == "completed" and "knn" in fixed.summary["probe"]["student"]


def test_probing_a_run_that_never_started_says_how_to_start_it(tmp_path, finished_run, capsys):
    import shlex
    run = tmp_path / "not started"  # a space: the command is quoted for a shell
    run.mkdir()
    (run / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    assert main(["--quiet", "probe", str(run)]) == 2
    err = capsys.readouterr().err
    command = f"randteach distill --config {shlex.quote(str(run / 'config.yaml'))} --out {shlex.quote(str(run))}"
    assert command in err and "'" in command and "--resume" not in err, err


def test_a_run_that_fails_after_its_first_checkpoints_keeps_its_folder(tmp_path, monkeypatch):
    """Only a folder holding nothing but what opening the run wrote is removed: checkpoints are kept."""
    import randteach.train.loop as loop

    def fail(*args):
        raise RuntimeError("a bug in a hook")
    monkeypatch.setattr(loop, "_finish", fail)
    with pytest.raises(RuntimeError, match="a bug in a hook"):
        distill(tiny_config(tmp_path, train__max_steps=2, probe__which="[]"), progress=False)
    assert (tmp_path / "run" / "checkpoints" / "teacher.pt").exists()


@pytest.mark.parametrize("case", ["binary-config", "resume-with-preset", "corrupt-summary", "summary-not-an-object",
                                  "other-architecture"])
def test_bad_files_and_combinations(tmp_path, capsys, finished_run, case):
    run = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(finished_run), str(run)], check=True)
    if case == "binary-config":
        (tmp_path / "c.yaml").write_bytes(bytes(range(256)))
        argv, words = ["distill", "--config", str(tmp_path / "c.yaml")], "not a text file"
    elif case == "resume-with-preset":
        argv, words = ["distill", "--resume", str(run), "--preset", "cpu"], "--preset"
    elif case == "corrupt-summary":
        (run / "summary.json").write_text('{"status": "compl')
        argv, words = ["distill", "--resume", str(run)], "summary.json is corrupt"
    elif case == "summary-not-an-object":
        (run / "summary.json").write_text("[1, 2]")
        argv, words = ["distill", "--resume", str(run)], "summary.json is corrupt (a JSON list where an object"
    else:
        other = tiny_config(tmp_path / "o", model__width=4, train__max_steps=1, probe__which="[]")
        distill(other, progress=False)
        argv = ["probe", str(run), "--checkpoint", str(tmp_path / "o" / "run" / "checkpoints" / "student.pt")]
        words = "another architecture"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == \
        {p: b for p, b in before.items() if p.name != ".lock"}


def test_damaged_logs_and_configs_are_skipped_by_readers_and_reports(tmp_path, capsys, finished_run):
    """Bytes that are not UTF-8 and lines that are not objects in metrics.jsonl spoil only themselves; a
    report lists a run with an unreadable config.yaml as "unreadable" instead of stopping."""
    run = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(finished_run), str(run)], check=True)
    good = list(RunDir(run).records())
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"event": "step", "step": 99, "lo')  # a kill cut the last line short: skipped quietly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(RunDir(run).records()) == good
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\n\xff\xfe\n[1]\n\"text\"\n")
    with pytest.warns(UserWarning, match=rf"4 damaged lines skipped \(line {len(good) + 1}, "):
        assert list(RunDir(run).records()) == good  # damage before the last line is named
    shown = subprocess.run([sys.executable, "-m", "randteach.cli", "report", str(run), "--out", str(tmp_path / "r")],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr  # one line like an error's, not Python's file, line and source
    assert "randteach report: warning: " in shown.stderr and "UserWarning" not in shown.stderr, shown.stderr
    probes = RunDir(run).probes()
    with open(run / "metrics.jsonl", "a") as f:  # a hand edit: the report's probe curves failed on it (a traceback)
        f.write('{"event": "probe", "step": 5, "epoch": "x", "student": 3}\n')
    assert RunDir(run).probes() == probes
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(finished_run), str(broken)], check=True)
    (broken / "config.yaml").write_text("model: [unclosed\n")
    assert main(["--quiet", "report", str(run), str(broken), "--out", str(tmp_path / "rep")]) == 0
    rows = {r["run_dir"]: r["status"] for r in collect([run, broken])}
    assert rows == {str(run.resolve()): "completed", str(broken.resolve()): "unreadable"}
    assert "Grouped by nothing" in (tmp_path / "rep" / "report.md").read_text()  # not by every key of the config


def test_only_randteachs_own_warnings_are_shown_as_its_lines():
    # a library's warning raised through randteach's code (stacklevel points there) kept its own format
    import randteach.runs.rundir as inside
    from randteach.cli import _our_warnings_plain
    from randteach.errors import RandteachWarning
    with _our_warnings_plain("probe"):
        ours = warnings.formatwarning("folder changed", RandteachWarning, inside.__file__, 1)
        theirs = warnings.formatwarning("overflow encountered in cast", RuntimeWarning, inside.__file__, 1)
    assert ours == "randteach probe: warning: folder changed\n"
    assert theirs.startswith(inside.__file__) and "RuntimeWarning: overflow encountered in cast" in theirs


# ------------------------------------------------------------------------------- 3. one writer

def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path, capsys):
    out = tmp_path / "run"
    opts = {**TINY, "model.encoder": "mlp", "train.epochs": "400", "probe.which": "[]", "head.out_dim": "256",
            "out": str(out)}
    first = subprocess.Popen(CLI + ["distill", "--preset", "cpu"] + _args(opts), env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while not (out / "metrics.jsonl").exists():
            assert first.poll() is None, first.stderr.read().decode()
            assert time.time() - t0 < 120
            time.sleep(0.05)
        r = subprocess.run(CLI + ["distill", "--preset", "cpu"] + _args(opts), capture_output=True, text=True,
                           env=ENV, timeout=120)
        assert r.returncode == 2 and f"PID {first.pid}" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "use --out elsewhere" in r.stderr  # a new run can go to another folder
        for cmd in (["distill", "--resume", str(out)], ["probe", str(out)], ["signal", str(out)],
                    ["finetune", str(out)], ["imp", str(out)]):  # this process is a second one too
            assert main(["--quiet", *cmd]) == 2
            err = capsys.readouterr().err
            assert f"PID {first.pid}" in err and "--out" not in err, err  # these have no --out to choose
        assert first.poll() is None  # the holder was not disturbed
    finally:
        first.terminate()
        first.wait(timeout=60)
    steps = [r["step"] for r in RunDir(out).records() if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved records


# ------------------------------------------------------------------------------- 4. resume edges

def _strip_times(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("wall_time_s",)}


def _losses(run: Path) -> list:
    return [{k: v for k, v in r.items() if k != "time"} for r in RunDir(run).records()]


class _Killed(BaseException):
    """Stands for SIGKILL at one exact instant: nothing after it runs, files stay as they are."""


def _resume(run: Path) -> None:
    r = subprocess.run(CLI + ["distill", "--resume", str(run)], capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_resume_after_a_kill_at_the_edges_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    loop = sys.modules["randteach.train.state"]  # where the loop writes its checkpoints
    opts = dict(train__epochs=2, train__checkpoint_every=1, train__probe_every=0, probe__which="[student]")
    ref = distill(tiny_config(tmp_path / "ref", **opts), progress=False)
    run = tmp_path / "cut" / "run"
    ckpts = run / "checkpoints"
    real_save = loop.save_checkpoint

    def save_then_die_before_the_step_checkpoint(payload, path):
        if Path(path).name.startswith("student_step"):
            raise _Killed
        return real_save(payload, path)

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die_before_the_step_checkpoint)
    with pytest.raises(_Killed):  # killed between last.pt and student_step<N>.pt
        distill(tiny_config(tmp_path / "cut", **opts), progress=False)
    monkeypatch.undo()
    (step_ckpt,) = [ckpts / f"student_step{int(torch.load(ckpts / 'last.pt')['step'])}.pt"]
    assert not step_ckpt.exists()
    (ckpts / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # a kill mid-write
    _resume(run)
    assert step_ckpt.exists() and not list(ckpts.glob(".*.tmp"))

    # killed after the final last.pt: no student.pt, no summary yet
    for f in (ckpts / "student.pt", run / "summary.json"):
        f.unlink()
    _resume(run)
    summary = RunDir(run).summary()
    assert _strip_times(summary) == _strip_times(ref.summary)
    assert isinstance(summary["final_loss"], float)  # not "nan"
    assert _losses(run) == _losses(ref.path)  # every step once, the final probe once
    for name in ("student.pt", step_ckpt.name):
        a, b = (torch.load(d / "checkpoints" / name, weights_only=True)["model"] for d in (run, ref.path))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_hand_edited_config_is_not_resumed(tmp_path):
    out = tmp_path / "run"
    opts = {**TINY, "model.encoder": "mlp", "train.epochs": "400", "probe.which": "[]", "head.out_dim": "256",
            "out": str(out)}
    first = subprocess.Popen(CLI + ["distill", "--preset", "cpu"] + _args(opts), env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while not (out / "checkpoints" / "last.pt").exists():
        assert first.poll() is None, first.stderr.read().decode()
        assert time.time() - t0 < 120
        time.sleep(0.05)
    first.kill()
    first.wait()
    text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(text.replace("lr: 0.001", "lr: 0.5"))
    r = subprocess.run(CLI + ["distill", "--resume", str(out)], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 2 and "was changed after the run started" in r.stderr and "--out" in r.stderr, r.stderr


# -------------------------------------------------------------------------- 5. probes that refuse

def test_probes_refuse_features_they_cannot_measure():
    from randteach.config import ProbeConfig
    from randteach.probes.embedding import score
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    x = torch.randn(40, 8, generator=g) + 4 * y[:, None].float()  # separable
    cfg = ProbeConfig(knn_k=5, max_iter=50)
    assert score(x, y, x, y, cfg, 2)["knn"] == 1.0
    huge = score(x * 1e20, y, x * 1e20, y, cfg, 2)  # finite at any scale: measured (k-NN rescales, linear standardizes)
    assert huge["knn"] == 1.0 and huge["linear"] > 0.9 and "invalid" not in huge
    broken = score(x.masked_fill(x > 5, float("inf")), y, x, y, cfg, 2)
    assert set(broken) == {"invalid"} and "not finite" in broken["invalid"]


class _HugeFeatures(nn.Module):
    """An encoder whose features are about 1e25: float32 squared distances between them overflow."""

    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3)

    def forward(self, x):
        return self.conv(x).flatten(1) * 1e25


def test_a_run_at_absurd_scale_is_measured_and_unmeasurable_features_are_marked(tmp_path):
    import randteach
    from randteach.data import load_dataset
    from randteach.reports.run import write_run_report
    # The scale comes from the encoder, not from the dynamics of a diverging run (which differ between
    # machines): finite features of any scale are measured (k-NN at 1e25 gave chance, then was refused) ...
    cfg = tiny_config(tmp_path / "huge", train__max_steps=2, train__probe_every=0, probe__which="[student]")
    summary = randteach.distill(cfg, encoder=_HugeFeatures, progress=False).summary
    assert summary["status"] == "completed" and "knn" in summary["probe"]["student"] and "warnings" not in summary
    # ... and non-finite ones (one NaN pixel of the probe's test images here) are marked, never a number
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    images = test.images.float() / 255
    images[0, 0, 0, 0] = float("nan")
    cfg = tiny_config(tmp_path / "nan", train__max_steps=2, train__probe_every=0, probe__which="[student]")
    summary = randteach.distill(cfg, probe_train=(train.images.float() / 255, train.labels),
                                probe_test=(images, test.labels), progress=False).summary
    assert summary["status"] == "completed" and set(summary["probe"]["student"]) == {"invalid"}
    assert "not finite" in summary["probe"]["student"]["invalid"]
    assert summary["warnings"] and "student" in summary["warnings"][0]
    assert "Warning: epoch" in write_run_report(cfg.run_dir()).read_text()


# ---------------------------------------------------------------------------- 6. read-only folder

def test_probe_on_a_read_only_run_prints_its_results_before_failing(tmp_path, finished_run):
    run = tmp_path / "ro"
    subprocess.run(["cp", "-r", str(finished_run), str(run)], check=True)
    mounted = False
    if os.geteuid() == 0:  # root ignores permissions: a read-only bind mount is the real thing
        mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(run), str(run)]).returncode == 0
        if not mounted:
            pytest.skip("running as root without mount: cannot make a read-only folder")
    else:
        run.chmod(0o555)
    try:
        r = subprocess.run(CLI + ["probe", str(run)], capture_output=True, text=True, env=ENV, timeout=300)
    finally:
        subprocess.run(["umount", str(run)]) if mounted else run.chmod(0o755)
    assert r.returncode == 2 and "could not be saved" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "| student |" in r.stdout


def test_teacher_targets_in_a_read_only_folder_are_computed_without_a_lock(tmp_path):
    # a data root others share read-only: nothing can be locked or saved there, and the run still gets its targets
    from randteach.models import build_model
    from randteach.train import teacher_cache
    folder = tmp_path / "teacher-targets"
    folder.mkdir()
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)]).returncode == 0
        if not mounted:
            pytest.skip("running as root without mount: cannot make a read-only folder")
    else:
        folder.chmod(0o555)
    cfg = tiny_config(tmp_path)
    teacher, inputs = build_model(cfg, 1, 8, seed=0), torch.rand(60, 1, 8, 8)
    try:
        targets, origin = teacher_cache.load_or_compute(cfg, teacher, inputs, None, 50, torch.device("cpu"), folder)
    finally:
        subprocess.run(["umount", str(folder)]) if mounted else folder.chmod(0o755)
    assert origin == "computed (cache folder not writable)" and list(folder.iterdir()) == []
    torch.testing.assert_close(targets, teacher_cache.compute_targets(teacher, inputs, None, 50, torch.device("cpu")))


# ------------------------------------------------------------------------------------ 11. smaller

def test_report_command_and_file_modes(tmp_path):
    out = tmp_path / "run"
    opts = {**TINY, "train.max_steps": "2", "probe.which": "[]", "out": str(out)}
    old = os.umask(0o022)
    try:
        subprocess.run(CLI + ["distill", "--preset", "cpu"] + _args(opts), check=True, env=ENV,
                       capture_output=True, timeout=120)
        first = (out / "report.md").read_text()
        assert "Command: `randteach --quiet distill --preset cpu" in first
        subprocess.run(CLI + ["distill", "--resume", str(out)], check=True, env=ENV, capture_output=True,
                       timeout=120)
    finally:
        os.umask(old)
    assert (out / "report.md").read_text().count("Command: `randteach --quiet distill --preset cpu") == 1
    for f in (out / "summary.json", out / "checkpoints" / "last.pt"):
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_a_full_disk_is_one_message_and_keeps_what_was_written(tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)]).returncode:
        pytest.skip("needs root to mount a small file system")
    try:
        opts = {**TINY, "train.epochs": "1", "probe.which": "[]", "out": str(disk / "run")}
        r = subprocess.run(CLI + ["distill", "--preset", "cpu"] + _args(opts), capture_output=True, text=True,
                           env=ENV, timeout=120)
        assert r.returncode == 2 and "cannot write checkpoint" in r.stderr and "disk full" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
        assert (disk / "run" / "config.yaml").exists() and (disk / "run" / "checkpoints" / "teacher.pt").exists()
        assert not list((disk / "run").rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)])


def test_after_sigterm_the_table_says_which_epoch_it_shows(tmp_path):
    out = tmp_path / "run"
    opts = {**TINY, "model.encoder": "mlp", "train.epochs": "400", "train.probe_every": "0",
            "probe.which": "[student]", "head.out_dim": "256", "out": str(out)}
    proc = subprocess.Popen(CLI + ["distill", "--preset", "cpu"] + _args(opts), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not [r for r in RunDir(out).records() if "loss" in r]:  # the step-0 probe is done, training runs
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.05)
    proc.terminate()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3, stderr
    assert "interrupted" in stdout and "the last probe below is from epoch 0" in stdout, stdout
    assert "## Last probes, of epoch 0 (test accuracy; the run did not complete)" in (out / "report.md").read_text()


def test_the_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    from randteach.runs.rundir import LOCK_FILE, run_lock
    with run_lock(tmp_path, create=True):
        with run_lock(tmp_path):  # nested use by the same process passes
            assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        probe = subprocess.run([sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR);"
                                "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(tmp_path / LOCK_FILE)],
                               capture_output=True, text=True)
        assert probe.returncode != 0 and "BlockingIOError" in probe.stderr  # still held after the inner exit
    with run_lock(tmp_path):
        pass  # released: taken again


def test_sigterm_ends_an_analysis_as_ctrl_c_does(tmp_path, finished_run):
    # The analyses catch no signal themselves: SIGTERM ended them without a word (the default action) where
    # Ctrl-C says "interrupted" after their cleanup; now both do, with the shells' exit codes.
    out = tmp_path / "land"
    proc = subprocess.Popen([sys.executable, "-m", "randteach.cli", "--quiet", "landscape", "--view", "non-local",
                             str(finished_run), "--grid", "40", "--no-probe", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "points.jsonl").exists() or not (out / "points.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "interrupted (SIGTERM)" in err and "Traceback" not in err, err
    assert "run the same command again to go on" in err  # a landscape resumes at its next point


def test_a_wait_for_a_gone_workers_lock_ends_when_another_process_takes_it(tmp_path):
    # A process that takes a run's lock writes its PID just after: for that moment the file still names the
    # worker that held it before, and a blocking wait would then last the new holder's whole run.
    from randteach.runs.rundir import LOCK_FILE, wait_until_free
    (tmp_path / LOCK_FILE).write_text("424242\n")  # the worker that is gone
    other = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                              "fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                              "print('held', flush=True); time.sleep(0.5)\n"
                              "os.ftruncate(fd, 0); os.pwrite(fd, f'{os.getpid()}\\n'.encode(), 0); time.sleep(60)",
                              str(tmp_path / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "held\n"
        start = time.monotonic()
        wait_until_free(tmp_path, holder=424242)
        assert time.monotonic() - start < 10 and other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_json_result_that_fails_halfway_leaves_no_temporary(tmp_path):
    from randteach.runs.rundir import write_json
    write_json(tmp_path / "imp.json", {"rounds": 1})
    with pytest.raises(TypeError):
        write_json(tmp_path / "imp.json", {"rounds": 2, "model": object()})  # fails inside the dump
    assert [p.name for p in tmp_path.iterdir()] == ["imp.json"]
    assert json.loads((tmp_path / "imp.json").read_text()) == {"rounds": 1}


def test_a_command_that_starts_over_does_not_promise_to_go_on(monkeypatch, capsys):
    from randteach.cli import analysis, main

    def stopped(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(analysis, "_supervised_setup", stopped)  # finetune keeps nothing of an unfinished run
    assert main(["finetune", "some-run"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
