import json

import pytest
import torch
from torch import nn

from randteach.analysis.escape import keep_collapse_checkpoint
from randteach.analysis.signal_layers import (LayerRecorder, RunModels, collect_representations, layer_metrics,
                                              layer_signals, samples_that_fit, transform)
from randteach.analysis.signal_propagation import RANKME, effective_rank
from randteach.cli import main
from randteach.config import build_config
from randteach.models import build_encoder
from randteach.train.loop import distill

from tiny import tiny_config


def _convnet(seed=0):
    torch.manual_seed(seed)
    return build_encoder("convnet", in_channels=1, image_size=8, norm="none", width=4)


def test_every_activation_is_a_layer_and_the_embedding_comes_last():
    enc = _convnet()
    x = torch.randn(10, 1, 8, 8)
    layers, xs = collect_representations(enc, x, None, device=torch.device("cpu"), spatial="avgpool")
    assert [layer.name for layer in layers] == ["features.2", "features.6", "features.10", "features.14", "embedding"]
    assert [layer.shape for layer in layers][:4] == [[4, 8, 8], [8, 4, 4], [16, 2, 2], [16, 1, 1]]
    assert [tuple(x.shape) for x in xs] == [(10, 4), (10, 8), (10, 16), (10, 16), (10, 16)]
    assert torch.allclose(xs[-1], enc(x))
    flat = collect_representations(enc, x, None, device=torch.device("cpu"), spatial="flatten")[1]
    assert [x.shape[1] for x in flat][:3] == [256, 128, 64]
    assert torch.allclose(flat[0].view(10, 4, 8, 8).mean((2, 3)), xs[0], atol=1e-6)


def test_a_reused_module_gives_one_layer_per_call():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(3, 5), nn.Linear(5, 2), nn.ReLU()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    with LayerRecorder(Block()) as rec:
        rec.encoder(torch.randn(4, 3))
        rec.encoder(torch.randn(6, 3))
    layers, xs = rec.layers()
    assert [layer.name for layer in layers] == ["act#1", "act#2", "embedding"]
    assert [tuple(x.shape) for x in xs] == [(10, 5), (10, 2), (10, 2)]


def test_dead_neurons_match_a_hand_count():
    enc = _convnet(seed=1)
    with torch.no_grad():
        enc.features[0].bias[:2] = -1e3        # channels 0 and 1 of the first layer can never fire
        enc.features[4].bias[5] = -1e3         # channel 5 of the second
    x = torch.randn(64, 1, 8, 8)
    labels = torch.arange(64) % 4
    # by hand: run the conv stack module by module and count channels that are 0 everywhere
    hand, h = [], x
    with torch.no_grad():
        for m in enc.features:
            h = m(h)
            if isinstance(m, nn.ReLU):
                hand.append((int((h == 0).all(dim=(0, 2, 3)).sum()), int((h == 0).all(dim=0).sum())))
    pooled = collect_representations(enc, x, None, device=torch.device("cpu"), spatial="avgpool")[1]
    flat = collect_representations(enc, x, None, device=torch.device("cpu"), spatial="flatten")[1]
    for i, (channels, units) in enumerate(hand):
        assert layer_metrics(pooled[i], labels)["dead_neurons"] == channels
        assert layer_metrics(flat[i], labels)["dead_neurons"] == units
    assert hand[0][0] >= 2 and hand[1][0] >= 1


def test_dead_neurons_are_counted_over_all_images_where_the_other_metrics_take_a_subset():
    """ESC Fig. 2b counts neurons silent across the entire data set: neuron k here fires on image k alone, so
    none is dead over all 20 images, and half would be over the 10 that memory allows the spectra."""
    enc = nn.Sequential(nn.Linear(20, 20), nn.ReLU())
    with torch.no_grad():
        enc[0].weight.copy_(torch.eye(20))
        enc[0].bias.fill_(-0.5)
    x, labels = torch.eye(20), torch.arange(20) % 2
    per_sample = 4 * (20 + 20)  # the ReLU's output and the embedding, float32
    r = layer_signals({"teacher": enc}, (x, labels), None, None, build_config("cpu").probe, 2,
                      device=torch.device("cpu"), max_bytes=per_sample * 10)
    assert (r["n_samples"], r["n_dead_samples"]) == (10, 20)
    assert [row["dead_neurons"] for row in r["metrics"]["teacher"]] == [0, 0]
    assert [row["dead_fraction"] for row in r["metrics"]["teacher"]] == [0.0, 0.0]
    subset = samples_that_fit(enc, x, labels, None, device=torch.device("cpu"), spatial="flatten", channels=None,
                              max_bytes=per_sample * 10)[0]
    assert layer_metrics(enc(subset), labels[:10])["dead_neurons"] == 10  # what the subset alone would say


