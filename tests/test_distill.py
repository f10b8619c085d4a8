import json
import math

import numpy as np
import pytest
import torch

from randteach.runs.checkpoint import load_checkpoint, load_state_dict
from randteach.runs.rundir import RunDir
from randteach.train.loop import distill

from tiny import tiny_config


def test_end_to_end_distill_and_probe(tmp_path):
    cfg = tiny_config(tmp_path)
    result = distill(cfg, progress=False)
    s = result.summary
    assert s["status"] == "completed" and s["steps"] == 2 * math.ceil(1437 / 64)
    for role in ("teacher", "student", "input"):
        for kind in ("linear", "knn"):
            assert 0.1 < s["probe"][role][kind] <= 1.0
    run = RunDir(result.path)
    steps = [r for r in run.records() if "loss" in r]
    assert len(steps) == s["steps"]
    assert {"loss", "grad_norm", "dist_teacher", "dist_init", "lr"} <= set(steps[0])
    assert [p["epoch"] for p in run.probes()] == [0, 1, 2]
    for name in ("teacher", "student_init", "student", "last"):
        assert load_checkpoint(run.checkpoints / f"{name}.pt")  # weights_only loads
    teacher = load_checkpoint(run.checkpoints / "teacher.pt")["model"]
    student = load_checkpoint(run.checkpoints / "student.pt")["model"]
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    assert (result.path / "config.yaml").exists()


def test_probe_schedule_is_the_ends_every_probe_every_and_probe_at(tmp_path):
    from randteach.train.state import probe_epochs
    cfg = tiny_config(tmp_path, train__probe_every=0.75, train__probe_at="[0.5, 1.5, 9]")
    assert probe_epochs(cfg, 2) == [0, 0.5, 0.75, 1.5, 2]  # 9 lies past the end of the run
    cfg = tiny_config(tmp_path, train__epochs=1, train__probe_every=0, train__probe_at="[0.5]",
                      probe__which="[student]", probe__linear="none")
    assert [p["epoch"] for p in RunDir(distill(cfg, progress=False).path).probes()] == [0, 0.5, 1]


def test_completed_run_is_not_redone(tmp_path):
    cfg = tiny_config(tmp_path, train__epochs=0.5, train__probe_every=0, probe__which="[]")
    first = distill(cfg, progress=False)
    mtime = (first.path / "summary.json").stat().st_mtime_ns
    again = distill(cfg, progress=False)
    assert again.summary == first.summary
    assert (first.path / "summary.json").stat().st_mtime_ns == mtime


def test_divergence_is_a_result(tmp_path):
    cfg = tiny_config(tmp_path, optim__name="sgd", optim__lr=1e12, loss__name="mse", train__epochs=1,
                      train__probe_every=0, probe__which="[]", init__mode="independent")
    s = distill(cfg, progress=False).summary
    assert s["status"] == "diverged"
    assert 1 <= s["diverged_step"] <= 23
    json.loads((cfg.run_dir() / "summary.json").read_text())  # valid JSON despite non-finite values


def _escape_losses(tmp_path, precision, after):
    # The float64 start (precision.py) lets the student leave by the formula; bf16 waits for its end
    # (tests/test_float64_start.py). Pinned to the CPU to keep the suite's device fixed.
    cfg = tiny_config(tmp_path, train__device="cpu", model__encoder="mlp", model__width=64, head__kind="linear", head__out_dim=32,
                      init__mode="neighborhood", init__epsilon=1e-10, loss__name="nmse", optim__name="sgd",
                      optim__lr=1e4, train__max_steps=8, train__precision=precision,
                      train__bf16_after_distance=after, probe__which="[]", train__probe_every=0,
                      out=str(tmp_path / f"{precision}-{after}"))
    distill(cfg, progress=False)
    return [r["loss"] for r in RunDir(cfg.run_dir()).records() if "loss" in r]


def test_escape_under_fp32_and_under_bf16_fast_path(tmp_path):
    fp32 = _escape_losses(tmp_path, "fp32", 1e-3)
    assert fp32[0] < 1e-10 and max(fp32) > 1e-3      # starts at the teacher, leaves it
    assert fp32[0] > 0                                # the first loss is the residue's, not a rounded-away 0
    bf16 = _escape_losses(tmp_path, "bf16", 1e-3)
    assert max(bf16) > 1e-3                           # the bf16 path keeps the escape (fp32 until it left)


