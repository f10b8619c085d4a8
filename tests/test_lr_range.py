import json
import math

import pytest

from randteach.analysis.lr_range import RANGE_KEYS, find_divergences, lr_range, smooth, suggest_lr
from randteach.cli import main
from randteach.errors import UserError
from randteach.runs.rundir import RunDir

from tiny import TINY, tiny_config

# The 1e-10 residue is held in float64 until the student has left (the float64 start, precision.py), so the
# escape follows the formula on any CPU. Pinned to the CPU to keep the suite's device fixed (CUDA: tests/test_gpu.py).
RANGE = dict(head__kind="linear", head__out_dim=64, optim__name="sgd", loss__name="mse", init__mode="neighborhood",
             init__epsilon=1e-10, train__precision="fp32", data__n_samples=256, train__device="cpu")


def test_step_sizes_are_the_exponential_sequence(tmp_path):
    cfg = tiny_config(tmp_path, **RANGE)
    r = lr_range(cfg, lr_start=1e-4, lr_end=1e-1, steps=10, out=tmp_path / "lr", progress=False)
    expected = [1e-4 * 1000 ** (k / 9) for k in range(10)]
    assert r["steps"] == 10 and r["teacher_student_status"] == "completed"
    for side in ("teacher_student", "supervised"):
        s = r["sides"][side]
        assert s["step"] == list(range(1, 11))
        assert s["lr"] == pytest.approx(expected, rel=1e-12)
        assert s["nonfinite"] is None and all(math.isfinite(v) for v in s["loss"])
        assert len(s["smoothed"]) == 10
    assert r["sides"]["supervised"]["loss"][0] == pytest.approx(math.log(10), rel=0.5)  # CE of 10 classes at init
    assert r["sides"]["teacher_student"]["loss"][0] < 1e-10                             # student on its teacher
    assert (tmp_path / "lr" / "lr_range.png").stat().st_size > 0
    assert json.loads((tmp_path / "lr" / "lr_range.json").read_text())["steps"] == 10
    # --epochs: 2 epochs of 256 images in batches of 64 are 8 steps
    r = lr_range(cfg, lr_start=1e-4, lr_end=1e-1, epochs=2, out=tmp_path / "lr-epochs", supervised=False,
                 progress=False)
    assert r["steps"] == 8 and r["sides"]["teacher_student"]["lr"][-1] == pytest.approx(1e-1)
    # other analysis options over the same run: the run is found again, not refused as another config's
    again = lr_range(cfg, lr_start=1e-4, lr_end=1e-1, epochs=2, out=tmp_path / "lr-epochs", supervised=False,
                     factor=3.0, progress=False)
    assert again["teacher_student_run"] == r["teacher_student_run"] and again["key"] != r["key"]
    with pytest.raises(UserError, match="holds a range test of other settings.*delete that folder"):  # not distill's
        lr_range(cfg, lr_start=1e-4, lr_end=1e-1, epochs=3, out=tmp_path / "lr-epochs", progress=False)


def test_diverging_range_test_records_its_divergence(tmp_path, capsys):
    overrides = ([f"--{k}={v}" for k, v in TINY.items() if k not in RANGE_KEYS]  # (the test sets those)
                 + [f"--{k.replace('__', '.')}={v}" for k, v in RANGE.items()])
    out = tmp_path / "lr"
    rc = main(["--quiet", "lr-range", "--preset", "cpu", "--lr-start", "1e-2", "--lr-end", "1e12", "--steps", "30",
               "--out", str(out), *overrides])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "diverges (non-finite)" in printed
    r = json.loads((out / "lr_range.json").read_text())  # valid JSON despite the NaN losses
    assert r["teacher_student_status"] == "diverged"
    summary = RunDir(r["teacher_student_run"]).summary()
    ts = r["sides"]["teacher_student"]
    assert ts["nonfinite"]["step"] == summary["diverged_step"] < 30
    lrs = [1e-2 * 1e14 ** (k / 29) for k in range(30)]
    assert ts["nonfinite"]["lr"] == pytest.approx(lrs[ts["nonfinite"]["step"] - 1])
    assert ts["rise"]["step"] <= ts["nonfinite"]["step"]
    sup = r["sides"]["supervised"]  # cross-entropy's gradient is bounded: it may blow up without overflowing
    assert sup["rise"] is not None
    assert sup["step"][-1] == (sup["nonfinite"]["step"] if sup["nonfinite"] else 30)
    assert (out / "lr_range.png").exists()
    for side in r["sides"].values():  # every suggestion printed, and below the side's blow-up (else its rise)
        if side["suggested"]:
            assert f"suggested lr {side['suggested']['lr']:.3g}" in printed
            assert side["suggested"]["lr"] < (side["nonfinite"] or side["rise"])["lr"]
    # the student starts on its teacher (the float64 residue): no descent there, a tenth of the blow-up
    assert "never falls" in ts["suggested"]["rule"]
    assert ts["suggested"] is not None


@pytest.mark.parametrize("kw, message", [({"factor": 0.0}, "factor > 1"), ({"factor": -3.0}, "factor > 1"),
                                         ({"lr_start": 10.0, "lr_end": 1.0}, "lr_end > lr_start")])
def test_range_test_settings_that_cannot_work_are_refused(tmp_path, kw, message):
    with pytest.raises(UserError, match=message):
        lr_range(tiny_config(tmp_path, **RANGE), **{"lr_start": 1e-4, "lr_end": 1e-1, **kw}, steps=10,
                 out=tmp_path / "lr", progress=False)
    assert not (tmp_path / "lr").exists()


