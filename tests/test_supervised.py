import atexit
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from randteach.cli import main
from randteach.config import build_config, config_from_dict
from randteach.data import ImageData, Preprocess
from randteach.models import build_model
from randteach.runs.checkpoint import load_checkpoint, load_state_dict
from randteach.train.loop import distill
from randteach.train.supervised import (Classifier, Recipe, RunInfo, augment_batch, build_classifier,
                                        load_supervised_data, parse_start, recompute_bn_stats, run_info,
                                        train_supervised)

# A distilled run in a few seconds: digits (8x8), a width-8 conv net with batch norm, a 64-way head.
TINY_RUN = {"data.name": "digits", "model.encoder": "convnet", "model.width": "8", "model.norm": "batch",
            "head.hidden_dims": "[64]", "head.bottleneck_dim": "16", "head.out_dim": "64",
            "train.epochs": "1", "train.batch_size": "64", "train.device": "cpu", "train.precision": "fp32",
            "train.checkpoint_every": "0", "train.teacher_cache": "false", "probe.which": "[]",
            "probe.max_iter": "50"}
TINY_RECIPE = Recipe(epochs=2, batch_size=32, lr=0.02, milestones=[1.5], augment=False, eval_every=1)


_RUNS: dict[str, Path] = {}


def tiny_run(alpha: str = "1e-10") -> Path:
    """A tiny distilled run with init.alpha = `alpha`, created once per test session and shared by the
    analysis tests (read-only: they write their outputs elsewhere). All share the teacher (train.seed 0)."""
    if alpha not in _RUNS:
        root = Path(tempfile.mkdtemp(prefix="randteach-analysis-"))
        atexit.register(shutil.rmtree, root, True)
        cfg = build_config("cpu", None, {**TINY_RUN, "init.alpha": alpha, "out": str(root / f"alpha{alpha}")})
        _RUNS[alpha] = distill(cfg, progress=False).path
    return _RUNS[alpha]


@pytest.fixture(scope="module")
def run():
    return tiny_run()


def _numpy_windows(padded, h, w):
    return [padded[:, dy:dy + h, dx:dx + w] for dy in range(padded.shape[1] - h + 1)
            for dx in range(padded.shape[2] - w + 1)]


def test_augment_is_a_flip_and_a_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 2, 6, 5), dtype=torch.uint8, generator=g)
    out = augment_batch(x, pad=2, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    flipped_any = shifted_any = False
    for a, o in zip(x.numpy(), out.numpy()):
        matches = []
        for flip in (False, True):
            src = a[:, :, ::-1] if flip else a
            padded = np.pad(src, ((0, 0), (2, 2), (2, 2)))
            for k, win in enumerate(_numpy_windows(padded, 6, 5)):
                if np.array_equal(win, o):
                    matches.append((flip, k))
        assert matches, "output is not a crop of the (flipped) zero-padded image"
        flipped_any |= any(f for f, _ in matches) and not any(not f for f, _ in matches)
        shifted_any |= all(k != 2 * 5 + 2 for _, k in matches)  # 12 = the centred window
    assert flipped_any and shifted_any
    same = augment_batch(x, pad=0, generator=torch.Generator().manual_seed(1))
    for a, o in zip(x, same):
        assert torch.equal(o, a) or torch.equal(o, a.flip(-1))


def test_multistep_schedule():
    r = Recipe(lr=0.1, gamma=0.1, milestones=[1, 2], batch_size=10)
    # 25 samples, batch 10: 3 steps per epoch; milestones at steps 3 and 6
    assert [r.lr_at(s, 25) for s in range(8)] == pytest.approx([0.1] * 3 + [0.01] * 3 + [0.001] * 2)
    assert r.total_steps(25) == round(160 * 3)


def test_parse_start():
    assert parse_start("student") == ("student", 0.0)
    assert parse_start("random@1.5") == ("random", 1.5)
    assert parse_start("runs/x/checkpoints/student.pt@2") == ("runs/x/checkpoints/student.pt", 2.0)


def test_recomputed_bn_statistics_are_the_plain_average_of_batch_statistics():
    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8, generator=g), torch.zeros(40), 1, "x")
    pre = Preprocess([0.0], [1.0])
    model = nn.Sequential(nn.BatchNorm2d(1))
    model[0].running_mean.fill_(5.0)
    assert recompute_bn_stats(model, data, pre, torch.device("cpu"), batches=3, batch_size=8, seed=0) == 1
    from randteach.train.setup import epoch_order
    order = epoch_order(40, 0, 0)
    x = pre(data.images).double()
    means = [x[order[k * 8:(k + 1) * 8]].mean() for k in range(3)]
    assert float(model[0].running_mean) == pytest.approx(float(sum(means) / 3), rel=1e-5)
    assert model[0].momentum == 0.1 and model.training  # restored