def test_ema_and_previous_epoch_teachers_move(tmp_path):
    for mode in ("ema", "previous-epoch"):
        cfg = tiny_config(tmp_path, teacher__mode=mode, teacher__ema_momentum=0.5, init__mode="independent",
                          train__epochs=2, train__probe_every=0, probe__which="[]", out=str(tmp_path / mode))
        run = distill(cfg, progress=False)
        t0 = load_checkpoint(run.path / "checkpoints" / "teacher.pt")["model"]
        t1 = load_checkpoint(run.path / "checkpoints" / "last.pt")["teacher"]
        assert any(not torch.equal(t0[k], t1[k]) for k in t0), mode
        # export, embed, probe and load_encoder read the run's teacher: the one its last probe measured
        final = load_state_dict(run.path, "teacher")
        assert all(torch.equal(final[k], t1[k]) for k in t1), mode
        assert load_checkpoint(run.path / "checkpoints" / "teacher_final.pt")["step"] == run.summary["steps"]


def test_the_progress_bar_says_when_it_is_probing(tmp_path, capsys):
    # a probe of the full splits can take longer than the steps around it: the bar said nothing meanwhile
    distill(tiny_config(tmp_path, train__max_steps=2, probe__n_train=300, probe__n_test=100), progress=True)
    err = capsys.readouterr().err
    assert "probing teacher, student, input at epoch 0 (300 train / 100 test images)" in err


def test_a_frozen_teacher_in_train_mode_stays_the_teacher_it_was(tmp_path):
    # teacher.train_mode: its batch norms normalize by batch statistics; their running averages, which its
    # probes (eval mode) use, stay as drawn: the teacher probed at every step is teacher.pt
    cfg = tiny_config(tmp_path, model__norm="batch", teacher__train_mode="true", train__max_steps=3,
                      train__probe_every=0, probe__which="[]")
    run = distill(cfg, progress=False)
    t0 = load_checkpoint(run.path / "checkpoints" / "teacher.pt")["model"]
    t1 = load_checkpoint(run.path / "checkpoints" / "last.pt")["teacher"]
    assert any(k.endswith("running_mean") for k in t0) and all(torch.equal(t0[k], t1[k]) for k in t0)


def test_teacher_cache_matches_the_teacher_and_is_reused(tmp_path, capsys):
    base = dict(train__max_steps=3, train__probe_every=0, probe__which="[]", data__root=str(tmp_path / "root"))
    plain = distill(tiny_config(tmp_path, out=str(tmp_path / "plain"), train__teacher_cache=False, **base),
                    progress=False)
    cfg = tiny_config(tmp_path, out=str(tmp_path / "cached"), train__teacher_cache=True, **base)
    cached = distill(cfg, progress=True)
    assert "computed and saved" in capsys.readouterr().out
    losses = lambda r: [x["loss"] for x in RunDir(r.path).records() if "loss" in x]
    for a, b in zip(losses(plain), losses(cached)):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-7)
    again = distill(tiny_config(tmp_path, out=str(tmp_path / "again"), train__teacher_cache=True, **base), progress=True)
    assert "loaded" in capsys.readouterr().out
    assert losses(again) == losses(cached)


def test_teacher_cache_refuses_a_moving_teacher(tmp_path):
    from randteach.errors import UserError
    with pytest.raises(UserError, match="teacher_cache"):
        distill(tiny_config(tmp_path, train__teacher_cache=True, teacher__mode="ema"), progress=False)


def test_teacher_cache_with_batch_norm(tmp_path):
    cfg = tiny_config(tmp_path, model__norm="batch", train__teacher_cache=True, train__max_steps=2,
                      train__probe_every=0, probe__which="[]", data__root=str(tmp_path / "root"))
    assert distill(cfg, progress=False).summary["status"] == "completed"