def test_a_runs_signal_is_measured_on_the_images_it_distilled_on(tmp_path):
    """ESC Sec. 3's D: a run on a data.n_samples subset is measured on that subset, not the whole split."""
    from randteach.train.setup import load_training_inputs
    cfg = tiny_config(tmp_path, data__n_samples=256, train__max_steps=1, train__probe_every=0, probe__which="[]")
    run = distill(cfg, progress=False)
    images, labels = RunModels(run.path).samples("train", None)
    distilled = load_training_inputs(cfg)[2]
    assert len(images) == 256 and torch.equal(images, distilled.images) and torch.equal(labels, distilled.labels)
    assert len(RunModels(run.path).samples("train", 100)[0]) == 100


def test_center_and_standardize():
    x = torch.tensor([[1.0, 5.0, 0.0], [3.0, 5.0, 0.0], [5.0, 5.0, 0.0]])
    assert transform(x) is x
    c = transform(x, center=True)
    assert torch.allclose(c.mean(0), torch.zeros(3, dtype=c.dtype))
    s = transform(x, standardize=True)
    assert torch.allclose(s[:, 0].std(), torch.tensor(1.0, dtype=s.dtype)) and (s[:, 1:] == 0).all()


def test_signal_command_on_a_tiny_run(tmp_path, capsys):
    cfg = tiny_config(tmp_path, head__kind="linear", head__out_dim=64, init__mode="neighborhood", init__epsilon=1e-10,
                      loss__name="nmse", optim__name="sgd", optim__lr=1e4, train__precision="fp32",
                      data__n_samples=256, train__max_steps=8, train__checkpoint_every=0.5, train__probe_every=0,
                      probe__which="[]", probe__knn_k=0)
    run = distill(cfg, progress=False)
    keep_collapse_checkpoint(cfg, run.path, {"step": 4, "metric": "probe", "value": 0.0})
    rc = main(["--quiet", "signal", str(run.path), "--n-samples", "200", "--n-test", "100", "--probe.max_iter", "50",
               "--spatial", "avgpool"])
    printed = capsys.readouterr().out
    assert rc == 0 and "5 layers" in printed and "note:" not in printed
    assert "| student | student.pt (8) |" in printed and "| collapse | collapse.pt (4) |" in printed, printed
    r = json.loads((run.path / "signal" / "signal.json").read_text())
    assert list(r["metrics"]) == ["teacher", "collapse", "student"]
    assert r["checkpoints"]["collapse"]["step"] == 4 and r["checkpoints"]["student"]["step"] == 8
    dims = [layer["dim"] for layer in r["layers"]]
    assert dims == [8, 16, 32, 32, 32]
    for role, rows in r["metrics"].items():
        assert len(rows) == 5
        for row, d in zip(rows, dims):
            assert 0 <= row["dead_neurons"] <= d and row["dead_fraction"] == pytest.approx(row["dead_neurons"] / d)
            if row["dead_neurons"] < d:
                assert 1.0 <= row["effective_rank"] <= d - row["dead_neurons"] + 1e-6
                assert row["condition_number"] >= 1.0
                assert row["trace_total"] == pytest.approx(row["trace_within"] + row["trace_between"], rel=1e-4)
                assert 0.0 <= row["probe"]["linear"] <= 1.0
    for row in r["metrics"]["teacher"]:
        assert row["separability_rel_teacher"] == pytest.approx(1.0)
    teacher_probe = r["metrics"]["teacher"][-1]["probe"]["linear"]
    assert teacher_probe > 0.3  # digits from a random conv net's embedding: well above chance (0.1)
    for name in ("signal_propagation.png", "signal_representation.png"):
        assert (run.path / "signal" / name).stat().st_size > 0
    # --student-step: theta_S is the student saved at that step (ESC Sec. 3: after 100 epochs, not the last step)
    assert main(["--quiet", "signal", str(run.path), "--n-samples", "200", "--no-probe", "--student-step", "4",
                 "--out", str(tmp_path / "step4")]) == 0
    assert "| student | student_step4.pt (4) |" in capsys.readouterr().out
    assert main(["--quiet", "signal", str(run.path), "--no-probe", "--student-step", "3", "--out",
                 str(tmp_path / "x")]) == 2
    assert "saved no student at step 3; its saved students are at steps 2, 4, 6, 8" in capsys.readouterr().err
    # an unfinished run (as a kill leaves it): its latest snapshot stands in for the student, and it says so
    (run.path / "summary.json").unlink()
    (run.path / "checkpoints" / "student.pt").unlink()
    assert main(["--quiet", "signal", str(run.path), "--n-samples", "200", "--no-probe", "--out",
                 str(tmp_path / "unfinished")]) == 0
    printed = capsys.readouterr().out
    assert "note: the run is unfinished, not completed: 'student' is its latest saved student, student_step" in printed


