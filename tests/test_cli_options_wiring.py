"""Command-line options that reach their command: each test runs the command in-process on a tiny real run and
finds the option's effect in the files it writes, so that a command passing on the default instead of the
option's value fails here ("every option has a test that would fail if the option did nothing")."""
import csv
import json

import numpy as np
import pytest
import torch

from randteach.analysis.lr_range import RANGE_KEYS, RISE_FACTOR, RISE_FLOOR, SMOOTHING, find_divergences, smooth
from randteach.cli import main
from randteach.config import build_config
from randteach.runs.checkpoint import load_checkpoint
from randteach.runs.export import encoder_state
from randteach.runs.rundir import RunDir
from randteach.train.loop import distill

from tiny import TINY, tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny distilled run (digits, width-8 conv net, 4 steps); every command below reads it, none writes
    into it (each gets --out)."""
    cfg = tiny_config(tmp_path_factory.mktemp("wiring-run"), data__n_samples=256, train__max_steps=4,
                      train__probe_every=0, probe__which="[]", train__precision="fp32", train__device="cpu")
    return distill(cfg, progress=False).path


# ------------------------------------------------------------------------------------------------ lr-range

# The range of tests/test_lr_range.py's diverging test: both losses leave their floor within the 30 steps.
RANGE = dict(head__kind="linear", head__out_dim=64, optim__name="sgd", loss__name="mse", init__mode="neighborhood",
             init__epsilon=1e-10, train__precision="fp32", data__n_samples=256, train__device="cpu")
RANGE_ARGS = (["--quiet", "lr-range", "--preset", "cpu", "--lr-start", "1e-2", "--lr-end", "1e12", "--steps", "30"]
              + [f"--{k}={v}" for k, v in TINY.items() if k not in RANGE_KEYS]  # (the test sets those)
              + [f"--{k.replace('__', '.')}={v}" for k, v in RANGE.items()])


def lr_range_json(out, *flags):
    assert main([*RANGE_ARGS, "--out", str(out), *flags]) == 0
    return json.loads((out / "lr_range.json").read_text())


@pytest.fixture(scope="module")
def unsmoothed_high_factor(tmp_path_factory):
    """lr-range with --smoothing 0 --factor 1e300."""
    return lr_range_json(tmp_path_factory.mktemp("lr") / "out", "--smoothing", "0", "--factor", "1e300")


@pytest.fixture(scope="module")
def high_floor_unsupervised(tmp_path_factory):
    """lr-range with --floor 1e300 --no-supervised."""
    return lr_range_json(tmp_path_factory.mktemp("lr") / "out", "--floor", "1e300", "--no-supervised")


def _losses(side):
    """The side's per-step losses as numbers (the JSON writes a non-finite loss as text)."""
    return [float(x) for x in side["loss"]]


def _finite(side):
    return _losses(side)[:len(side["smoothed"])]


def test_lr_range_smoothing_is_the_ema_factor_of_the_smoothed_curve(unsmoothed_high_factor):
    """--smoothing BETA: the smoothed loss is the EMA of the per-step loss with factor BETA; at 0 it is the
    loss itself, where the default 0.9 would average over ~10 steps."""
    r = unsmoothed_high_factor
    assert r["key"]["smoothing"] == 0.0 and "beta = 0.0" in r["smoothing"]
    for side in r["sides"].values():
        losses = _finite(side)
        assert len(losses) >= 5
        assert side["smoothed"] == pytest.approx(losses, rel=1e-12, abs=0)
        assert side["smoothed"] != pytest.approx(smooth(losses, SMOOTHING), rel=1e-3)  # what 0.9 gives


def test_lr_range_factor_is_the_rise_threshold(unsmoothed_high_factor):
    """--factor F: a rise is a smoothed loss above F x its running minimum; at F = 1e300 no finite loss
    rises, while the default 4 finds the rise of both (diverging) curves."""
    r = unsmoothed_high_factor
    assert r["key"]["factor"] == 1e300
    assert set(r["sides"]) == {"teacher_student", "supervised"}
    for side in r["sides"].values():
        assert side["rise"] is None
        default = find_divergences(side["step"], side["lr"], _losses(side), beta=0.0, factor=RISE_FACTOR)
        assert default["rise"] is not None  # the curve does rise: the flag is what hides it