@pytest.mark.parametrize("capability, bf16", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_auto_precision_on_a_gpu_is_bf16_from_ampere_on(monkeypatch, capability, bf16):
    # a V100 or T4 reports bf16 "supported" (emulated, slow); no GPU here: its capability is stood in for
    import randteach.precision as precision
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert precision.uses_bf16("auto", torch.device("cuda")) == bf16


@pytest.mark.parametrize("vendor, flags, fast", [
    ("GenuineIntel", "fpu avx512f avx512_bf16 amx_bf16 amx_tile", True),
    ("GenuineIntel", "fpu avx512f avx512_bf16", False),       # AMX hidden: bf16 measured at 0.52x fp32
    ("AuthenticAMD", "fpu avx512f avx512_bf16", True),        # measured at 2.3-4.1x fp32
    ("AuthenticAMD", "fpu avx2", False)])
def test_a_cpu_is_fast_in_bf16_with_amx_or_an_amd_avx512_bf16(vendor, flags, fast):
    import randteach.precision as precision
    cpuinfo = f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
    assert precision.fast_bf16(cpuinfo) == fast


@pytest.mark.parametrize("fast", [False, True])
def test_auto_precision_is_bf16_only_where_it_is_fast(tmp_path, monkeypatch, fast):
    import randteach.precision as precision
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    cpu = torch.device("cpu")
    assert precision.uses_bf16("bf16", cpu) and not precision.uses_bf16("fp32", cpu)
    assert precision.uses_bf16("auto", cpu) == fast
    cfg = tiny_config(tmp_path, train__device="cpu", train__precision="auto", init__mode="independent", train__max_steps=2,
                      train__probe_every=0, probe__which="[]")
    result = distill(cfg, progress=False)
    assert result.summary["precision"] == ("bf16" if fast else "fp32")
    assert [r["bf16"] for r in RunDir(result.path).records() if "loss" in r] == [fast, fast]


def test_teacher_cache_is_keyed_by_the_head_switches(tmp_path):
    # fn1 changes what bottleneck() returns for the same weights and inputs: one cache file per setting,
    # and each run's targets are its own head's.
    root = tmp_path / "root"
    losses = {}
    for fn1 in (True, False):
        for cache in (True, False):
            cfg = tiny_config(tmp_path, out=str(tmp_path / f"fn1{fn1}-cache{cache}"), head__fn1=fn1,
                              train__teacher_cache=cache, train__max_steps=2, train__probe_every=0,
                              probe__which="[]", init__mode="independent", data__root=str(root))
            run = distill(cfg, progress=False)
            losses[fn1, cache] = [r["loss"] for r in RunDir(run.path).records() if "loss" in r]
    assert len(list((root / "teacher-targets").glob("*.pt"))) == 2
    for fn1 in (True, False):
        assert losses[fn1, True] == pytest.approx(losses[fn1, False], rel=1e-4)
    assert losses[True, True] != pytest.approx(losses[False, True], rel=1e-4)


def test_runs_that_share_a_teacher_compute_its_cached_targets_once(tmp_path):
    # the runs of a sweep (threads side by side, or worker processes) that share a teacher: a run that finds the
    # targets being computed waits for them and reads the file, instead of computing them again
    import threading
    from randteach.files import exclusive
    from randteach.models import build_model
    from randteach.train import teacher_cache
    cfg = tiny_config(tmp_path)
    teacher, inputs, folder = build_model(cfg, 1, 8, seed=0), torch.rand(100, 1, 8, 8), tmp_path / "targets"
    key = teacher_cache.cache_key(teacher, inputs, None, 50, teacher_cache.target_settings(cfg, torch.device("cpu"), False))
    origins = []
    with exclusive(folder / f"{key}.pt"):  # a run computing them holds this
        waiting = threading.Thread(target=lambda: origins.append(teacher_cache.load_or_compute(
            cfg, teacher, inputs, None, 50, torch.device("cpu"), folder)[1]))
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and not origins  # it waits for the run computing them
        first = teacher_cache.compute_targets(teacher, inputs, None, 50, torch.device("cpu"))
        teacher_cache.save_checkpoint({"key": key, "targets": first}, folder / f"{key}.pt")
    waiting.join(timeout=60)
    assert origins == [f"loaded {folder / key}.pt"]


def test_a_config_changed_after_it_was_built_is_checked_at_run_start(tmp_path):
    # Config.validate refuses a moving teacher with the teacher cache; a Config edited from Python afterwards is
    # refused when its run starts (it would train on the cached outputs of a teacher that moves).
    from randteach.errors import UserError
    cfg = tiny_config(tmp_path, train__max_steps=2, probe__which="[]")
    cfg.teacher.mode, cfg.train.teacher_cache = "ema", True
    with pytest.raises(UserError, match="teacher.mode=ema changes the teacher during training, so its outputs cannot"):
        distill(cfg, progress=False)
    cfg.teacher.mode, cfg.data.augment = "frozen", "flip-crop"  # cached targets of images the student never sees
    with pytest.raises(UserError, match="data.augment=flip-crop changes the teacher's inputs every step"):
        distill(cfg, progress=False)


def write_stl10(root, n_train=3, n_unlabeled=4):
    """STL-10's binary files (stl10_binary/), small: train and test with labels, unlabeled without."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", 2), ("unlabeled", n_unlabeled)):
        rng.integers(0, 256, n * 3 * 96 * 96, dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        if split != "unlabeled":
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")


@pytest.mark.parametrize("split, images", [("train", 3), ("unlabeled", 4), ("train+unlabeled", 7)])
def test_data_split_chooses_the_images_distilled_on(tmp_path, split, images):
    write_stl10(tmp_path / "data")
    cfg = tiny_config(tmp_path, data__name="stl10", data__root=tmp_path / "data", data__split=split,
                      train__batch_size=1, train__epochs=1, probe__which="[]")
    assert distill(cfg, progress=False).summary["steps"] == images  # one image a step, one epoch


def test_joined_splits_are_one_copy_for_runs_side_by_side(tmp_path):
    from randteach.data.registry import load_distilled, shared_loads
    write_stl10(tmp_path / "data")
    data = tiny_config(tmp_path, data__name="stl10", data__root=tmp_path / "data", data__split="train+unlabeled").data
    with shared_loads():  # as a stack's runs open: each takes the images the first one read and joined
        assert load_distilled(data) is load_distilled(data)
    assert len(load_distilled(data)) == 7
