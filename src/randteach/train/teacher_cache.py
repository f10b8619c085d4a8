"""Cached teacher targets: a frozen teacher on un-augmented inputs is a pure function of the data.

The teacher's head is split as f_T(x) = last(bottleneck(encoder(x))). The compact part,
bottleneck(encoder(x)) — 256 numbers per image for the paper's head — is computed once for the whole
training set, in fp32, in batches of train.batch_size, and stored on disk keyed by everything that changes
them: the teacher's weights and buffers, the exact inputs and their preprocessing, the head's switches and
the encoder's settings (`head.*`, `model.*`), the memory format, the device type, whether TF32 is allowed,
and the code that computes them (`digest_code`: after an upgrade or an edit of that code the targets are
computed anew rather than read back from the old code's arithmetic). Every step then applies only `last`
(a matrix product) to the cached rows.
This removes the teacher's encoder pass from every step and is reused by every run with the same teacher
and data (e.g. the seeds of a sweep that share train.seed-independent teacher seeds, or a re-run); runs that
want the same targets at the same time (side by side, or sweep workers) compute them once, the others wait.

What it changes: the teacher's outputs are computed in other batches than the student's, so per-sample
results may differ from a live teacher's in the last fp32 bit. The escape at alpha = 1e-10 is not seeded
by that: the loop runs the teacher live during the float64 start (see below). Only valid for a frozen
teacher in eval mode (`config.teacher_cache_conflict`, checked when a config is built and at run start).

A teacher held in float64 (the float64 start, precision.py) is cached from its fp32 copy: the loop runs
the teacher live while the float64 phase lasts and uses these fp32 targets after it.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..digests import code_modules, digest_code, digest_module, digest_tensor
from ..errors import CheckpointError
from ..files import exclusive
from ..precision import fp32_module
from ..runs.checkpoint import load_checkpoint, save_checkpoint

VERSION = "2"  # the cache file's format; the code that computes the targets is keyed by `digest_code`


def target_settings(cfg: Config, device: torch.device, channels_last: bool) -> dict:
    """The settings besides weights and inputs that change the cached targets."""
    return {"head": asdict(cfg.head), "model": asdict(cfg.model), "channels_last": channels_last,
            "device": device.type, "dtype": "float32", "tf32": bool(torch.backends.cudnn.allow_tf32)}


def cache_key(teacher: nn.Module, inputs: torch.Tensor, preprocess, batch_size: int, settings: dict) -> str:
    """Hash of everything the targets depend on: the teacher (structure, attributes, weights and buffers),
    inputs, their conversion, `settings` (see `target_settings`) and the code of the teacher, the conversion
    and this module."""
    h = hashlib.sha256(f"teacher-targets-v{VERSION}-b{batch_size}".encode())
    h.update(repr(sorted(settings.items())).encode())
    digest_code(h, code_modules(teacher) | {__name__, type(preprocess).__module__})
    digest_module(h, teacher)
    digest_tensor(h, inputs)
    if preprocess is not None:
        h.update(repr(sorted(preprocess.as_dict().items())).encode())
    return h.hexdigest()[:24]


@torch.inference_mode()
def compute_targets(teacher: nn.Module, inputs: torch.Tensor, preprocess, batch_size: int,
                    device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """bottleneck(encoder(x)) for every input, fp32, on the CPU."""
    out = []
    for i in range(0, len(inputs), batch_size):
        x = inputs[i:i + batch_size].to(device)
        x = preprocess(x) if preprocess is not None else x
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(teacher.head.bottleneck(teacher.encoder(x)).float().cpu())
    return torch.cat(out)


def load_or_compute(cfg: Config, teacher: nn.Module, inputs: torch.Tensor, preprocess, batch_size: int,
                    device: torch.device, folder: Path | None, channels_last: bool = False) -> tuple[torch.Tensor, str]:
    """The cached targets (from `folder` when present and valid) and where they came from."""
    teacher = fp32_module(teacher)
    key = cache_key(teacher, inputs, preprocess, batch_size, target_settings(cfg, device, channels_last))
    if folder is None:
        return compute_targets(teacher, inputs, preprocess, batch_size, device, channels_last), "computed"
    path = folder / f"{key}.pt"
    # the runs of a sweep that share a teacher (in threads or processes) compute its targets once: the others
    # wait here for the file, then read it
    with exclusive(path):
        targets = _read(path, key, len(inputs))
        if targets is not None:
            return targets, f"loaded {path}"
        targets = compute_targets(teacher, inputs, preprocess, batch_size, device, channels_last)
        try:
            save_checkpoint({"key": key, "targets": targets}, path)
        except OSError:
            return targets, "computed (cache folder not writable)"
    return targets, f"computed and saved to {path}"


def _read(path: Path, key: str, rows: int) -> torch.Tensor | None:
    """The targets stored at `path`, or None when it is missing, corrupt or another key's."""
    if not path.exists():
        return None
    try:
        payload = load_checkpoint(path)
    except CheckpointError:
        return None  # a corrupt cache file is recomputed and replaced
    return payload["targets"] if payload.get("key") == key and len(payload["targets"]) == rows else None