def test_lr_range_floor_is_the_smallest_running_minimum(high_floor_unsupervised):
    """--floor L: running minima below L count as L in the rise test; at L = 1e300 the teacher-student loss
    never rises, where the default 1e-8 sees it leave its teacher."""
    r = high_floor_unsupervised
    ts = r["sides"]["teacher_student"]
    assert r["key"]["floor"] == 1e300
    assert ts["rise"] is None
    default = find_divergences(ts["step"], ts["lr"], _losses(ts), beta=SMOOTHING, floor=RISE_FLOOR)
    assert default["rise"] is not None


def test_lr_range_no_supervised_runs_the_teacher_student_side_only(high_floor_unsupervised,
                                                                   unsmoothed_high_factor):
    """--no-supervised: no supervised (cross-entropy) curve is trained or written; without it there is one."""
    assert set(high_floor_unsupervised["sides"]) == {"teacher_student"}
    assert high_floor_unsupervised["key"]["supervised"] is False
    assert "supervised" in unsmoothed_high_factor["sides"]


# -------------------------------------------------------------------------------------------------- signal

def signal_json(run, out, *flags):
    assert main(["--quiet", "signal", str(run), "--n-samples", "100", "--no-probe", "--spatial", "avgpool",
                 "--out", str(out), *flags]) == 0
    return json.loads((out / "signal.json").read_text())


@pytest.fixture(scope="module")
def plain_signal(run, tmp_path_factory):
    """signal with no transform and the default threshold, rank eps and collapse point (the run has none)."""
    return signal_json(run, tmp_path_factory.mktemp("signal") / "plain")


def _column(result, name, role="teacher"):
    return np.array([row[name] for row in result["metrics"][role]])


def test_signal_center_raises_the_effective_rank_of_nonnegative_features(run, plain_signal, tmp_path):
    """--center: each neuron is centered before the metrics; the mean direction that dominates the
    post-ReLU (non-negative) features goes, so every layer's effective rank grows."""
    r = signal_json(run, tmp_path / "c", "--center")
    assert r["center"] is True and plain_signal["center"] is False
    for role in ("teacher", "student"):
        assert np.all(_column(r, "effective_rank", role) > 1.1 * _column(plain_signal, "effective_rank", role))


def test_signal_standardize_scales_the_neurons(run, plain_signal, tmp_path):
    """--standardize: each neuron is centered and scaled to unit variance before the metrics, which changes the
    effective rank and condition number of every layer."""
    r = signal_json(run, tmp_path / "s", "--standardize")
    assert r["standardize"] is True and plain_signal["standardize"] is False
    for role in ("teacher", "student"):
        assert np.all(_column(r, "effective_rank", role) > 1.1 * _column(plain_signal, "effective_rank", role))
        assert not np.allclose(_column(r, "condition_number", role), _column(plain_signal, "condition_number", role),
                               rtol=1e-2)


def test_signal_threshold_is_the_spectral_mass_of_the_condition_number(run, plain_signal, tmp_path):
    """--threshold T: sigma'_min is the singular value at which the cumulative spectral mass exceeds T; a
    smaller T (0.5 instead of 0.999) stops at a larger singular value: no condition number grows, some
    shrink at least 2x; the effective rank does not depend on it."""
    r = signal_json(run, tmp_path / "t", "--threshold", "0.5")
    assert r["condition_threshold"] == 0.5
    for role in ("teacher", "student"):
        low, high = _column(r, "condition_number", role), _column(plain_signal, "condition_number", role)
        assert np.all(low <= high * (1 + 1e-9)) and np.any(low < high / 2)
        np.testing.assert_allclose(_column(r, "effective_rank", role), _column(plain_signal, "effective_rank", role),
                                   rtol=1e-6)


