"""The command line when its reader leaves early (`randteach data list | head`): a real pipe whose
read end is closed before the command writes, so every write meets EPIPE."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [["data", "list"], ["sweep", str(ROOT / "examples" / "sweep_alpha.yaml"), "--dry-run"]])
def test_closed_pipe_ends_quietly(argv):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    try:
        done = subprocess.run([sys.executable, "-m", "randteach.cli", *argv], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 128 + 13  # as if SIGPIPE had ended it, like `head`'s other writers


def test_open_pipe_reads_everything():
    done = subprocess.run([sys.executable, "-m", "randteach.cli", "data", "list"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "fashion-mnist" in done.stdout
