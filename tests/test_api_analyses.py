"""The analyses of the Python API on Python objects: a module defined here, tensors, run directories."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import randteach
from randteach.api import as_image_data
from randteach.config import build_config
from randteach.data import Preprocess, load_dataset, stratified_subset
from randteach.errors import UserError
from randteach.probes.embedding import score
from randteach.train.supervised import Classifier

SMALL = {"head.hidden_dims": [32], "head.bottleneck_dim": 8, "head.out_dim": 32, "probe.max_iter": 100,
         "train.device": "cpu"}


class Net(nn.Module):
    """(B, 1, 8, 8) -> (B, 12): no convolution, no embed_dim attribute."""

    def __init__(self, in_channels=1, image_size=8, bias=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, 24), nn.ReLU(),
                                 nn.Linear(24, 12))
        with torch.no_grad():
            self.net[1].bias.add_(bias)

    def forward(self, x):
        return self.net(x)


def net(seed, bias=0.0):
    torch.manual_seed(seed)
    return Net(bias=bias)


@pytest.fixture(scope="module")
def digits():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    train = train.subset(stratified_subset(train.labels, 300, seed=0))
    test = test.subset(stratified_subset(test.labels, 150, seed=0))
    return (train.images, train.labels), (test.images, test.labels)


def test_probe_of_a_module_is_the_probe_of_its_features(digits):
    (xtr, ytr), (xte, yte) = digits
    got = randteach.probe(nn.Flatten(), (xtr, ytr), (xte, yte), **{"probe.max_iter": 100})
    cfg = build_config(None, None, {"probe.max_iter": 100})
    pre = Preprocess.fit(as_image_data((xtr, ytr)))
    direct = score(pre(xtr).flatten(1), ytr, pre(xte).flatten(1), yte, cfg.probe, 10)
    assert got == pytest.approx(direct)
    dead = randteach.probe(net(0, bias=-100.0), (xtr, ytr), (xte, yte), **{"probe.max_iter": 100})
    assert dead["linear"] < 0.2 < got["linear"]        # all-dead ReLUs: constant features, chance level


def test_probe_splits_data_given_alone_and_refuses_non_modules(digits):
    (xtr, ytr), _ = digits
    r = randteach.probe(net(0), (xtr, ytr), **{"probe.max_iter": 50})
    assert set(r) == {"linear", "knn"} and 0.0 <= r["linear"] <= 1.0
    floats = randteach.probe(net(0), (xtr.float() / 16, ytr), **{"probe.max_iter": 50})   # used as given
    assert set(floats) == {"linear", "knn"}
    with pytest.raises(UserError, match="nn.Module"):
        randteach.probe(42, (xtr, ytr))
    with pytest.raises(UserError, match="not a randteach run directory"):
        randteach.probe("no/such/run", (xtr, ytr))


def test_signal_report_of_modules(digits, tmp_path):
    (xtr, ytr), (xte, yte) = digits
    r = randteach.signal_report({"a": net(0), "dead": net(0, bias=-100.0)}, (xtr, ytr), (xte, yte),
                                n_samples=200, n_test=100, out=tmp_path / "sig", **{"probe.max_iter": 50})
    assert r["relative_to"] == "a" and [layer["name"] for layer in r["layers"]] == ["net.2", "embedding"]
    a, dead = r["metrics"]["a"], r["metrics"]["dead"]
    assert a[0]["separability_rel_teacher"] == pytest.approx(1.0)
    assert dead[0]["dead_neurons"] == 24 and a[0]["dead_neurons"] < 24
    idx = stratified_subset(ytr, 200, seed=0)                  # the metrics' class-stratified subset
    with torch.no_grad():
        hidden = torch.relu(net(0).net[1](Preprocess.fit(as_image_data((xtr, ytr)))(xtr[idx]).flatten(1)))
    assert a[0]["dead_neurons"] == int((hidden.amax(0) == 0).sum())
    assert a[1]["effective_rank"] != dead[1]["effective_rank"]
    assert (tmp_path / "sig" / "signal.json").is_file() and (tmp_path / "sig" / "signal_propagation.png").is_file()


def test_landscape_through_three_modules_matches_direct_losses(digits, tmp_path):
    (xtr, ytr), _ = digits
    t, s1, s2 = net(0), net(1), net(2)
    r = randteach.landscape([t, s1, s2], data=(xtr, ytr), grid=3, extent=(0.0, 1.0), probe=False, n_loss=300,
                            out=tmp_path / "land", **{"loss.name": "mse"})
    assert r["complete"] and r["loss"].shape == (3, 3)
    x = Preprocess.fit(as_image_data((xtr, ytr)))(xtr)
    with torch.no_grad():
        ft = t(x)
        direct = [float((m(x) - ft).pow(2).mean()) for m in (t, s1, s2)]  # MSE: a mean over features and batch
    assert r["loss"][0, 0] == pytest.approx(direct[0], abs=1e-6)     # the origin: the teacher itself
    assert r["loss"][0, 2] == pytest.approx(direct[1], rel=1e-4)     # (l1, l2) = (1, 0): anchor 1
    assert r["loss"][2, 0] == pytest.approx(direct[2], rel=1e-4)     # (0, 1): anchor 2
    with pytest.raises(UserError, match="out="):
        randteach.landscape([t, s1, s2], data=(xtr, ytr), grid=3, probe=False)
    mistakes = {"which plane": {}, "not both": {"anchors": ["a", "b", "c"], "view": "shared", "runs": ["r"]},
                "pass architecture=": {"anchors": [m.state_dict() for m in (t, s1, s2)], "data": (xtr, ytr)},
                "pass the data": {"anchors": [t, s1, s2]}}
    for message, kwargs in mistakes.items():
        with pytest.raises(UserError, match=message):
            randteach.landscape(grid=3, probe=False, **kwargs)


def _direct_accuracy(encoder, digits):
    (xtr, ytr), (xte, yte) = digits
    clf = Classifier(copy.deepcopy(encoder), 10, seed=0)
    pre = Preprocess.fit(as_image_data((xtr, ytr)))
    with torch.no_grad():
        return float((clf(pre(xte)).argmax(1) == yte).float().mean())


def test_imp_and_lmc_start_from_the_module_as_it_is(digits, tmp_path):
    # lr 1e-12 (0 is refused, as on the command line): training changes no prediction, so round 0 / every LMC
    # run is the module with a fresh classifier
    enc = net(3)
    enc.embed_dim = 12                                     # for the direct Classifier below
    train, test = digits
    recipe = dict(epochs=1, batch_size=100, lr=1e-12, milestones=[], augment=False, **SMALL)
    r = randteach.imp(enc, train, test, rounds=1, out=tmp_path / "imp", **recipe)
    assert [s["start"] for s in r["series"]] == ["encoder@0", "random@0"]
    assert r["series"][0]["rounds"][0]["test_accuracy"] == pytest.approx(_direct_accuracy(enc, digits))
    assert r["series"][0]["rounds"][1]["sparsity"] == pytest.approx(0.2, abs=0.01)
    r = randteach.lmc(enc, train, test, starts=["encoder"], runs=2, resolution=3, bn_batches=0,
                      out=tmp_path / "lmc", **recipe)
    s = r["series"][0]
    assert s["runs"][0]["test_error"] == pytest.approx(1 - _direct_accuracy(enc, digits))
    assert s["barrier_max"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(UserError, match="unknown argument"):
        randteach.imp(enc, train, test, out=tmp_path / "x", epoch=1)


@pytest.mark.parametrize("analysis, kw, message", [
    ("lmc", {"resolution": 2}, "resolution: 2 is out of range"),   # the ends alone: a barrier of 0 always
    ("lmc", {"runs": 1}, "runs: 1 is out of range"),               # trained, then no pair: nan
    ("lmc", {"bn_batches": -1}, "bn_batches: -1 is out of range"),
    ("imp", {"fraction": 1.5}, "fraction: 1.5 is out of range"),   # pruned half, said 1.5
    ("imp", {"rounds": -1}, "rounds: -1 is out of range"),         # no rounds at all
    ("imp", {"epochs": 0}, "epochs: 0 is out of range"),
    ("imp", {"lr": -1}, "lr: -1 is out of range"),
    ("lmc", {"n_train": 0}, "n_train: 0 is out of range")])
def test_imp_and_lmc_refuse_what_their_commands_refuse(digits, tmp_path, analysis, kw, message):
    train, test = digits
    with pytest.raises(UserError, match=message):
        getattr(randteach, analysis)(net(0), train, test, out=tmp_path / "x", **kw)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits):
    """A run distilled from the Python API with the module's factory: its config cannot name the encoder."""
    out = tmp_path_factory.mktemp("api") / "run"
    return randteach.distill(encoder=Net, train=digits[0], progress=False, out=str(out),
                             **{**SMALL, "train.epochs": 1, "train.batch_size": 100, "probe.which": []})