def test_signal_rank_eps_is_added_to_the_normalized_spectrum(run, plain_signal, tmp_path):
    """--rank-eps EPS: EPS is added to every p_k of the effective rank's normalized spectrum, which raises the
    entropy and so the effective rank of every layer (0.01 on <= 32 singular values: clearly)."""
    r = signal_json(run, tmp_path / "e", "--rank-eps", "0.01")
    assert r["rank_eps"] == 0.01 and plain_signal["rank_eps"] == 0.0
    for role in ("teacher", "student"):
        assert np.all(_column(r, "effective_rank", role) > 1.1 * _column(plain_signal, "effective_rank", role))


def test_signal_collapse_names_the_collapse_checkpoint(run, plain_signal, tmp_path):
    """--collapse CHECKPOINT: that checkpoint is measured as the collapse point (a run without
    collapse.json has none otherwise)."""
    ckpt = run / "checkpoints" / "student_init.pt"
    r = signal_json(run, tmp_path / "k", "--collapse", str(ckpt))
    assert list(plain_signal["metrics"]) == ["teacher", "student"]
    assert list(r["metrics"]) == ["teacher", "collapse", "student"]
    assert r["checkpoints"]["collapse"]["path"] == str(ckpt)


# ----------------------------------------------------------------------------------------------- landscape

