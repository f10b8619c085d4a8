import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from randteach.config import (Config, ConfigError, build_config, config_from_dict, help_lines, parse_overrides,
                              preset, preset_names)
from randteach.errors import UserError
from randteach.runs.rundir import check_config_digest


def test_overrides_are_typed():
    cfg = build_config(overrides=parse_overrides(["--optim.lr", "1e-2", "--train.epochs=3", "--head.hidden_dims",
                                                   "[512, 256]", "--data.n_samples", "None", "--head.wn2", "false"]))
    assert cfg.optim.lr == 0.01 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 3.0
    assert cfg.head.hidden_dims == [512, 256]
    assert cfg.data.n_samples is None
    assert cfg.head.wn2 is False


def test_negative_number_is_a_value_not_a_flag():
    assert parse_overrides(["--optim.lr", "-1e-3"]) == {"optim.lr": "-1e-3"}


@pytest.mark.parametrize("overrides, words", [
    ({"optim.lrr": "1"}, ["optim.lrr", "lr", "weight_decay"]),
    ({"optim.name": "lamb"}, ["optim.name", "adamw", "sgd"]),
    ({"train.batch_size": "many"}, ["train.batch_size", "int"]),
    ({"init.alpha": "2"}, ["init.alpha", "[0, 1]"]),
    ({"model.encoder": "resnet9"}, ["resnet9", "resnet18", "package.module:callable"]),
    ({"optim": "1"}, ["section"]),
])
def test_bad_values_name_the_key_and_the_choices(overrides, words):
    with pytest.raises(ConfigError) as e:
        build_config(overrides=overrides)
    for w in words:
        assert w in str(e.value)


def test_precedence_preset_file_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"optim": {"lr": 0.5, "name": "sgd"}}))
    cfg = build_config("paper", f, {"optim.lr": "0.25"})
    assert cfg.model.encoder == "resnet18"           # preset
    assert cfg.optim.name == "sgd"                   # file over preset
    assert cfg.optim.lr == 0.25                      # override over file


def test_paper_preset_is_the_spec():
    cfg = build_config("paper")
    assert (cfg.model.encoder, cfg.head.kind, cfg.head.hidden_dims, cfg.head.bottleneck_dim, cfg.head.out_dim) == \
        ("resnet18", "dino", [2048, 2048], 256, 2 ** 16)
    assert (cfg.loss.name, cfg.loss.teacher_temp, cfg.loss.student_temp, cfg.loss.center) == ("kl", 1.0, 1.0, False)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip) == ("adamw", 1e-3, 0.0, None)
    assert cfg.train.batch_size == 256 and cfg.init.alpha == 1e-10 and cfg.init.mode == "locality"
    assert cfg.teacher.mode == "frozen" and cfg.teacher.train_mode is False
    assert (cfg.head.wn1, cfg.head.lin1, cfg.head.fn1, cfg.head.wn2, cfg.head.lin2, cfg.head.fn2) == \
        (False, True, True, True, True, False)


def test_every_preset_validates():
    for name in preset_names():
        cfg = build_config(name)
        # each preset's file is what the config holds: name and every section it sets
        raw = preset(name)
        assert cfg.name == raw["name"]
        for section, values in raw.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    assert getattr(getattr(cfg, section), key) == value, (name, section, key)
    with pytest.raises(ConfigError, match="valid presets"):
        preset("nope")


def test_round_trip_and_digest():
    cfg = build_config("cpu", overrides={"optim.lr": "0.002"})
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg and again.digest() == cfg.digest()
    assert build_config("cpu").digest() != cfg.digest()
    moved = config_from_dict({**cfg.to_dict(), "out": "/elsewhere"})
    assert moved.digest() == cfg.digest()  # where a run is written does not change what it is


def test_one_value_spelled_two_ways_is_one_run():
    zero = build_config("cpu", overrides={"init.alpha": "0"})
    assert zero.init.alpha != build_config("cpu").init.alpha  # 0 is not the default: it enters the digest
    for spelling in ({"init.alpha": "-0"}, {"init.alpha": "-0.0"}, {"probe.data": ""}, {"probe.data": " "}):
        assert build_config("cpu", overrides={"init.alpha": "0", **spelling}).digest() == zero.digest(), spelling
    assert build_config("cpu", overrides={"probe.data": ""}).probe.data is None


def test_help_lists_every_key():
    lines = help_lines()
    assert any(l.startswith("--optim.lr ") for l in lines)
    assert len(lines) == sum(len(v) if isinstance(v, dict) else 1 for v in Config().to_dict().values())