def test_training_learns_and_is_repeatable(run):
    info = run_info(run)
    data = load_supervised_data(info.cfg, info.image_size, n_train=512, n_test=200)
    results, states = [], []
    for _ in range(2):
        model = build_classifier(info, "student", data.num_classes, seed=0)
        results.append(train_supervised(model, data, TINY_RECIPE, torch.device("cpu")))
        states.append(model.state_dict())
    assert results[0]["test_accuracy"] > 0.5  # 10 classes
    assert [h["epoch"] for h in results[0]["history"]] == [1, 2]
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_classifier_starts(run):
    info = run_info(run)
    student = load_state_dict(run, "student")
    clf = build_classifier(info, "student", 10, seed=3)
    assert all(torch.equal(v, student["encoder." + k]) for k, v in clf.encoder.state_dict().items())
    again = build_classifier(info, "random", 10, seed=3)
    other = build_classifier(info, "random", 10, seed=4)
    assert torch.equal(again.fc.weight, clf.fc.weight) and not torch.equal(again.fc.weight, other.fc.weight)
    assert not torch.equal(again.encoder.features[0].weight, other.encoder.features[0].weight)
    assert isinstance(clf, Classifier)


def test_random_start_is_drawn_per_distilled_run(run):
    """Random starts of runs with different train.seed are independent inits (one shared init would make
    the seed spread of a random baseline zero); run seed 0 draws from the seed itself."""
    info = run_info(run)
    cfg1 = config_from_dict({**info.cfg.to_dict(), "train": {**info.cfg.to_dict()["train"], "seed": 1}})
    first = build_classifier(info, "random", 10, seed=3)
    second = build_classifier(RunInfo(info.path, cfg1, info.in_channels, info.image_size), "random", 10, seed=3)
    direct = build_model(info.cfg, info.in_channels, info.image_size, seed=3 + 1_000_003 * info.cfg.train.seed)
    assert all(torch.equal(v, direct.encoder.state_dict()[k]) for k, v in first.encoder.state_dict().items())
    assert not torch.equal(first.encoder.features[0].weight, second.encoder.features[0].weight)
    assert torch.equal(first.fc.weight, second.fc.weight)  # the classifier follows the recipe seed alone


def test_finetune_command(run, tmp_path):
    out = tmp_path / "ft"
    rc = main(["--quiet", "finetune", str(run), "--epochs", "1", "--batch-size", "64", "--lr", "0.05",
               "--milestones", "--no-augment", "--n-train", "256", "--n-test", "100", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["recipe"]["augment"] is False and summary["recipe"]["milestones"] == []
    assert summary["n_train"] == 256 and 0.1 < summary["test_accuracy"] <= 1
    state = load_checkpoint(out / "model.pt")["model"]
    assert "fc.weight" in state and any(k.startswith("encoder.") for k in state)
    assert main(["finetune", str(run), "--start", "student@1", "--out", str(tmp_path / "x")]) == 2
