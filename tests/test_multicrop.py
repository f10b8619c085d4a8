"""DINO's multi-crop in the distillation loop (`data.local_crops`): it changes the run and repeats per seed,
the teacher sees only the 2 global views, micro-batches give the one-batch gradients, and what cannot work
is refused with exit status 2."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import randteach
from randteach.config import ConfigError, build_config
from randteach.data.augment import augmenter, local_side
from randteach.models import build_model
from randteach.train.setup import epoch_order, load_training_inputs, seeds

from tiny import TINY, tiny_config

DINO = {"data__augment": "dino", "train__max_steps": 4, "probe__which": "[]", "train__device": "cpu"}
CALLS: list[tuple[bool, str, int]] = []  # (gradient on, device type, input side) of every RecordingConv forward


def records(cfg) -> list[dict]:
    path = Path(randteach.distill(cfg, progress=False).path) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("event") == "step"]


def losses(tmp_path, name, **kw) -> list[float]:
    return [r["loss"] for r in records(tiny_config(tmp_path / name, **{**DINO, **kw}))]


def test_local_crops_change_the_run_and_repeat_with_the_seed(tmp_path):
    dino = losses(tmp_path, "dino")
    multi = losses(tmp_path, "multi", data__local_crops=2)
    assert len(multi) == 4 and all(a != b for a, b in zip(multi, dino))
    assert losses(tmp_path, "multi-again", data__local_crops=2) == multi
    assert losses(tmp_path, "multi-seed", data__local_crops=2, train__seed=1) != multi


def test_first_step_loss_is_dinos_multicrop_loss_computed_directly(tmp_path):
    # DINO's Eq. 3: mean over teacher views i (global) and student views j != i of H(P_t(x_i), P_s(x_j))
    cfg = tiny_config(tmp_path, **{**DINO, "train__max_steps": 1}, data__local_crops=2, model__norm="none",
                      train__precision="fp32", train__float64_until_distance=0, loss__name="ce")  # DINO's H
    logged = records(cfg)[0]["loss"]
    inputs, preprocess, data, size = load_training_inputs(cfg)
    weights = lambda name: torch.load(tmp_path / "run" / "checkpoints" / name, weights_only=True)["model"]  # noqa: E731
    teacher, student = (build_model(cfg, 1, size, seed=0) for _ in range(2))
    teacher.load_state_dict(weights("teacher.pt"))
    student.load_state_dict(weights("student_init.pt"))
    rows = epoch_order(len(inputs), seeds(cfg)["data"], 0)[:cfg.train.batch_size]
    aug = augmenter("dino", preprocess, seeds(cfg)["data"], 1, local_crops=2)
    globals_, views = aug.views(preprocess(inputs[rows]), 0, rows)
    with torch.no_grad():
        targets = [torch.softmax(teacher.eval()(v), -1) for v in globals_]
        outputs = [torch.log_softmax(student(v), -1) for v in views]
    pairs = [-(targets[i] * outputs[j]).sum(-1).mean() for i in range(2) for j in range(4) if j != i]
    assert len(pairs) == 6 and logged == pytest.approx(float(sum(pairs) / 6), rel=1e-5)


class RecordingConv(nn.Module):
    """A small conv encoder with adaptive pooling (any input side) that records every call."""

    def __init__(self, in_channels, image_size):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.embed_dim = 8

    def forward(self, x):
        CALLS.append((torch.is_grad_enabled(), x.device.type, x.shape[-1]))
        return nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1)


def recording_conv(in_channels, image_size):
    return RecordingConv(in_channels, image_size)


def test_teacher_sees_only_the_global_views(tmp_path):
    CALLS.clear()
    records(tiny_config(tmp_path, **DINO, data__local_crops=3, model__encoder="test_multicrop:recording_conv"))
    side = 8  # scikit-learn digits
    runs = [(grad, size) for grad, device, size in CALLS if device != "meta"]  # meta: the shape check
    teacher = [size for grad, size in runs if not grad]
    student = [size for grad, size in runs if grad]
    # per step: the teacher once on both global views; the student once on them, once on the 3 local crops
    assert teacher == [side] * 4
    assert student == [side, local_side(side)] * 4 and local_side(side) == 3


def test_micro_batches_give_the_one_batch_gradients(tmp_path):
    # no batch statistics (norm none): every sample's gradient is its own, so accumulation is exact up to rounding
    one = records(tiny_config(tmp_path / "one", **DINO, data__local_crops=2, model__norm="none"))
    micro = records(tiny_config(tmp_path / "micro", **DINO, data__local_crops=2, model__norm="none",
                                train__micro_batch=24))  # 64 = 24 + 24 + 16
    for a, b in zip(one, micro, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_config_refuses_what_cannot_work():
    base = {"train.teacher_cache": "false", "data.local_crops": "2"}
    with pytest.raises(ConfigError, match="data.augment dino"):
        build_config("cpu", None, {**base, "data.augment": "flip-crop"})
    with pytest.raises(ConfigError, match="teacher_cache false"):
        build_config("cpu", None, {**base, "data.augment": "dino", "train.teacher_cache": "true"})
    with pytest.raises(ConfigError, match="noise"):
        build_config("cpu", None, {**base, "data.augment": "dino", "data.inputs": "noise"})
    with pytest.raises(ConfigError, match="data.local_crops N"):
        build_config("cpu", None, {**base, "data.augment": "dino", "data.local_crops": "0",
                                   "data.local_crop_size": "16"})
    assert build_config("cpu", None, {**base, "data.augment": "dino"}).data.local_crops == 2


def distill_cli(tmp_path, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "randteach.cli", "distill", "--preset", "cpu", "--data.name", "digits",
                           "--out", str(tmp_path / "run"), *flags], capture_output=True, text=True, timeout=120)


def test_cli_refusals_exit_2(tmp_path):
    done = distill_cli(tmp_path, "--data.local_crops", "2")
    assert done.returncode == 2 and "--data.augment dino" in done.stderr and "Traceback" not in done.stderr
    # a flattening encoder takes only the image side: refused before training, with the way out
    done = distill_cli(tmp_path, "--data.local_crops", "2", "--data.augment", "dino", "--train.teacher_cache", "false",
                       "--model.encoder", "flatten")
    assert done.returncode == 2 and "3 px local crops" in done.stderr and "--data.local_crop_size" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(TORCHRUN is None, reason="no torchrun")
def test_torchrun_two_gloo_processes_match_one(tmp_path):
    # DistributedDataParallel sees all views in one forward of the student (one gradient hook per parameter)
    opts = {**TINY, "data.augment": "dino", "data.local_crops": "2", "model.norm": "none", "train.max_steps": "3",
            "train.batch_size": "128", "probe.which": "[]", "train.probe_every": "0", "optim.name": "sgd",
            "optim.lr": "0.5"}
    args = lambda out: [a for k, v in {**opts, "out": str(out)}.items() for a in (f"--{k}", v)]  # noqa: E731
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # torchelastic's folders: here
    cli = ["-m", "randteach.cli", "--quiet", "distill"]
    subprocess.run([sys.executable, *cli, *args(tmp_path / "one")], check=True, capture_output=True, env=env)
    two = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", *cli, *args(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    student = lambda run: torch.load(run / "checkpoints" / "student.pt", weights_only=True)["model"]  # noqa: E731
    a, b = student(tmp_path / "one"), student(tmp_path / "two")
    init = torch.load(tmp_path / "one" / "checkpoints" / "student_init.pt", weights_only=True)["model"]
    assert not all(torch.equal(a[k], init[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