def test_landscape_max_points_stops_after_that_many_new_points(run, tmp_path):
    """--max-points N: at most N new grid points are evaluated, then the command stops (the landscape is
    partial: points.jsonl holds N points and no landscape.npz is written); without it all 4 of a 2x2 grid."""
    common = ["--quiet", "landscape", "--view", "non-local", str(run), "--grid", "2", "--n-loss", "32",
              "--no-probe", "--device", "cpu"]
    assert main([*common, "--max-points", "2", "--out", str(tmp_path / "part")]) == 0
    assert len((tmp_path / "part" / "points.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "part" / "landscape.npz").exists()
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    assert len((tmp_path / "full" / "points.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "full" / "landscape.npz").exists()


# ------------------------------------------------------------------------------------ supervised commands

SUPERVISED = ["--epochs", "2", "--batch-size", "64", "--lr", "0.05", "--n-train", "128", "--n-test", "50",
              "--device", "cpu"]


def test_imp_fraction_is_pruned_per_round(run, tmp_path):
    """--fraction F: each round prunes F of the remaining weights, so round 1 keeps round(N (1 - F)) of the
    N prunable weights (F = 0.5 here, where the default 0.2 would keep 80 %)."""
    out = tmp_path / "imp"
    assert main(["--quiet", "imp", str(run), "--start", "student@0", "--rounds", "1", "--fraction", "0.5",
                 *SUPERVISED, "--epochs", "1", "--milestones", "--no-augment", "--out", str(out)]) == 0
    result = json.loads((out / "imp.json").read_text())
    assert result["fraction"] == 0.5
    dense, pruned = result["series"][0]["rounds"]
    n = dense["remaining"]
    assert n > 100 and pruned["remaining"] == round(n * 0.5)
    assert pruned["sparsity"] == pytest.approx(1 - round(n * 0.5) / n)


def finetune(run, out, *flags):
    """`randteach finetune` with the tiny recipe and `flags`: (finetune.json, the trained model's state)."""
    assert main(["--quiet", "finetune", str(run), *SUPERVISED, "--out", str(out), *flags]) == 0
    return json.loads((out / "finetune.json").read_text()), load_checkpoint(out / "model.pt")["model"]


@pytest.fixture(scope="module")
def default_finetune(run, tmp_path_factory):
    """finetune with the recipe's augmentation (flip + crop with padding 4) and no milestones."""
    return finetune(run, tmp_path_factory.mktemp("finetune") / "default", "--milestones")


def test_recipe_settings_that_do_less_than_they_seem_are_noted(run, tmp_path, capsys):
    # each was accepted silently: on digits the default 4-pixel crop padding of 8-pixel images left the probe
    # at chance; the default milestones 80 and 120 never come in 2 epochs; --n-test 5000 tested on 360
    finetune(run, tmp_path / "a", "--n-test", "5000")
    err = capsys.readouterr().err
    assert "note: --milestones 80 120 lie at or past the last epoch (2)" in err
    assert "note: --n-test 5000: digits has 360 images in that split; all of them are used" in err
    assert "note: --pad 4: random crops shift these 8-pixel images by up to 4 pixels" in err and "--pad 1 " in err
    finetune(run, tmp_path / "b", "--milestones", "1", "--pad", "1")
    assert "note:" not in capsys.readouterr().err


def test_a_finetune_is_read_again_not_trained_and_not_replaced_by_other_settings(run, tmp_path, capsys,
                                                                                 monkeypatch):
    """A second finetune into the same folder replaced the first without a word: under the same settings it is
    read back (nothing trains), under others it is refused and the folder left as it was."""
    import randteach.train.supervised as supervised
    summary, _ = finetune(run, tmp_path / "ft", "--milestones", "--no-augment")
    files = {p.name: p.read_bytes() for p in (tmp_path / "ft").iterdir()}
    real_train = supervised.train_supervised
    monkeypatch.setattr(supervised, "train_supervised", lambda *a, **k: pytest.fail("trained again"))
    capsys.readouterr()
    assert finetune(run, tmp_path / "ft", "--milestones", "--no-augment")[0] == summary
    out = capsys.readouterr().out
    assert f"test accuracy {100 * summary['test_accuracy']:.2f}%" in out and "trained before with these settings" in out
    assert main(["--quiet", "finetune", str(run), *SUPERVISED, "--out", str(tmp_path / "ft"), "--milestones",
                 "--no-augment", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "holds a finetune made with other settings (recipe.lr 0.05 there, 0.1 now)" in err, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "ft").iterdir()} == files
    monkeypatch.chdir(run.parent)  # the same run named from another folder: the same finetune
    assert finetune(run.name, tmp_path / "ft", "--milestones", "--no-augment")[0] == summary
    # a start checkpoint given as a file is that file's bytes: rewritten, it is another start
    start = tmp_path / "start.pt"
    start.write_bytes((run / "checkpoints" / "student.pt").read_bytes())
    monkeypatch.setattr(supervised, "train_supervised", real_train)
    finetune(run, tmp_path / "from-file", "--milestones", "--no-augment", "--start", str(start))
    start.write_bytes((run / "checkpoints" / "teacher.pt").read_bytes())
    assert main(["--quiet", "finetune", str(run), *SUPERVISED, "--out", str(tmp_path / "from-file"),
                 "--milestones", "--no-augment", "--start", str(start)]) == 2
    assert "start_sha256" in capsys.readouterr().err


def _same(a, b):
    return all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_augment_changes_what_the_model_trains_on(run, default_finetune, tmp_path):
    """--augment (default on) / --no-augment: with augmentation the training batches are flipped and
    cropped, so the trained weights differ from those trained on the plain images."""
    summary, augmented = default_finetune
    plain_summary, plain = finetune(run, tmp_path / "plain", "--milestones", "--no-augment")
    assert summary["recipe"]["augment"] is True and plain_summary["recipe"]["augment"] is False
    assert not _same(augmented, plain)
    again = finetune(run, tmp_path / "again", "--milestones")[1]
    assert _same(augmented, again)  # the augmentation is seeded: the difference is not run-to-run noise


def test_pad_is_the_padding_of_the_random_crop(run, default_finetune, tmp_path):
    """--pad P: the random crop's window moves within the image zero-padded by P pixels; P = 0 (flips only)
    trains other weights than the default 4."""
    summary, pad4 = default_finetune
    pad0_summary, pad0 = finetune(run, tmp_path / "pad0", "--milestones", "--pad", "0")
    assert summary["recipe"]["pad"] == 4 and pad0_summary["recipe"]["pad"] == 0
    assert not _same(pad4, pad0)


def test_gamma_multiplies_the_learning_rate_at_each_milestone(run, default_finetune, tmp_path):
    """--gamma G: the learning rate is multiplied by G at each milestone; with G = 1 a milestone changes
    nothing (the weights of a run without milestones), with the default 0.1 it does."""
    _, none = default_finetune
    _, kept = finetune(run, tmp_path / "g1", "--milestones", "1", "--gamma", "1")
    _, cut = finetune(run, tmp_path / "g01", "--milestones", "1")
    assert _same(kept, none)
    assert not _same(cut, none)


# ------------------------------------------------------------------------------------- experiment, export

def test_experiment_seeds_sets_the_number_of_seeds(tmp_path, capsys):
    """--seeds N: every arm runs seeds 0..N-1 instead of the recipe's (tiny probes: 2)."""
    assert main(["experiment", "probes", "--scale", "tiny", "--out", str(tmp_path), "--dry-run"]) == 0
    default = capsys.readouterr().out
    assert main(["experiment", "probes", "--scale", "tiny", "--out", str(tmp_path), "--dry-run", "--seeds", "3"]) == 0
    listing = capsys.readouterr().out
    assert "train.seed=2" not in default
    assert "3 runs" in listing and all(f"train.seed={s}" in listing for s in (0, 1, 2))


def test_export_which_chooses_the_network(run, tmp_path):
    """--which teacher: the teacher's encoder is written (teacher-encoder.pt and .json), not the student's."""
    assert main(["--quiet", "export", str(run), "--which", "teacher", "--format", "pt", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "student-encoder.pt").exists()
    meta = json.loads((tmp_path / "teacher-encoder.json").read_text())
    assert meta["weights"] == "teacher-encoder.pt"
    saved = torch.load(tmp_path / "teacher-encoder.pt", weights_only=True)
    teacher, student = encoder_state(run, "teacher"), encoder_state(run, "student")
    assert saved.keys() == teacher.keys() and all(torch.equal(saved[k], teacher[k]) for k in saved)
    assert not all(torch.equal(saved[k], student[k]) for k in saved)


# ------------------------------------------------------------------------------------------------- report

def _fake_run(root, alpha, seed, linear):
    """A finished run directory as distill leaves it, with a chosen final student probe."""
    cfg = build_config("cpu", None, {"name": "fake", "init.alpha": alpha, "train.seed": seed})
    cfg.out = str(root / f"fake-{cfg.digest()}")
    rd = RunDir(cfg.run_dir()).create()
    rd.config_path.write_text(cfg.to_yaml())
    probes = {role: {"linear": linear, "knn": linear} for role in ("teacher", "student", "input")}
    rd.log({"event": "probe", "step": 10, "epoch": 1, **probes})
    rd.write_summary({"status": "completed", "steps": 10, "probe": probes, "final_loss": 1.0, "wall_time_s": 1.0,
                      "config_digest": cfg.digest()})


def test_report_group_by_names_the_grouping_keys(tmp_path):
    """--group-by KEYS: the table has one row per value of KEYS (train.seed here: 2 rows of 2 alphas each)
    instead of one per value of the swept keys (init.alpha)."""
    root = tmp_path / "sweep"
    for alpha in (1e-10, 1.0):
        for seed in (0, 1):
            _fake_run(root, alpha, seed, 0.5 + 0.1 * seed + 0.01 * (alpha == 1.0))
    assert main(["--quiet", "report", str(root), "--out", str(tmp_path / "swept")]) == 0
    assert main(["--quiet", "report", str(root), "--group-by", "train.seed", "--out", str(tmp_path / "seed")]) == 0
    with open(tmp_path / "swept" / "report.csv") as f:
        swept = list(csv.DictReader(f))
    with open(tmp_path / "seed" / "report.csv") as f:
        by_seed = list(csv.DictReader(f))
    assert [(r["init.alpha"], r["n"]) for r in swept] == [("1e-10", "2"), ("1.0", "2")]
    assert [(r["train.seed"], r["n"]) for r in by_seed] == [("0", "2"), ("1", "2")]
    assert "init.alpha" not in by_seed[0]
    assert float(by_seed[1]["student.linear_mean"]) == pytest.approx(0.605)
