"""Checkpoints: atomic writes, and loads that never unpickle arbitrary objects.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts, tagged with FORMAT. It is written
to a temporary file in the same folder, flushed to disk and renamed over the target, so a kill at any
moment leaves either the old file or the new one. Loading uses `torch.load(weights_only=True)`: a
crafted pickle is refused instead of run.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError

FORMAT = "randteach-checkpoint-v1"


def save_checkpoint(payload: dict, path: str | Path) -> Path:
    """Atomically write `payload` (plus the format tag) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a randteach checkpoint on the CPU; refuse anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be loaded safely: it is corrupt or holds objects other than "
            f"tensors and plain values (refused without running it: {first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a randteach checkpoint (expected format {FORMAT!r})")
    return payload


def resolve_model_checkpoint(path: str | Path, role: str = "student") -> Path:
    """A .pt file, or a run directory -> its checkpoints/<role>.pt."""
    p = Path(path)
    if p.is_dir():
        candidate = p / "checkpoints" / f"{role}.pt"
        if not candidate.is_file():
            raise CheckpointError(f"run directory {str(p)!r} has no {candidate.relative_to(p)}; "
                                  "is the run finished? (`randteach distill --resume DIR` finishes it)")
        return candidate
    return p


def load_state_dict(path: str | Path, role: str = "student") -> dict:
    """The model state dict stored in a checkpoint file or a run directory's `role` checkpoint."""
    payload = load_checkpoint(resolve_model_checkpoint(path, role))
    if "model" not in payload:
        raise CheckpointError(f"{str(path)!r} holds no model weights")
    return payload["model"]
