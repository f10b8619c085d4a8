"""The Python API with a user's own encoder and tensors; the import-path encoder through the command line."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import randteach
from randteach.api import as_image_data
from randteach.config import build_config
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


def test_a_dataset_of_pil_images_and_float64_tensors_are_taken_as_images():
    """torchvision's data sets yield PIL images without a transform; numpy users pass float64."""
    from PIL import Image
    from randteach.api import as_image_data

    class Pictures(torch.utils.data.Dataset):
        def __init__(self, mode):
            g = torch.Generator().manual_seed(0)
            shape = (6, 6, 3) if mode == "RGB" else (6, 6)
            self.pixels = [torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) for _ in range(4)]
            self.mode = mode

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return Image.fromarray(self.pixels[i].numpy(), self.mode), i % 2

    rgb = as_image_data(Pictures("RGB"))
    assert rgb.images.shape == (4, 3, 6, 6) and rgb.images.dtype == torch.uint8
    assert torch.equal(rgb.images[1], Pictures("RGB").pixels[1].permute(2, 0, 1))
    grey = as_image_data(Pictures("L"))
    assert grey.images.shape == (4, 1, 6, 6) and grey.num_classes == 2
    floats = as_image_data((torch.rand(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 0])))
    assert floats.images.dtype == torch.float32


def test_api_inputs_that_cannot_work_are_one_clear_error(digits):
    conv_rgb = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(UserError, match=r"cannot take these images, a batch of shape \(\d+, 1, 8, 8\).*3 channels"):
        randteach.probe(conv_rgb, digits, digits)
    with pytest.raises(UserError, match="no encoders to measure"):
        randteach.signal_report({}, digits)
    images, labels = digits
    rgb = images.repeat(1, 3, 1, 1).permute(0, 2, 3, 1)  # (N, 8, 8, 3): a numpy / torchvision layout
    with pytest.raises(UserError, match=r"look channels-last.*permute\(0, 3, 1, 2\)"):
        randteach.distill(encoder=make_encoder, train=(rgb, labels), progress=False)
    # found by an API walkthrough: each was accepted and did something else than asked
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    with pytest.raises(UserError, match="labels must be class indices.*got 0.5"):
        randteach.probe(net, (images, labels.float() + 0.5))         # truncated to the integer labels
    assert as_image_data((images, labels.double())).labels.equal(labels)  # whole numbers: taken
    floats = images.float() / 255
    with pytest.raises(UserError, match="data.image_size=16 pads or resizes uint8 images; float images"):
        randteach.probe(net, (floats, labels), **{"data.image_size": 16})  # the encoder saw 8 x 8
    with pytest.raises(UserError, match="pass config= or preset='paper', not both"):
        randteach.distill(build_config("cpu"), preset="paper", progress=False)  # preset ignored
    with pytest.raises(UserError, match="model.encoder.*'mlp'"):
        randteach.distill(encoder="mlp", train="digits", progress=False)  # 'str' object is not callable
    rgb_factory = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # noqa: E731
    with pytest.raises(UserError, match=r"cannot take the data's images, a batch of shape \(2, 1, 8, 8\).*for 1 "):
        randteach.distill(encoder=rgb_factory, train=digits, progress=False)  # a conv RuntimeError
    with pytest.raises(UserError, match="config= takes a Config, got a dict"):
        randteach.distill({"data": {"name": "digits"}}, progress=False)  # 'dict' object has no attribute 'to_dict'
    with torch.inference_mode(), pytest.raises(UserError, match="outside that block"):
        randteach.distill(encoder=make_encoder, train=digits, progress=False)  # cannot be saved for backward
    accs = randteach.probe(net, (images.numpy(), labels.numpy()))   # arrays: "cannot use a tuple as data"
    assert accs == randteach.probe(net, (images, labels))
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
    wrong.embed_dim = 32
    with pytest.raises(UserError, match="declares embed_dim = 32 but gives 16 features"):
        randteach.distill(encoder=wrong, train=digits, progress=False)  # mat1 and mat2 shapes cannot be multiplied
    with pytest.raises(UserError, match="with train= the images given are distilled on: leave data.split"):
        randteach.distill(train=digits, progress=False, **{"data.name": "stl10", "data.split": "unlabeled"})
    # found by the API review of 2026-12-03: each was accepted and misread, or a bare torch error
    with pytest.raises(UserError, match=r"images are 8 x 6 px; the encoders take square images: center-crop"):
        as_image_data((images[..., :6], labels))  # the width was taken as the side: padded or squashed
    with pytest.raises(UserError, match=r"images are torch.int64; expected uint8 pixels 0-255"):
        as_image_data((images.long(), labels))
    with pytest.raises(UserError, match=r"labels: -2 at index 0; expected class indices 0 ... C-1 \(or -1"):
        as_image_data((images, labels - 2))
    with pytest.raises(UserError, match=r"no labels to probe with \(\d+ of its images are labelled -1"):
        randteach.probe(net, (images, labels - 1))
    with pytest.raises(UserError, match=r"labels: labels must be class indices.*numpy.unique"):
        as_image_data((images, np.array(["cat"] * len(labels))))
    with pytest.raises(UserError, match=r"labels of shape \(\d+, 10\); expected \(N,\) class indices: one-hot"):
        as_image_data((images, torch.nn.functional.one_hot(labels, 10)))  # "N images but 10 N labels"
    with pytest.raises(UserError, match=r"fit on has images of 1 channel, the data to score on of 3 channels"):
        randteach.probe(net, (images, labels), (images.repeat(1, 3, 1, 1), labels))  # a bare ValueError


