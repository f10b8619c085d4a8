"""The Python API with a user's own encoder and tensors; the import-path encoder through the command line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import randteach
from randteach.data import load_dataset
from randteach.errors import UserError
from randteach.runs.rundir import RunDir

TINY = {"head.hidden_dims": [32], "head.bottleneck_dim": 8, "head.out_dim": 32, "train.epochs": 1,
        "train.batch_size": 64, "train.device": "cpu", "probe.max_iter": 50}


class TinyEncoder(nn.Module):
    """No convolution, a buffer, no embed_dim attribute: the API must infer it."""

    def __init__(self, in_channels=1, image_size=8):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, 24), nn.ReLU(),
                                 nn.Linear(24, 12))
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        return self.net(x) * self.scale


def make_encoder(in_channels, image_size):
    return TinyEncoder(in_channels, image_size)


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits", "train")
    return d.images, d.labels


def test_api_with_factory_and_tensors(tmp_path, digits):
    result = randteach.distill(encoder=make_encoder, train=digits, progress=False, out=str(tmp_path / "a"), **TINY)
    s = result.summary
    assert s["status"] == "completed"
    assert set(s["probe"]) == {"teacher", "student", "input"}
    assert s["probe"]["student"]["linear"] > 0.5      # 80/20 split of the labelled training data
    again = randteach.distill(encoder=make_encoder, train=digits, progress=False, out=str(tmp_path / "a"), **TINY)
    assert again.summary == s                          # not redone


def test_api_with_instance_is_reinitialized(tmp_path, digits):
    enc = TinyEncoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    result = randteach.distill(encoder=enc, train=digits, progress=False, **{**TINY, "probe.which": []},
                               out=str(tmp_path / "b"))
    assert result.summary["status"] == "completed"
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k])                  # the user's module is left untouched
    teacher = torch.load(result.path / "checkpoints" / "teacher.pt", weights_only=True)["model"]
    assert not torch.equal(teacher["encoder.net.1.weight"], before["net.1.weight"])
    assert torch.equal(teacher["encoder.scale"], torch.tensor(2.0))


def test_api_content_addressing_separates_encoders(tmp_path, digits, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opts = {**TINY, "probe.which": [], "train.max_steps": 2}
    a = randteach.distill(encoder=make_encoder, train=digits, progress=False, **opts)
    b = randteach.distill(encoder=TinyEncoder(), train=digits, progress=False, **opts)
    assert a.path != b.path


def test_api_bad_data():
    with pytest.raises(UserError, match="pair of tensors"):
        randteach.distill(encoder=make_encoder, train=[1, 2, 3], progress=False)


def test_import_path_encoder_through_the_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "randteach.cli", "--quiet", "distill", "--preset", "cpu",
                        "--data.name", "digits", "--model.encoder", "test_api:make_encoder",
                        *[a for k, v in TINY.items() for a in (f"--{k}", str(v))],
                        "--probe.which", "[student]", "--out", str(tmp_path / "c")],
                       capture_output=True, text=True, cwd=str(tmp_path),
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")) if p)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert RunDir(tmp_path / "c").summary()["probe"]["student"]["linear"] > 0.5


def test_cli_refuses_to_resume_a_python_object_run(tmp_path, digits):
    out = tmp_path / "py"
    randteach.distill(encoder=make_encoder, train=digits, progress=False, out=str(out),
                      **{**TINY, "probe.which": [], "train.max_steps": 1})
    r = subprocess.run([sys.executable, "-m", "randteach.cli", "distill", "--resume", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "resume=True" in r.stderr and "Traceback" not in r.stderr
