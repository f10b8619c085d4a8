"""Tiny configurations shared by the tests: real data (scikit-learn digits), small models, seconds to run.

RANDTEACH_TEST_DEVICE=cuda runs every tiny configuration on the GPU (the suite on a GPU machine); CI has
none, so the default is the CPU."""
import os

from randteach.config import build_config

DEVICE = os.environ.get("RANDTEACH_TEST_DEVICE", "cpu")

TINY = {
    "data.name": "digits",
    "model.encoder": "convnet", "model.width": "8",
    "head.hidden_dims": "[64]", "head.bottleneck_dim": "16", "head.out_dim": "64",
    "train.epochs": "2", "train.batch_size": "64", "train.probe_every": "1", "train.device": DEVICE,
    "probe.max_iter": "100", "train.teacher_cache": "false", "train.probe_at": "[]",
    "train.log_every": "1",  # the tests read every step's record
}


def tiny_config(tmp_path, **overrides):
    o = {**TINY, "out": str(tmp_path / "run"), **{k.replace("__", "."): str(v) for k, v in overrides.items()}}
    return build_config("cpu", None, o)
