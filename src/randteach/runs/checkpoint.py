"""Checkpoints: atomic writes, and loads that never unpickle arbitrary objects.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts, tagged with FORMAT. It is written
to a temporary file in the same folder, flushed to disk and renamed over the target, so a kill at any
moment leaves either the old file or the new one. Loading uses `torch.load(weights_only=True)`: a
crafted pickle is refused instead of run.
"""
from __future__ import annotations

import json
import os
import pickle
import shlex
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import written_whole

FORMAT = "randteach-checkpoint-v1"


def save_checkpoint(payload: dict, path: str | Path) -> Path:
    """Atomically write `payload` (plus the format tag) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path, "wb") as f:  # a folder that takes no file: its OSError, for callers that skip it
        try:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError ("unexpected pos")
            raise CheckpointError(f"cannot write checkpoint {str(path)!r}: "
                                  f"{str(e).splitlines()[0] if str(e) else e!r} (disk full, quota, or a read-only "
                                  "folder?); the previous version of the file, if any, is kept: free space and "
                                  "resume") from None
    return path


def load_weights(module: torch.nn.Module, state_dict: dict, source: str | Path) -> None:
    """module.load_state_dict, with a message that names the file when the architectures differ."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise CheckpointError(f"{str(source)!r} holds weights of another architecture than the configured model "
                              f"({lines[1].strip() if len(lines) > 1 else lines[0]}); check model.*, head.* and "
                              "data.image_size against the run that wrote it") from None


def _reason(e: Exception) -> str:
    """What torch's loader found wrong, without its advice to retry with weights_only=False: that would run
    whatever code the file holds, which is what loading safely refuses."""
    text = str(e).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return first.split(" Please use", 1)[0]  # nor its advice to allowlist the file's classes


def load_checkpoint(path: str | Path) -> dict:
    """Load a randteach checkpoint on the CPU; refuse anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be loaded safely: it is corrupt or holds objects other than "
            f"tensors and plain values (refused without running it: {_reason(e)}); write it again, e.g. by "
            "running the command that made it") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a randteach checkpoint (expected format {FORMAT!r})")
    return payload


FINAL_TEACHER = "teacher_final.pt"  # a moving teacher (teacher.mode ema, previous-epoch) at the run's end


def save_teacher(path: Path, model: dict, in_channels: int, image_size: int, preprocess, step: int = 0) -> None:
    """A teacher file: its weights and what a reader needs to rebuild and feed the encoders without the data
    set: input channels, image side and the input normalization fitted on the training images
    (`preprocess.as_dict()`; None for noise inputs or the Python API's float images)."""
    from ..data.preprocess import Preprocess
    save_checkpoint({"model": model, "role": "teacher", "in_channels": in_channels, "image_size": image_size,
                     "step": step, "preprocess": preprocess.as_dict() if isinstance(preprocess, Preprocess) else None},
                    path)


def resolve_model_checkpoint(path: str | Path, role: str = "student") -> Path:
    """A .pt file, or a run directory -> its checkpoints/<role>.pt; the teacher is the run's final teacher
    (teacher.pt unless the teacher moved: then teacher_final.pt, the one the run's last probe measured)."""
    p = Path(path)
    if p.is_dir():
        final = p / "checkpoints" / FINAL_TEACHER
        candidate = final if role == "teacher" and final.is_file() else p / "checkpoints" / f"{role}.pt"
        if not candidate.is_file():
            if not (p / "config.yaml").is_file():
                raise CheckpointError(f"{str(p)!r} is not a randteach run folder (no config.yaml); expected a run "
                                      "directory or a checkpoint .pt file")
            raise CheckpointError(f"run directory {str(p)!r} has no {candidate.relative_to(p)}; " + (
                "is the run finished? (`randteach distill --resume DIR` finishes it)"
                if (p / "checkpoints" / "last.pt").is_file() else _never_got_that_far(p)))
        return candidate
    return p


def _never_got_that_far(run: Path) -> str:
    """How to start a run that stopped before its first checkpoint, naming the error a sweep recorded for it.
    The same config would fail the same way where a probe setting stopped it (k-NN k above the probe set,
    say): probe settings may change in the same folder, so the advice says so."""
    start = (f"`randteach distill --config {shlex.quote(str(run / 'config.yaml'))} --out {shlex.quote(str(run))}`, "
             "adding the --probe.* setting that mends it if its first probe stopped it (probe settings may change "
             "in the same folder)")
    try:
        error = json.loads((run / "summary.json").read_text()).get("error")
    except (OSError, ValueError, AttributeError):
        error = None
    stopped = f"it stopped on: {error}; " if isinstance(error, str) and error else ""
    return f"the run never got that far (no checkpoints/last.pt to resume from): {stopped}start it again with {start}"


def load_state_dict(path: str | Path, role: str = "student") -> dict:
    """The model state dict stored in a checkpoint file or a run directory's `role` checkpoint; of a resume
    state (checkpoints/last.pt: the student and teacher of a run under way), its `role` model."""
    payload = load_checkpoint(resolve_model_checkpoint(path, role))
    state = payload.get("model", payload.get(role))
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds no model weights; expected a model checkpoint (student.pt, "
                              "student_stepN.pt, teacher.pt), a run's checkpoints/last.pt or a run directory")
    return state
