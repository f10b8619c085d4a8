"""MNIST and Fashion-MNIST: the IDX files of the official releases, gzipped or not.

IDX: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then each
dimension as a big-endian uint32, then the values in row-major order.
Images are `idx3` (N, 28, 28), labels `idx1` (N,).
"""
from __future__ import annotations

import errno
import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from .images import FormatError, ImageData, from_numpy

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
UBYTE = 0x08


def find(directory: Path, stem: str) -> Path:
    """`stem` or `stem.gz` in `directory`."""
    for path in (directory / stem, directory / f"{stem}.gz"):
        if path.is_file():
            return path
    raise FileNotFoundError(errno.ENOENT, f"no {stem}[.gz]", str(directory / stem))


def read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it is gzipped (recognised by its magic, not its name)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise FormatError(path, f"broken gzip stream ({e})") from None


def parse(data: bytes, path: Path, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes with `ndim` dimensions."""
    if len(data) < 4 or data[:2] != b"\0\0":
        raise FormatError(path, "not an IDX file (bad magic number)")
    if data[2] != UBYTE or data[3] != ndim:
        raise FormatError(path, f"IDX magic 0x{data[:4].hex()}: expected 0x0000{UBYTE:02x}{ndim:02x} "
                                f"(unsigned bytes, {ndim} dimensions)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise FormatError(path, "truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise FormatError(path, f"{len(data)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load(directory: Path, split: str, *, name: str, num_classes: int = 10, classes=None) -> ImageData:
    image_stem, label_stem = FILES[split]
    image_path, label_path = find(directory, image_stem), find(directory, label_stem)
    images = parse(read_bytes(image_path), image_path, 3)
    labels = parse(read_bytes(label_path), label_path, 1)
    if len(images) != len(labels):
        raise FormatError(directory, f"{os.path.basename(image_path)} holds {len(images)} images but "
                                     f"{os.path.basename(label_path)} holds {len(labels)} labels")
    return from_numpy(images[:, None], labels, num_classes, name, classes, source=label_path)
