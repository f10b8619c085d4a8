"""A user's own module with buffers and no convolution: locality init, a frozen eval-mode teacher,
checkpoints, and a run through the CLI import path interrupted by SIGTERM and resumed."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from randteach.config import build_config
from randteach.models import build_model
from randteach.runs.checkpoint import load_checkpoint
from randteach.runs.rundir import RunDir
from randteach.train.loop import distill
from randteach.train.setup import build_teacher_and_student, seeds

from test_folder import write_folder

HERE = Path(__file__).parent
STEPS = 270  # 90 epochs of 3 batches: a few seconds, so that SIGTERM lands mid-run
OPTS = {"data.name": "folder", "model.encoder": "test_custom_module:factory", "head.hidden_dims": "[32]",
        "head.bottleneck_dim": "8", "head.out_dim": "32", "train.batch_size": "16", "train.epochs": "90",
        "train.checkpoint_every": "0", "train.probe_every": "0", "probe.which": "[]", "train.device": "cpu",
        "train.precision": "fp32", "train.log_every": "1"}
# One thread: on a busy 2-core machine, batch norm with 2 OpenMP threads took 130 ms a call instead of 20 us.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


class BufferedMLP(nn.Module):
    """No convolution; batch-norm statistics and a buffer of its own."""

    def __init__(self, in_channels, image_size):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * image_size ** 2, 32)
        self.norm = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 16)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x.flatten(1))))) * self.gain


def factory(in_channels, image_size):
    return BufferedMLP(in_channels, image_size)


def test_locality_init_mixes_parameters_and_copies_buffers():
    cfg = build_config("cpu", None, {**OPTS, "data.path": "unused", "init.alpha": "0.25"})
    teacher, student = build_teacher_and_student(cfg, 1, 8)
    fresh = build_model(cfg, 1, 8, seed=seeds(cfg)["fresh"])
    delta = (0.25 ** 2 + 0.75 ** 2) ** 0.5
    for (name, t), s, f in zip(teacher.named_parameters(), student.parameters(), fresh.parameters()):
        torch.testing.assert_close(s, (0.75 * t + 0.25 * f) / delta, msg=name)
    for (name, t), s in zip(teacher.named_buffers(), student.buffers()):
        assert torch.equal(s, t), name
    assert any(n.endswith("running_var") for n, _ in teacher.named_buffers())


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "randteach.cli", "--quiet", "distill", *args]


def test_sigterm_then_resume_of_an_import_path_encoder(tmp_path, monkeypatch):
    # the tests' folder for the encoder module, after the randteach this test imports (a worktree's src/)
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "RANDTEACH_DATA": str(tmp_path / "root"), **ONE_THREAD}
    opts = {**OPTS, "data.path": str(write_folder(tmp_path / "imgs", counts=(("train", 16), ("val", 4)), side=8))}
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli("--preset", "cpu", *[a for k, v in opts.items() for a in (f"--{k}", v)],
                                 "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    t0 = time.time()
    while not (out / "metrics.jsonl").exists():              # training has begun: the handler is installed
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() - t0 < 120
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 3, proc.stderr.read().decode()
    interrupted = RunDir(out).summary()
    assert interrupted["status"] == "interrupted" and interrupted["steps"] < STEPS

    r = subprocess.run(_cli("--resume", str(out), "--allow-import", "test_custom_module"), capture_output=True,
                       text=True, env=env)  # a run folder imports nothing unless confirmed
    assert r.returncode == 0, r.stderr[-2000:]
    summary = RunDir(out).summary()
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert [x["step"] for x in RunDir(out).records() if "loss" in x] == list(range(1, STEPS + 1))
    assert "read from cache" in r.stderr                      # the folder was decoded by the first process only

    ckpt = out / "checkpoints"
    last, teacher = load_checkpoint(ckpt / "last.pt"), load_checkpoint(ckpt / "teacher.pt")["model"]
    for k, v in teacher.items():                             # frozen in eval mode: even BN statistics unchanged
        assert torch.equal(last["teacher"][k], v), k
    student, init = load_checkpoint(ckpt / "student.pt")["model"], load_checkpoint(ckpt / "student_init.pt")["model"]
    assert not torch.equal(student["encoder.norm.running_mean"], init["encoder.norm.running_mean"])
    assert torch.equal(student["encoder.gain"], teacher["encoder.gain"])

    monkeypatch.syspath_prepend(str(HERE))                    # the same run, uninterrupted, in this process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = distill(build_config("cpu", None, {**opts, "out": str(tmp_path / "ref")}), progress=False)
    finally:
        torch.set_num_threads(threads)
    ref_student = load_checkpoint(reference.path / "checkpoints" / "student.pt")["model"]
    assert student.keys() == ref_student.keys()
    for k in student:
        assert torch.equal(student[k], ref_student[k]), k
