"""Encoders that leave the run: export (safetensors / pt), load_encoder, and `randteach embed`."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import randteach
from randteach.config import config_from_dict, load_yaml
from randteach.errors import UserError
from randteach.models import build_model
from randteach.probes.embedding import Prober
from randteach.runs.checkpoint import load_state_dict
from randteach.runs.export import export_encoder
from randteach.train.loop import distill

from tiny import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("export"), train__epochs=1, train__precision="fp32",
                      train__device="cpu", probe__which="[]")
    return distill(cfg, progress=False).path


def run_features(run, which):
    """The features the run's own probes compute: the run's model rebuilt from config + checkpoint."""
    cfg = config_from_dict(load_yaml(run / "config.yaml"))
    model = build_model(cfg, 1, 8, seed=0)
    model.load_state_dict(load_state_dict(run, which))
    prober = Prober(cfg, 1, 8, torch.device("cpu"))
    return prober, prober.features(model.encoder)


def cli(*args):
    return subprocess.run(["sh", "-c", 'umask 022 && exec "$@"', "sh", sys.executable, "-m", "randteach.cli", "--quiet",
                           *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_exported_encoder_embeds_to_the_bit(run, tmp_path, fmt):
    if fmt == "safetensors":
        pytest.importorskip("safetensors", reason="the export extra is not installed")
    done = cli("export", run, "--format", fmt, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "student-encoder.json").read_text())
    assert meta["encoder"] == "convnet" and meta["weights"] == f"student-encoder.{fmt}"
    assert len(meta["preprocess"]["mean"]) == 1
    for path in tmp_path.iterdir():  # shareable as the umask (0022 in cli()) allows: safetensors wrote 0600
        assert path.stat().st_mode & 0o777 == 0o644, path
    prober, (train_x, test_x) = run_features(run, "student")
    for path in (tmp_path / "student-encoder.json", tmp_path / f"student-encoder.{fmt}"):
        encoder = randteach.load_encoder(path)
        assert not encoder.training
        got_train, got_test = prober.features(encoder)
        assert torch.equal(got_train, train_x) and torch.equal(got_test, test_x)


def test_load_from_run_dir_and_roles_differ(run):
    prober, (student_x, _) = run_features(run, "student")
    _, (teacher_x, _) = run_features(run, "teacher")
    assert not torch.equal(student_x, teacher_x)  # one epoch moved the student
    assert torch.equal(prober.features(randteach.load_encoder(run, "teacher"))[0], teacher_x)
    assert torch.equal(prober.features(randteach.load_encoder(run))[0], student_x)
    assert not (run / "checkpoints" / "teacher_final.pt").exists()  # a frozen teacher is its teacher.pt


def test_embed_writes_both_roles_and_splits(run, tmp_path):
    out = tmp_path / "feats.npz"
    done = cli("embed", run, "--data.name", "digits", "--out", out)
    assert done.returncode == 0, done.stderr
    z = np.load(out)
    for which in ("teacher", "student"):
        prober, (train_x, test_x) = run_features(run, which)
        assert np.array_equal(z[f"{which}_train"], train_x.numpy())
        assert np.array_equal(z[f"{which}_test"], test_x.numpy())
    assert np.array_equal(z["train_labels"], prober.splits.train.labels.numpy())
    assert len(z["test_labels"]) == len(z["student_test"]) > 0
    done = cli("embed", run, "--data.name", "digits")  # without --out: beside the exports, named by the data
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(run / "export" / "features-digits.npz")["student_test"], z["student_test"])


def test_embed_normalizes_as_the_runs_probes_on_their_subset(tmp_path):
    # With probe.n_train the run's probes normalize by their subset's statistics; embed fitted them on the whole
    # split, so its features differed from the run's (3e-4 on digits)
    cfg = tiny_config(tmp_path / "sub", train__max_steps=2, train__precision="fp32", train__device="cpu",
                      probe__which="[]", probe__n_train=100)
    sub = distill(cfg, progress=False).path
    out = tmp_path / "feats.npz"
    done = cli("embed", sub, "--out", out)
    assert done.returncode == 0, done.stderr
    z = np.load(out)
    prober, (train_x, test_x) = run_features(sub, "student")  # the run's probes: 100 train images, every test one
    assert len(train_x) == 100 < len(z["student_train"])
    assert np.array_equal(z["student_test"], test_x.numpy())


def test_missing_safetensors_is_a_clear_error(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(UserError, match="pip install safetensors.*--format pt"):
        export_encoder(run, "student", "safetensors", tmp_path)


def test_bad_inputs_exit_2(run, tmp_path):
    assert cli("export", tmp_path).returncode == 2  # not a run
    unknown = cli("embed", run, "--out", tmp_path / "x.npz", "--optim.lr", "1")
    assert unknown.returncode == 2 and "--data.name" in unknown.stderr
    bad = cli("embed", run, "--out", tmp_path / "x.txt")
    assert bad.returncode == 2 and ".npz" in bad.stderr
    with pytest.raises(UserError, match="exported encoder"):
        randteach.load_encoder(tmp_path / "nothing.safetensors")


def test_export_records_the_normalization_training_used_not_the_data_now(tmp_path):
    """An image folder that grew after training: the exported recipe keeps the training images' mean and std
    (recorded in teacher.pt), which it used to refit on whatever the folder held at export time."""
    from PIL import Image

    from randteach.data.preprocess import Preprocess
    from randteach.train.setup import load_training_inputs

    def add_images(n, level):
        for c in ("a", "b"):
            (tmp_path / "imgs" / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8), level + 60 * (c == "b") + i, np.uint8)).save(
                    tmp_path / "imgs" / c / f"{level}-{i}.png")

    add_images(4, 20)
    cfg = tiny_config(tmp_path, data__name="folder", data__path=str(tmp_path / "imgs"), data__n_samples=None,
                      train__max_steps=1, probe__which="[]", train__teacher_cache=False)
    trained = load_training_inputs(cfg)[1].as_dict()
    run = distill(cfg, progress=False).path
    add_images(4, 150)
    assert load_training_inputs(cfg)[1].as_dict()["mean"] != trained["mean"]  # the folder now says otherwise
    info = json.loads(export_encoder(run, "student", fmt="pt").read_text())
    assert info["preprocess"] == trained and isinstance(Preprocess(**info["preprocess"]), Preprocess)