def test_the_key_listing_shows_what_a_preset_sets(capsys):
    # `randteach config --preset cpu --keys` listed the base defaults only (batch 256 where the demo runs 64)
    from randteach.cli import main
    assert main(["config", "--preset", "cpu", "--keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert next(l for l in lines if l.startswith("--train.batch_size ")).startswith(
        "--train.batch_size (default 256; preset cpu: 64)")
    assert next(l for l in lines if l.startswith("--optim.lr ")).startswith("--optim.lr (default 0.001)")  # unset
    assert main(["config", "--keys", "--optim.lr", "0.3"]) == 0  # options alone are values set too
    lines = capsys.readouterr().out.splitlines()
    assert next(l for l in lines if l.startswith("--optim.lr ")).startswith("--optim.lr (default 0.001; options: 0.3)")


def test_cli_config_error_is_one_line_without_traceback():
    r = subprocess.run([sys.executable, "-m", "randteach.cli", "distill", "--optim.name", "lamb"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "optim.name" in r.stderr and "adamw" in r.stderr


def test_digest_ignores_runtime_knobs_and_new_default_keys():
    base = build_config("cpu")
    assert build_config("cpu", overrides={"train.log_every": "10"}).digest() == base.digest()
    assert build_config("cpu", overrides={"train.data_on_device": "false"}).digest() == base.digest()
    assert build_config(overrides={"train.log_every": "10"}).digest() == build_config().digest()  # no empty section
    assert build_config("cpu", overrides={"train.teacher_cache": "false"}).digest() != base.digest()
    assert build_config("cpu", overrides={"init.alpha": "0.5"}).digest() != base.digest()


def test_a_changed_image_folder_is_a_new_run(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / c / "0.png")
    cfg = build_config("cpu", overrides={"data.name": "folder", "data.path": str(tmp_path / "imgs")})
    before = cfg.run_dir()
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "imgs" / "a" / "1.png")
    assert cfg.run_dir() != before and cfg.run_dir().name.startswith(f"cpu-{cfg.digest()}-")
    home = build_config("cpu", overrides={"data.name": "folder", "data.path": "~/imgs"})  # as a YAML file writes it
    monkeypatch.setenv("HOME", str(tmp_path))
    assert home.run_dir().name.split("-")[-1] == cfg.run_dir().name.split("-")[-1]  # the folder read is keyed


def test_add_flags_makes_a_flag_per_field_with_its_type_default_and_choices():
    import argparse
    from dataclasses import dataclass

    from randteach.config import add_flags, opt, options_from_args

    @dataclass
    class Options:
        n_loss: int = opt(512, "inputs")
        extent: list[float] = opt([-0.5, 1.5], "range", cli={"nargs": "+"})
        mode: str = opt("a", "mode", ("a", "b"))
        no_probe: bool = opt(False, "skip")
        augment: bool = opt(True, "flip")
        steps: int | None = opt(None, "steps", cli={"exclusive": "length"})
        epochs: float | None = opt(None, "epochs", cli={"exclusive": "length"})

    p = argparse.ArgumentParser()
    add_flags(p, Options)
    assert options_from_args(p.parse_args([]), Options) == Options()
    got = options_from_args(p.parse_args(["--n-loss", "7", "--extent", "0", "2", "--mode", "b", "--no-probe",
                                          "--no-augment", "--epochs", "0.5"]), Options)
    assert got == Options(n_loss=7, extent=[0.0, 2.0], mode="b", no_probe=True, augment=False, epochs=0.5)
    assert "(default 512)" in p.format_help() and "(default -0.5 1.5)" in p.format_help()
    for bad in (["--mode", "c"], ["--n-loss", "x"], ["--steps", "1", "--epochs", "1"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(bad)
        assert e.value.code == 2


def test_analysis_commands_keep_their_flags_and_defaults():
    from randteach.cli import build_parser
    p = build_parser()
    lr = p.parse_args(["lr-range"])
    assert (lr.lr_start, lr.lr_end, lr.steps, lr.epochs, lr.smoothing, lr.factor, lr.floor, lr.no_supervised) == \
        (1e-6, 1e6, None, None, 0.9, 4.0, 1e-8, False)
    sig = p.parse_args(["signal", "RUN", "--spatial", "avgpool", "--center", "--rank-eps", "1e-7"])
    assert (sig.run_dir, sig.spatial, sig.center, sig.rank_eps, sig.threshold, sig.no_probe) == \
        ("RUN", "avgpool", True, 1e-7, 0.999, False)
    land = p.parse_args(["landscape", "A", "B", "--view", "shared", "--grid", "5", "7"])
    assert (land.runs, land.view, land.grid, land.extent, land.projection, land.n_loss) == \
        (["A", "B"], "shared", [5, 7], None, "affine", 512)  # no extent: the projection's own (landscape.py)
    imp = p.parse_args(["imp", "RUN", "--epochs", "0.5", "--no-augment", "--milestones", "1", "2"])
    assert (imp.epochs, imp.augment, imp.milestones, imp.lr) == (0.5, False, [1.0, 2.0], 0.1)


def test_the_data_root_is_a_location_not_part_of_a_runs_address(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here, there = (build_config(overrides={"data.root": root}) for root in ("/data", "/scratch/data"))
    sha = lambda d: hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
    assert here.digest() == there.digest() == build_config().digest() == sha({"defaults_version": 2})
    # up to 2026-12-02 the root entered the digest: such a run still matches, and keeps its folder
    old = here.digest(before_2026_12=True)
    assert old == sha({"data": {"root": "/data"}, "defaults_version": 2})
    assert here.matches(old) and not there.matches(old)
    assert here.run_dir() == Path("runs") / f"run-{here.digest()}"
    (Path("runs") / f"run-{old}").mkdir(parents=True)
    assert here.run_dir() == Path("runs") / f"run-{old}" and there.run_dir() == Path("runs") / f"run-{here.digest()}"
    # a sweep's or an experiment's folder as well
    from randteach.runs.sweep import SweepSpec, expand
    legacy = tmp_path / "sweep" / f"sw-{build_config(overrides={'data.root': '/data', 'name': 'sw'}).digest(before_2026_12=True)}"
    legacy.mkdir(parents=True)
    swept = expand(SweepSpec(grid={"data.root": ["/data", "/elsewhere"]}, name="sw", out=str(tmp_path / "sweep")))
    assert [c.out for c in swept] == [str(legacy), str(tmp_path / "sweep" / f"sw-{swept[1].digest()}")]


def test_a_run_recorded_under_older_defaults_still_matches_and_a_changed_default_is_a_new_address(tmp_path):
    """loss.name's default became kl (defaults version 2). A run written under version 1 with the then-default
    ce recorded the digest of its non-default values without the loss; its config.yaml, read today, says ce
    explicitly. It must still match its record, and today's default config (kl) must not."""
    old, new = Config(), Config()
    old.loss.name = "ce"
    sha = lambda d: hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
    assert old.digest(1) == sha({}) and new.digest() == sha({"defaults_version": 2})  # computed directly
    assert old.matches(old.digest(1)) and not new.matches(old.digest(1))
    assert new.digest() != old.digest(1)  # the default config's address moved: it names a kl run now
    check_config_digest(old.digest(1), old, tmp_path)
    with pytest.raises(UserError, match="changed after the run started"):
        check_config_digest(old.digest(1), new, tmp_path)


def test_an_encoders_own_norm_named_is_the_default_run(tmp_path):
    """model.norm batch on a ResNet builds the network of model.norm default: one address, so a sweep over
    norms reuses the default run (RT App. B's norm arm at paper scale ran two such runs twice). A run made
    before, whose digest hashed 'batch' as written, still matches its config."""
    default, named, other = (build_config("paper", overrides={"model.norm": n}) for n in ("default", "batch", "group"))
    assert named.run_dir() == default.run_dir() != other.run_dir()
    assert named.digest() != named.digest(same_norm_as_default=False)  # the address it had up to 2026-12-03
    assert named.matches(named.digest(same_norm_as_default=False))
    vgg = {n: build_config("paper", overrides={"model.encoder": "vgg11", "model.norm": n}) for n in ("default", "none")}
    assert vgg["none"].run_dir() == vgg["default"].run_dir()


def test_a_config_file_may_write_dotted_keys_as_sweep_files_do(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim.lr: 0.01\ntrain:\n  max_steps: 3\noptim.name: sgd\n")
    c = build_config("cpu", f)
    assert (c.optim.lr, c.optim.name, c.train.max_steps) == (0.01, "sgd", 3)
    f.write_text("optim.nope: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'optim.nope'"):
        build_config("cpu", f)


# key: (a changed value, overrides under which nothing reads it, overrides under which it acts)
IGNORABLE = {
    "model.width": ("8", {"model.encoder": "vgg11"}, {"model.encoder": "mlp"}),
    "init.alpha": ("0.5", {"init.mode": "independent"}, {"init.mode": "locality"}),
    "init.variance_preserving": ("false", {"init.mode": "neighborhood"}, {}),
    "init.epsilon": ("1e-3", {}, {"init.mode": "neighborhood"}),
    "init.epsilon_draw": ("normal", {}, {"init.mode": "neighborhood"}),
    "init.fresh_seed": ("7", {"init.mode": "copy"}, {"init.mode": "independent"}),
    "teacher.ema_momentum": ("0.9", {}, {"teacher.mode": "ema", "train.teacher_cache": "false"}),
    "loss.teacher_temp": ("0.04", {"loss.name": "mse"}, {"loss.name": "ce"}),
    "loss.student_temp": ("0.1", {"loss.name": "nmse"}, {}),
    "loss.center_momentum": ("0.5", {}, {"loss.center": "true"}),
    "optim.momentum": ("0.9", {"optim.name": "adamw"}, {"optim.name": "sgd"}),
    "optim.betas": ("[0.8, 0.9]", {"optim.name": "sgd"}, {"optim.name": "adam"}),
    "optim.warmup_steps": ("10", {"optim.schedule": "constant"}, {"optim.schedule": "cosine"}),
    "optim.min_lr": ("1e-5", {"optim.schedule": "warmup"}, {"optim.schedule": "cosine"}),
    "optim.lr_end": ("10", {}, {"optim.schedule": "exponential"}),
    "data.noise_std": ("2", {}, {"data.inputs": "noise"}),
    "data.test_fraction": ("0.5", {}, None),  # data.name=folder needs a folder: its acting side is not built here
    "train.bf16_after_distance": ("1e-2", {"train.precision": "fp32"}, {"train.precision": "bf16"}),
    "probe.knn_temperature": ("0.1", {"probe.knn_weighting": "majority"}, {}),
    "probe.knn_weighting": ("majority", {"probe.knn_k": "0"}, {}),
    "log.wandb_mode": ("offline", {}, {"log.wandb": "proj"}),
    "init.teacher_seed": ("7", {"init.teacher_checkpoint": "runs/x"}, {}),
    "data.subset_seed": ("5", {}, {"data.n_samples": "100"}),
    "probe.l2": ("1e-3", {"probe.linear": "adamw"}, {}),
    "probe.max_iter": ("100", {"probe.linear": "none"}, {"probe.linear": "logreg"}),
    "init.checkpoint": ("runs/x", {}, {"init.mode": "checkpoint"}),
    "head.hidden_dims": ("[32]", {"head.kind": "linear"}, {}),
    "head.bottleneck_dim": ("32", {"head.kind": "none"}, {}),
    "head.wn1": ("true", {"head.kind": "linear"}, {}),
    "head.lin1": ("false", {"head.kind": "none"}, {}),
    "head.fn1": ("false", {"head.kind": "linear"}, {}),
    "head.wn2": ("false", {"head.kind": "none"}, {}),
    "head.lin2": ("false", {"head.kind": "linear"}, {}),
    "head.fn2": ("true", {"head.kind": "none"}, {}),
    "head.out_dim": ("128", {"head.kind": "none"}, {"head.kind": "linear"}),
}


def test_every_conditional_key_is_in_the_table():
    from randteach.config import _ACTS_ONLY
    assert {k for k, _, _ in _ACTS_ONLY} == set(IGNORABLE) | {"data.path"}


@pytest.mark.parametrize("key", sorted(IGNORABLE))
def test_a_setting_the_run_never_reads_is_named(key):
    value, off, on = IGNORABLE[key]
    preset = build_config("cpu")  # the values the user starts from
    lines = build_config("cpu", None, {**off, key: value}).ignored_settings(preset)
    assert len(lines) == 1 and lines[0].startswith(f"{key}=") and "has no effect" in lines[0], lines
    if on is not None:
        assert build_config("cpu", None, {**on, key: value}).ignored_settings(preset) == []


def test_a_presets_own_value_that_another_choice_leaves_unread_is_not_the_users_note(capsys):
    from randteach.cli import main
    assert main(["config", "--preset", "cpu", "--model.encoder", "resnet18", "--head.kind", "linear"]) == 0
    assert "note:" not in capsys.readouterr().err  # the preset's convnet width and DINO head sizes
    assert main(["config", "--preset", "cpu", "--model.encoder", "resnet18", "--model.width", "8"]) == 0
    assert "note: model.width=8 has no effect" in capsys.readouterr().err


def test_presets_set_nothing_they_never_read():
    for name in ("cpu", "paper", "escape"):
        assert build_config(name).ignored_settings() == [], name


def test_distill_and_sweep_print_the_note(tmp_path, capsys):
    from randteach.cli import main
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"preset": "cpu", "name": "n", "grid": {"optim.name": ["adamw", "sgd"]},
                                     "base": {"optim.momentum": 0.9}}))
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "runs"), "--dry-run"]) == 0
    assert "note: optim.momentum=0.9 has no effect: it acts only with optim.name sgd (1 of 2 runs)" in \
        capsys.readouterr().err
    assert main(["--quiet", "distill", "--preset", "cpu", "--out", str(tmp_path / "run"), "--optim.lr_end", "5",
                 "--train.max_steps", "1", "--data.name", "digits", "--probe.which", "[]"]) == 0
    assert "note: optim.lr_end=5 has no effect" in capsys.readouterr().err


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("optim: {lr: 0.1}\ntrain: {epochs: 2}\noptim: {weight_decay: 0.05}\n")
    with pytest.raises(ConfigError, match="'optim' is given twice"):
        build_config("cpu", f)