def test_smoothing_and_divergence_criterion():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected
    assert smooth([1.0, float("nan"), 3.0], 0.5) == [1.0]
    steps, lrs = list(range(1, 8)), [10.0 ** k for k in range(7)]
    d = find_divergences(steps, lrs, [1.0, 0.5, 0.4, 0.5, 3.0, 50.0, float("inf")], beta=0.0, factor=4.0)
    assert d["rise"]["step"] == 5 and d["nonfinite"] == {"step": 7, "lr": 1e6}
    # fp32 residue of a student on its teacher (1e-18 flickering to 1e-16) is not a rise; leaving it is
    d = find_divergences(steps, lrs, [0.0, 1e-18, 1e-16, 0.0, 1e-12, 1e-3, 1.0], beta=0.0)
    assert d["rise"]["step"] == 6 and d["nonfinite"] is None


def _synthetic(loss_of_log_lr):
    """A curve on lr = 10^-6 .. 10^3 in steps of 0.05 decades (1-based steps, as the runs log them)."""
    logs = [-6 + 0.05 * k for k in range(181)]
    lrs = [10.0 ** x for x in logs]
    return list(range(1, len(lrs) + 1)), lrs, [loss_of_log_lr(x) for x in logs]


def test_suggestion_is_the_steepest_descent_of_a_known_curve():
    # falls fastest at lr = 1e-2 (tanh's inflection), blows up beyond lr = 10
    steps, lrs, losses = _synthetic(lambda x: 2 - math.tanh(2 * (x + 2)) if x <= 1 else math.inf)
    div = find_divergences(steps, lrs, losses, beta=0.0)
    got = suggest_lr(lrs, losses, div, beta=0.0)
    assert got["lr"] == pytest.approx(1e-2, rel=1e-9) and "steepest" in got["rule"]
    lagged = suggest_lr(lrs, losses, find_divergences(steps, lrs, losses), beta=0.9)["lr"]
    assert 1e-2 <= lagged <= 10 ** -1.4  # the EMA's lag of ~9 steps = 0.45 decades


def test_a_curve_that_never_falls_gets_a_tenth_of_its_blow_up():
    # a student on its teacher: fp32 residue until lr = 1, then the loss grows, non-finite from lr = 100
    steps, lrs, losses = _synthetic(lambda x: 1e-15 if x < 0 else (10.0 ** (3 * x) * 1e-6 if x < 2 else math.nan))
    div = find_divergences(steps, lrs, losses, beta=0.0)
    got = suggest_lr(lrs, losses, div, beta=0.0)
    assert div["nonfinite"]["lr"] == pytest.approx(100.0)
    assert got["lr"] == pytest.approx(10.0) and "at which it turns non-finite" in got["rule"]  # not the rise
    # the float64 start: the residue loss dips 3x at the floor before the escape; the dip is no descent
    dipping = [1e-22 / (1 + 2 * i / len(lrs)) if l == 1e-15 else l for i, l in enumerate(losses)]
    got = suggest_lr(lrs, dipping, find_divergences(steps, lrs, dipping, beta=0.0), beta=0.0)
    assert got["lr"] == pytest.approx(10.0) and "never falls" in got["rule"]
    flat = [1.0] * len(lrs)  # neither falls nor diverges: no suggestion
    assert suggest_lr(lrs, flat, find_divergences(steps, lrs, flat)) is None


@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_range_test_stopped_by_ctrl_c_writes_no_result(tmp_path, signame, code):
    """SIGINT (SIGTERM) while the teacher-student run trains: the run checkpoints and ends interrupted, the
    command exits 130 (143: it said 130, as for Ctrl-C) and writes no lr_range.json (a cut-off curve would be
    returned as the finished test by the next call)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "lr"
    args = [a for k, v in {**TINY, "data.n_samples": "256", "train.device": "cpu"}.items()
            if k.startswith(("data.", "model.", "head.", "train.device")) for a in (f"--{k}", v)]
    proc = subprocess.Popen([sys.executable, "-m", "randteach.cli", "--quiet", "lr-range", *args, "--steps", "200000",
                             "--no-supervised", "--lr-end", "1", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "teacher-student" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, getattr(signal, signame))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code and "interrupted" in err, err[-2000:]
    assert not (out / "lr_range.json").exists()
    assert RunDir(out / "teacher-student").summary()["status"] == "interrupted"


def test_the_keys_the_range_test_sets_are_refused_on_its_command_line(tmp_path, capsys):
    # RANGE_KEYS is the whole list: range_config changes no other key (but the output folder)...
    from randteach.analysis.lr_range import range_config
    from randteach.config import flatten
    cfg = tiny_config(tmp_path, **RANGE, train__log_every=3, train__checkpoint_every=1)
    before, after = flatten(cfg.to_dict()), flatten(range_config(cfg, 1e-4, 1e-1, 7, 4, tmp_path / "x").to_dict())
    assert {k for k in before if before[k] != after[k]} - {"out"} <= set(RANGE_KEYS)
    # ...and each of them given on the command line is refused before anything runs (it was overruled unsaid)
    for key, value in [("optim.lr", "0.1"), ("train.max-steps", "3"), ("optim.schedule", "cosine")]:
        assert main(["lr-range", f"--{key}", value, "--steps", "3", "--out", str(tmp_path / "lr")]) == 2
        err = capsys.readouterr().err
        assert f"--{key.replace('-', '_')}: lr-range sets it on its run" in err, err
    assert not (tmp_path / "lr").exists()