def test_run_directories_take_python_data_and_the_architecture(run, digits):
    (xtr, ytr), (xte, yte) = digits
    which = {"probe.which": ["teacher", "student", "input"]}     # the run itself probed nothing
    r = randteach.probe(run, (xtr, ytr), (xte, yte), architecture=Net, **which)
    assert set(r) == {"teacher", "student", "input"}
    assert (run.path / "probes" / "custom.json").is_file()
    other = randteach.probe(run, (xtr[:150], ytr[:150]), (xte, yte), architecture=Net, **which)
    assert other != r                                          # the data passed is the data probed
    sig = randteach.signal_report(run, (xtr, ytr), (xte, yte), architecture=Net, n_samples=100, n_test=50,
                                  **{"probe.max_iter": 30})
    assert set(sig["metrics"]) == {"teacher", "student"} and sig["data"] == "custom"
    land = randteach.landscape([f"{run.path}:teacher", f"{run.path}:student_init", f"{run.path}:student"],
                               architecture=Net, data=(xtr, ytr), grid=2, extent=(0.0, 1.0), probe=False,
                               n_loss=100)
    assert land["complete"] and np.isfinite(land["loss"]).all()


@pytest.mark.parametrize("command", [["signal", "{run}"], ["finetune", "{run}", "--epochs", "1"],
                                     ["imp", "{run}"], ["lmc", "{run}"], ["export", "{run}", "--out", "{tmp}/enc"],
                                     ["landscape", "--anchors", "{run}:teacher", "{run}:student_init", "{run}:student"]])
