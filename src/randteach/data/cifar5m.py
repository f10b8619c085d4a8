"""CIFAR-5M (Nakkiran, Neyshabur & Sedghi, 2021): about 6 million synthetic CIFAR-10-like images.

Distributed as six parts `cifar5m_part{0..5}.npz`, each holding `X` (N, 32, 32, 3) uint8 and `Y`
(N,) with the CIFAR-10 classes. Every part present is loaded, in order (at least one is needed);
there is no test split: probe on CIFAR-10.
"""
from __future__ import annotations

import errno
import zipfile
from pathlib import Path

import numpy as np
import torch

from .images import FormatError, ImageData

PARTS = 6
NUM_CLASSES = 10
SIDE = 32


def part_paths(directory: Path) -> list[Path]:
    """The parts present, as `cifar5m_part{i}.npz` (or `part{i}.npz`)."""
    found = []
    for i in range(PARTS):
        for stem in (f"cifar5m_part{i}", f"part{i}"):
            if (directory / f"{stem}.npz").is_file():
                found.append(directory / f"{stem}.npz")
                break
    return found


def _read_part(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "X" not in npz.files or "Y" not in npz.files:
                raise FormatError(path, f"holds arrays {npz.files}, expected X and Y")
            x, y = npz["X"], npz["Y"]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(path, f"not a readable .npz file ({e})") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (SIDE, SIDE, 3):
        raise FormatError(path, f"X is {x.dtype} {x.shape}, expected uint8 (N, {SIDE}, {SIDE}, 3)")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise FormatError(path, f"Y is {y.dtype} {y.shape}, expected {len(x)} integer labels")
    if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise FormatError(path, f"labels range over [{y.min()}, {y.max()}], expected 0..{NUM_CLASSES - 1}")
    return x, y


def _count(path: Path) -> int:
    """The number of images in a part, from the .npy header of X (without reading the pixels)."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("X.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape = read_header(f)[0]
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as e:
        raise FormatError(path, f"not a CIFAR-5M part with an X array ({e})") from None
    return int(shape[0]) if shape else 0


def load(directory: Path, split: str = "train", *, name: str = "cifar5m") -> ImageData:
    paths = part_paths(directory)
    if not paths:
        raise FileNotFoundError(errno.ENOENT, "no cifar5m_part{0..5}.npz", str(directory / "cifar5m_part0.npz"))
    counts = [_count(p) for p in paths]
    # Filled part by part: the peak memory is the result plus one part, not twice the result.
    images = torch.empty((sum(counts), 3, SIDE, SIDE), dtype=torch.uint8)
    labels = torch.empty(sum(counts), dtype=torch.int64)
    start = 0
    for path, n in zip(paths, counts):
        x, y = _read_part(path)
        if len(x) != n:
            raise FormatError(path, f"header says {n} images, X holds {len(x)}")
        images[start:start + n] = torch.from_numpy(x).permute(0, 3, 1, 2)
        labels[start:start + n] = torch.from_numpy(y.astype(np.int64))
        start += n
    return ImageData(images, labels, NUM_CLASSES, name)