def test_distill_keeps_the_callers_random_stream_and_grad_mode(tmp_path, digits):
    """Inside torch.no_grad() it still trains; the caller's torch RNG continues where it was."""
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    with torch.no_grad():
        r = randteach.distill(encoder=make_encoder, train=digits, progress=False, out=str(tmp_path / "r"),
                              **{**TINY, "probe.which": [], "train.max_steps": 2})
    assert r.summary["status"] == "completed" and torch.equal(torch.rand(3), want)


def test_a_float64_default_dtype_trains_the_run_its_address_names(tmp_path):
    """A caller's torch.set_default_dtype(float64) built a float64 teacher (other draws, teacher probe 0.90
    instead of 0.82) under the run address of the float32 one; the run is float32 now, the default restored."""
    from randteach.runs.checkpoint import load_state_dict
    settings = {**TINY, "probe.which": [], "train.max_steps": 2}
    plain = randteach.distill(train="digits", progress=False, out=str(tmp_path / "32"), **settings)
    torch.set_default_dtype(torch.float64)
    try:
        wide = randteach.distill(train="digits", progress=False, out=str(tmp_path / "64"), **settings)
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(torch.float32)
    for role in ("teacher", "student"):
        a, b = (load_state_dict(r.path, role) for r in (plain, wide))
        assert all(torch.equal(a[k], b[k]) for k in a), role


def test_probe_subsets_apply_to_probe_data_given_to_distill(tmp_path, digits):
    images, labels = digits
    r = randteach.distill(encoder=make_encoder, train=digits, probe_train=(images[:600], labels[:600]),
                          probe_test=(images[600:], labels[600:]), progress=False, out=str(tmp_path / "p"),
                          **{**TINY, "probe.which": ["student"], "probe.n_test": 7, "train.max_steps": 2})
    # scored on 7 images: a multiple of 1/7 (of the 837 given, only 0 or 1 would be)
    assert all(abs(7 * acc - round(7 * acc)) < 1e-9 for acc in r.summary["probe"]["student"].values())