def test_commands_refuse_a_run_whose_encoder_came_from_python(run, tmp_path, capsys, command):
    """config.yaml names a built-in encoder, not the Python one: rebuilding it would not take the weights."""
    from randteach.cli import main
    argv = [a.format(run=run.path, tmp=tmp_path) for a in command]
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert "came from a Python object" in err and "architecture=YourEncoder" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_imp_of_a_run_rebuilds_its_python_encoder(run, digits, tmp_path):
    from randteach.runs.checkpoint import load_state_dict
    student = Net()
    student.load_state_dict({k[len("encoder."):]: v for k, v in load_state_dict(run.path, "student").items()
                             if k.startswith("encoder.")})
    student.embed_dim = 12
    r = randteach.imp(run, *digits, architecture=Net, rounds=0, out=tmp_path / "imp", epochs=1, batch_size=100,
                      lr=1e-12, milestones=[], augment=False)
    assert [s["start"] for s in r["series"]] == ["student@0", "random@0"]
    assert r["series"][0]["rounds"][0]["test_accuracy"] == pytest.approx(_direct_accuracy(student, digits))


@pytest.mark.parametrize("command", [["signal", "{a}", "--collapse", "{b}/checkpoints/student.pt"],
                                     ["finetune", "{a}", "--start", "{b}/checkpoints/student.pt", "--epochs", "1"],
                                     ["landscape", "--anchors", "{a}:teacher", "{b}/checkpoints/student.pt",
                                      "{a}:student"]])
def test_a_checkpoint_of_another_architecture_is_a_message(tmp_path_factory, capsys, command):
    from randteach.cli import main
    from randteach.train.loop import distill
    from tiny import tiny_config
    root = tmp_path_factory.mktemp("arch")
    a, b = (distill(tiny_config(root / name, model__width=width, train__max_steps=2, probe__which="[]"),
                    progress=False).path for name, width in (("a", 8), ("b", 4)))
    assert main(["--quiet", *[x.format(a=a, b=b) for x in command], "--out", str(root / "out")]) == 2
    err = capsys.readouterr().err
    assert "another architecture" in err or "not the same architecture" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("text", ["name: [", "- 1", ""])
def test_a_damaged_config_yaml_is_a_message(run, tmp_path, capsys, text):
    import shutil

    from randteach.cli import main
    copy = tmp_path / "copy"
    shutil.copytree(run.path, copy)
    (copy / "config.yaml").write_text(text)
    for command in (["probe", str(copy)], ["signal", str(copy)], ["finetune", str(copy), "--epochs", "1"]):
        assert main(["--quiet", *command]) == 2
        err = capsys.readouterr().err
        assert "config" in err and "Traceback" not in err, err
