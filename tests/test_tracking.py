"""Tracking sinks for real: TensorBoard event files read back with tensorboard's reader, W&B offline run files."""
import time

import pytest

from randteach.config import build_config
from randteach.runs.rundir import RunDir
from randteach.runs.tracking import hyperparameters, scalars
from randteach.train.loop import distill

from tiny import tiny_config


def test_records_become_scalars():
    rec = {"event": "probe", "step": 7, "epoch": 1.0, "teacher": {"linear": 0.5, "knn": "nan"}, "note": "x"}
    got = scalars(rec, "probe/")
    assert got["probe/epoch"] == 1.0 and got["probe/teacher/linear"] == 0.5
    assert got["probe/teacher/knn"] != got["probe/teacher/knn"]  # nan
    assert "probe/step" not in got and "probe/note" not in got


def test_logging_is_off_by_default_and_outside_the_run_address(tmp_path):
    cfg = build_config("cpu")
    assert not cfg.log.tensorboard and cfg.log.wandb is None
    assert cfg.digest() == build_config("cpu", None, {"log.tensorboard": "true"}).digest()
    assert hyperparameters(cfg)["optim.lr"] == cfg.optim.lr
    assert RunDir(tmp_path).sinks == []


def test_tensorboard_mirrors_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="the track extra (tensorboard) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny_config(tmp_path, train__epochs=1, train__device="cpu", train__precision="fp32",
                      log__tensorboard="true")
    run = distill(cfg, progress=False)
    records = list(RunDir(run.path).records())
    acc = EventAccumulator(str(run.path / "tensorboard"))
    acc.Reload()
    steps = [r for r in records if r.get("event") == "step"]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in steps]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    probes = [r for r in records if r.get("event") == "probe"]
    linear = acc.Scalars("probe/student/linear")
    assert [e.value for e in linear] == pytest.approx([r["student"]["linear"] for r in probes], rel=1e-6)
    assert "summary/probe/student/linear" in acc.Tags()["scalars"]
    assert "config" in " ".join(acc.Tags()["tensors"])  # the config as text


def test_wandb_offline_writes_its_run_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the track extra (wandb) is not installed")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("CACHE", "CONFIG", "DATA"):  # W&B's own logs and caches, which go to the home folder
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / f"wandb-{name.lower()}"))
    cfg = tiny_config(tmp_path, train__epochs=1, train__device="cpu", train__precision="fp32",
                      probe__which="[]", log__wandb="randteach-test", log__wandb_mode="offline")
    run = distill(cfg, progress=False)
    runs = list((run.path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (log,) = runs[0].glob("run-*.wandb")  # W&B's transaction log, what `wandb sync` uploads
    keys = (b"randteach-test", b"optim.lr", b"train/loss", b"train/lr")  # project, config, history
    deadline = time.monotonic() + 30  # W&B's own service process writes the log; seen to lag finish()
    while not all(k in log.read_bytes() for k in keys) and time.monotonic() < deadline:
        time.sleep(0.2)
    content = log.read_bytes()
    for key in keys:
        assert key in content, key


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    import sys
    from randteach.errors import UserError
    from randteach.runs.tracking import sinks_for
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = build_config("cpu", None, {"log.wandb": "p"})
    with pytest.raises(UserError, match="pip install wandb"):
        sinks_for(cfg, tmp_path)


def test_wandb_without_a_login_is_a_clear_error(tmp_path):
    """No API key (a fresh machine, no tty): W&B's UsageError becomes one message with the two ways out."""
    import os
    import subprocess
    import sys
    pytest.importorskip("wandb", reason="the track extra (wandb) is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "randteach.cli", "--quiet", "distill", "--preset", "cpu",
                        "--train.max_steps", "1", "--data.n_samples", "256", "--probe.which", "[]",
                        "--out", str(tmp_path / "run"), "--log.wandb", "p"],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "W&B could not start a run in project 'p'" in r.stderr and "--log.wandb_mode offline" in r.stderr
