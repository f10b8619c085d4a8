"""The runnable examples run (shrunk by their size arguments)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from randteach.data import load_dataset
from randteach.errors import DataMissingError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_custom_encoder_folder_example(tmp_path):
    try:
        load_dataset("fashion-mnist", "test")
    except DataMissingError:
        pytest.skip("Fashion-MNIST is not on disk (make test fetches it)")
    r = subprocess.run([sys.executable, str(EXAMPLES / "custom_encoder_folder.py"), "--per-class", "3", "--epochs", "1",
                        "--images", str(tmp_path / "images")], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "40 images in 10 classes (train 30, test 10), 28x28 grey" in r.stderr
    assert "completed: runs/cpu-" in r.stdout
    assert all(f"| {role} |" in r.stdout for role in ("teacher", "student", "input"))
    assert "per layer, teacher -> student" in r.stdout and "  embedding  effective rank" in r.stdout
    assert len(list((tmp_path / "images" / "per-class-3" / "train").glob("*/*.png"))) == 30
