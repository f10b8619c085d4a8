"""STL-10: the official binary files of `stl10_binary.tar.gz`.

`{split}_X.bin` is raw uint8, 3 x 96 x 96 per image, each colour plane stored column-major (as
written by MATLAB): read as (N, 3, 96, 96), the last two axes are (column, row) and are swapped.
`{split}_y.bin` holds one byte per image, the class 1..10 (here 0..9). The unlabeled split has no
labels file; its labels are -1.
"""
from __future__ import annotations

import errno
from pathlib import Path

import numpy as np

from .images import FormatError, ImageData, from_numpy

SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
NUM_CLASSES = 10


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"no {path.name}", str(path))
    return path


def _class_names(directory: Path) -> list[str] | None:
    path = directory / "class_names.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != NUM_CLASSES:
        raise FormatError(path, f"lists {len(names)} classes, expected {NUM_CLASSES}")
    return names


def load(directory: Path, split: str, *, name: str = "stl10") -> ImageData:
    x_path = _require(directory / f"{split}_X.bin")
    size = x_path.stat().st_size
    if size == 0 or size % IMAGE_BYTES:
        raise FormatError(x_path, f"{size} bytes is not a whole number of {IMAGE_BYTES}-byte 3x96x96 images")
    images = np.fromfile(x_path, np.uint8).reshape(-1, 3, SIDE, SIDE).transpose(0, 1, 3, 2)
    if split == "unlabeled":
        labels = np.full(len(images), -1, np.int64)
    else:
        y_path = _require(directory / f"{split}_y.bin")
        raw = np.fromfile(y_path, np.uint8)
        if len(raw) != len(images):
            raise FormatError(y_path, f"{len(raw)} labels for {len(images)} images")
        if len(raw) and (raw.min() < 1 or raw.max() > NUM_CLASSES):
            raise FormatError(y_path, f"labels range over [{raw.min()}, {raw.max()}], expected 1..{NUM_CLASSES}")
        labels = raw.astype(np.int64) - 1
    return from_numpy(images, labels, NUM_CLASSES, name, _class_names(directory), unlabelled=split == "unlabeled")
