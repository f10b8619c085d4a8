"""Content hashes for the on-disk caches (teacher targets, probe results, decoded image folders): of tensors,
and of the code that computes a cached result, so that a cache entry is read back only by the code that
wrote it."""
from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn


def digest_tensor(h, t: torch.Tensor) -> None:
    """Fold into `h` a tensor's shape, dtype and bytes."""
    t = t.detach().cpu()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    # reshape(-1): a 0-dim tensor (e.g. batch-norm's num_batches_tracked) cannot be viewed as bytes
    h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def code_modules(*roots: nn.Module) -> set[str]:
    """The modules defining the classes of `roots` and all their submodules, except torch's own (whose
    arithmetic `digest_code` keys by torch's version)."""
    names = {type(m).__module__ for root in roots for m in root.modules()}
    return {n for n in names if n != "torch" and not n.startswith("torch.")}


def digest_code(h, modules: Iterable[str], libraries: Iterable[str] = ("torch",)) -> None:
    """Fold into `h` the source files of `modules` and the installed versions of `libraries`: a cached result
    then belongs to the code that computed it, and an edited or upgraded encoder, head, probe or decoder is
    never served an old result."""
    for lib in libraries:
        h.update(f"{lib} {_version(lib)}".encode())
    for name in sorted(set(modules)):
        path = getattr(sys.modules.get(name), "__file__", None)
        h.update(name.encode())
        h.update(Path(path).read_bytes() if path else b"")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # e.g. a source build without metadata
        return "unknown"