def test_flattened_neurons_are_the_default_as_the_authors_counted_them():
    enc = _convnet()
    x = torch.randn(12, 1, 8, 8)
    labels = torch.arange(12) % 3
    r = layer_signals({"teacher": enc}, (x, labels), None, None, build_config("cpu").probe, 3,
                      device=torch.device("cpu"))
    assert r["spatial"] == "flatten" and [layer["dim"] for layer in r["layers"]][:3] == [256, 128, 64]
    pooled = layer_signals({"teacher": enc}, (x, labels), None, None, build_config("cpu").probe, 3,
                           device=torch.device("cpu"), spatial="avgpool")
    assert [layer["dim"] for layer in pooled["layers"]][:3] == [4, 8, 16]
    assert r["n_samples"] == 12  # the whole split: it fits


def test_samples_that_fit_keeps_the_largest_stratified_subset():
    enc = _convnet()
    x, labels = torch.randn(40, 1, 8, 8), torch.arange(40) % 4
    per_sample = 4 * (256 + 128 + 64 + 16 + 16)  # every flattened layer in float32
    kw = dict(device=torch.device("cpu"), spatial="flatten", channels=None)
    assert samples_that_fit(enc, x, labels, None, **kw)[0] is x
    xs, ys = samples_that_fit(enc, x, labels, None, max_bytes=per_sample * 20 + 3, **kw)
    assert len(xs) == 20 and torch.bincount(ys).tolist() == [5, 5, 5, 5]
    # not even one sample's flattened layers (1,920 bytes) fit: a clear error that names the way out
    with pytest.raises(Exception, match="use spatial=avgpool"):
        samples_that_fit(enc, x, labels, None, max_bytes=650, **kw)
    xs, _ = samples_that_fit(enc, x, labels, None, max_bytes=per_sample * 30, **{**kw, "spatial": "avgpool"})
    assert len(xs) == 40


def test_rank_eps_and_center_give_the_rankme_number():
    x = torch.relu(torch.randn(30, 12) + 0.5)
    labels = torch.arange(30) % 3
    row = layer_metrics(x, labels, center=True, rank_eps=RANKME["eps"])
    assert row["effective_rank"] == pytest.approx(effective_rank(x.double().numpy(), **RANKME), rel=1e-9)
    assert row["effective_rank"] != pytest.approx(layer_metrics(x, labels)["effective_rank"], rel=1e-3)


def test_a_run_on_unlabelled_images_is_measured_on_the_labelled_train_split_and_says_so(tmp_path):
    from test_distill import write_stl10

    from randteach.analysis.signal_layers import RunModels
    from randteach.train.loop import distill
    write_stl10(tmp_path / "data")  # train 3 labelled images, unlabeled 4
    cfg = tiny_config(tmp_path, data__name="stl10", data__root=tmp_path / "data", data__split="unlabeled",
                      data__n_samples=4, train__batch_size=2, train__max_steps=1, probe__which="[]")
    models = RunModels(distill(cfg, progress=False).path)
    images, labels = models.samples("train", None)  # not 4 of the 3 labelled images: "has only 3"
    assert len(images) == 3 and labels.min() >= 0
    assert models.train_images() == "the labelled train split (the run distilled on data.split=unlabeled)"