def test_distill_leaves_the_callers_config_as_it_was(tmp_path, digits, monkeypatch):
    """The same Config for two encoders: two runs (distill once set the Config's out, so the second call
    returned the first run)."""
    from randteach.config import build_config
    monkeypatch.chdir(tmp_path)
    cfg = build_config("cpu", None, {**TINY, "probe.which": [], "train.max_steps": 1})
    a = randteach.distill(cfg, encoder=make_encoder, train=digits, progress=False)
    b = randteach.distill(cfg, encoder=lambda in_channels, image_size: TinyEncoder(in_channels, image_size),
                          train=digits, progress=False)
    assert cfg.out is None and a.path != b.path


def _wide(width):
    return lambda in_channels, image_size: nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2,
                                                                                  width))


def test_encoders_are_told_apart_by_their_closures_and_their_code():
    """A lambda over a loop variable is another encoder for every value; a class defined where there is no
    source file (a notebook cell, python -c, stdin) is keyed by its compiled code."""
    import types

    from randteach.digests import object_key
    assert object_key(_wide(4)) == object_key(_wide(4)) != object_key(_wide(32))
    keys = []
    for pooling in ("mean", "amax"):
        cell = types.ModuleType("notebook_cell")
        cell.__file__ = "<stdin>"  # what a script read from stdin has: no file to read
        sys.modules["notebook_cell"] = cell
        exec("import torch\nclass Enc(torch.nn.Module):\n"
             f"    def forward(self, x):\n        return x.flatten(2).{pooling}(2)\n", cell.__dict__)
        keys.append(object_key(cell.Enc))
    del sys.modules["notebook_cell"]
    assert keys[0] != keys[1]


def test_a_run_on_python_data_is_probed_on_data_given_again(tmp_path, digits):
    out = tmp_path / "py"
    randteach.distill(encoder=make_encoder, train=digits, progress=False, out=str(out),
                      **{**TINY, "probe.which": [], "train.max_steps": 1})
    with pytest.raises(UserError, match="architecture=YourEncoder"):
        randteach.probe(out)
    with pytest.raises(UserError, match="trained on data given from Python"):
        randteach.probe(out, architecture=make_encoder)  # the preset's fashion-mnist was never its data
    result = randteach.probe(out, digits, architecture=make_encoder, probe__which=["student"])
    assert 0.5 < result["student"]["linear"] <= 1


def test_load_encoder_rebuilds_a_python_encoder_given_as_architecture(tmp_path, digits):
    out = tmp_path / "py"
    randteach.distill(encoder=make_encoder, train=digits, progress=False, out=str(out),
                      **{**TINY, "probe.which": [], "train.max_steps": 2})
    with pytest.raises(UserError, match=r"architecture=YourEncoder \(randteach.load_encoder"):
        randteach.load_encoder(out)
    saved = torch.load(out / "checkpoints" / "student.pt", weights_only=True)["model"]
    for architecture in (make_encoder, TinyEncoder()):
        encoder = randteach.load_encoder(out, architecture=architecture)
        assert isinstance(encoder, TinyEncoder) and not encoder.training and encoder.embed_dim == 12
        assert all(torch.equal(v, saved[f"encoder.{k}"]) for k, v in encoder.state_dict().items())
        assert encoder.randteach["encoder"] == "TinyEncoder (a Python object, given as architecture)"
    torch.manual_seed(7)
    randteach.load_encoder(out, architecture=make_encoder)
    assert torch.equal(torch.rand(3), torch.manual_seed(7) and torch.rand(3))  # the caller's random stream kept