def test_each_yaml_file_is_named_by_its_kind_and_a_sweep_given_as_config_is_told(tmp_path):
    from randteach.runs.sweep import load_sweep
    with pytest.raises(ConfigError, match="sweep file .*none.yaml' does not exist"):
        load_sweep(tmp_path / "none.yaml")
    sweep = tmp_path / "s.yaml"
    sweep.write_text("base: {optim.lr: 0.1}\ngrid: {init.alpha: [0.1, 0.5]}\n")
    with pytest.raises(ConfigError, match=f"looks like a sweep file; run it with `randteach sweep {sweep}`"):
        build_config("cpu", sweep)


def test_config_files_layer_in_order_and_mappings_merge_key_by_key(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("optim: {lr: 0.5}\nmodel: {encoder_args: {patch_size: 4, drop_path: 0.1}}\n")
    b.write_text("train: {epochs: 3}\n")
    cfg = build_config("cpu", [a, b], {"model.encoder_args.depth": "6", "model.encoder_args.pretrained": "False"})
    assert (cfg.optim.lr, cfg.train.epochs) == (0.5, 3.0)
    assert cfg.model.encoder_args == {"patch_size": 4, "drop_path": 0.1, "depth": 6, "pretrained": False}


@pytest.mark.parametrize("overrides, words", [
    ({"head.hidden_dims": "[512,512"}, "is not a list; expected e.g. [512, 512] or 512,512"),
    ({"train.device": "cuda:foo"}, "is not one of auto, cpu, cuda, cuda:N"),
    ({"name": "../../x"}, "give a plain name without /"),
    ({"head.wn1": "2"}, "(true/false, yes/no, on/off, 1/0)"),
    ({"data.split": "unlabeled"}, "fashion-mnist has no split 'unlabeled' to distill on; valid: train (the"),
    ({"data.name": "stl10", "data.split": "train+test"}, "no split 'test' to distill on; valid: train, unlabeled, or train+unlabeled"),
    ({"data.name": "stl10", "data.split": "train+train"}, "write 'train' for 'train+train'"),
    ({"data.name": "stl10", "data.split": "unlabeled+train"}, "write 'train+unlabeled' for 'unlabeled+train'"),
])
def test_values_that_cannot_be_meant_are_refused_with_the_way_out(overrides, words):
    with pytest.raises(ConfigError) as e:
        build_config("cpu", None, overrides)
    assert words in str(e.value)


def test_values_keep_what_they_spell():
    cfg = build_config("cpu", None, {"probe.which": "teacher, student", "data.n_samples": "9007199254740993",
                                     "out": "~/somewhere"})
    assert cfg.probe.which == ["teacher", "student"] and cfg.data.n_samples == 9007199254740993
    with pytest.raises(ConfigError, match="not a valid int"):
        build_config("cpu", None, {"data.n_samples": 2.5})  # a YAML float is not cut to 2
    assert cfg.run_dir() == Path.home() / "somewhere"


@pytest.mark.parametrize("teacher, why", [({"teacher.mode": "ema"}, "teacher.mode=ema changes the teacher"),
                                          ({"teacher.mode": "previous-epoch"}, "teacher.mode=previous-epoch"),
                                          ({"teacher.train_mode": "true"}, "depend on the batch"),
                                          ({"data.augment": "flip-crop"}, "changes the teacher's inputs every step")])
def test_a_moving_teacher_with_the_teacher_cache_is_refused_when_the_config_is_built(teacher, why):
    # the cpu preset caches the teacher's outputs: a sweep or a dry run sees this before any run starts
    with pytest.raises(ConfigError, match=f"{why}.*add --train.teacher_cache false"):
        build_config("cpu", None, teacher)
    assert build_config("cpu", None, {**teacher, "train.teacher_cache": "false"}).train.teacher_cache is False