def test_a_run_continues_only_on_the_objects_it_began_with(tmp_path, digits):
    images, labels = digits
    opts = {**TINY, "probe.which": [], "train.checkpoint_every": 0.5}
    out = str(tmp_path / "run")
    first = randteach.distill(encoder=make_encoder, train=digits, progress=False, out=out,
                              **{**opts, "train.max_steps": 3})
    (Path(first.path) / "summary.json").unlink()  # as a kill leaves it: last.pt, no summary
    with pytest.raises(UserError, match="made with another train"):
        randteach.distill(encoder=make_encoder, train=(255 - images, labels), progress=False, out=out,
                          resume=True, **{**opts, "train.max_steps": 3})
    assert randteach.distill(encoder=make_encoder, train=digits, progress=False, out=out, resume=True,
                             **{**opts, "train.max_steps": 3}).summary["status"] == "completed"
    # finished, it is returned for its own objects only (it was returned for any, as a run of those)
    with pytest.raises(UserError, match="made with another encoder than the one given now"):
        randteach.distill(encoder=TinyEncoder, train=digits, progress=False, out=out,
                          **{**opts, "train.max_steps": 3})
    with pytest.raises(UserError, match="made with another train"):
        randteach.distill(encoder=make_encoder, train=(255 - images, labels), progress=False, out=out,
                          **{**opts, "train.max_steps": 3})
    assert randteach.distill(encoder=make_encoder, train=digits, progress=False, out=out,
                             **{**opts, "train.max_steps": 3}).path == first.path
    # so is one that diverged before its first checkpoint (it has no last.pt)
    blown = {**opts, "optim.lr": 1e30, "train.max_steps": 5, "train.checkpoint_every": 0}
    out = str(tmp_path / "diverged")
    run = randteach.distill(encoder=make_encoder, train=digits, progress=False, out=out, **blown)
    assert run.summary["status"] == "diverged" and not (Path(run.path) / "checkpoints" / "last.pt").exists()
    with pytest.raises(UserError, match="made with another encoder than the one given now"):
        randteach.distill(encoder=TinyEncoder, train=digits, progress=False, out=out, **blown)


def test_an_encoder_from_python_gets_the_images_at_their_size(tmp_path, digits):
    """The paper preset names resnet18, which needs 32 px; a Python encoder is not it: 8 px stay 8 px."""
    from randteach.runs.checkpoint import load_checkpoint
    r = randteach.distill(encoder=make_encoder, train=digits, preset="paper", progress=False, out=str(tmp_path / "p"),
                          **{**TINY, "probe.which": [], "train.max_steps": 1, "train.teacher_cache": False})
    assert load_checkpoint(Path(r.path) / "checkpoints" / "teacher.pt")["image_size"] == 8
    images, labels = digits
    with pytest.raises(UserError, match="float images .* are used as given"):
        randteach.distill(encoder=make_encoder, train=(images / 255.0, labels), progress=False,
                          out=str(tmp_path / "f"), **{**TINY, "data.image_size": 16})


def test_a_module_already_on_the_probe_device_is_used_as_it_is():
    # "cpu:0" and a tensor's "cpu" name one device (as "cuda" and "cuda:0" do on a GPU): no copy of the
    # user's encoder, which would double its memory on every probe call
    from randteach.api import _on
    module = torch.nn.Linear(2, 2)
    assert _on(module, torch.device("cpu", 0)) is module and _on(module, torch.device("cpu")) is module
    assert _on(module, torch.device("meta")) is not module


class ScaledByItem(TinyEncoder):
    """Works, declares its width, and cannot run on the meta device: it reads a value in forward, and keeps a
    plain tensor attribute that is neither a parameter nor a buffer."""
    embed_dim = 12

    def __init__(self, in_channels=1, image_size=8):
        super().__init__(in_channels, image_size)
        self.shift = torch.zeros(12)

    def forward(self, x):
        return self.net(x) * self.scale.item() + self.shift


def test_an_encoder_that_only_runs_on_real_tensors_is_accepted(tmp_path, digits):
    # the check of a declared embed_dim on a meta-device copy refused it ("cannot take the data's images")
    r = randteach.distill(encoder=ScaledByItem, train=digits, progress=False, out=str(tmp_path / "r"),
                          **{**TINY, "probe.which": [], "train.max_steps": 2})
    assert r.summary["status"] == "completed"
    wrong = ScaledByItem()
    wrong.embed_dim = 32
    with pytest.raises(UserError, match="declares embed_dim = 32 but gives 12 features"):
        randteach.distill(encoder=wrong, train=digits, progress=False, out=str(tmp_path / "w"))
