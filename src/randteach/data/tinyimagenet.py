"""TinyImageNet-200 (cs231n): 64x64 JPEGs in folders.

`wnids.txt` lists the 200 classes (WordNet ids); class k is the k-th line. Training images are
`train/<wnid>/images/*.JPEG`; the labelled validation images `val/images/*.JPEG` get their class
from `val/val_annotations.txt` (file, wnid, box). The official test split has no labels, so
split "test" here is the validation split, as is usual.

Decoding 110,000 JPEGs takes a while, so the decoded arrays are cached as .npy files in
`.randteach-cache/` inside the data folder, keyed by a hash of the file list, the labels, each file's size
and modification time, and the decoder's code: a changed file list or a rewritten image makes a new cache.
If the folder is read-only, nothing is cached.
"""
from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np

from ..digests import digest_code
from ..files import written_whole
from ..text import counted
from .decode import read_images
from .images import FormatError, ImageData, from_numpy

SIDE = 64
CACHE_DIR = ".randteach-cache"


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"no {path.name}", str(path))
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _train_files(directory: Path, wnids: list[str]) -> list[tuple[str, int]]:
    train = directory / "train"
    if not train.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no train/ folder", str(train))
    files = []
    for label, wnid in enumerate(wnids):
        folder = train / wnid / "images"
        if not folder.is_dir():
            raise FormatError(folder, f"missing: wnids.txt lists {wnid} but it has no train/{wnid}/images/")
        files += [(f"train/{wnid}/images/{e.name}", label) for e in sorted(os.scandir(folder), key=lambda e: e.name)
                  if e.name.lower().endswith(".jpeg")]
    return files


def _val_files(directory: Path, wnids: list[str]) -> list[tuple[str, int]]:
    index = {w: i for i, w in enumerate(wnids)}
    path = directory / "val" / "val_annotations.txt"
    files = []
    for n, line in enumerate(_read_lines(path), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise FormatError(path, f"line {n}: expected 'FILE<TAB>WNID...' with a wnid of wnids.txt, got {line!r}")
        files.append((f"val/images/{fields[0]}", index[fields[1]]))
    return files


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with written_whole(path, "wb") as f:
        np.save(f, array)


def _write_cache(cache: Path, split: str, key: str, images: np.ndarray, labels: np.ndarray) -> None:
    try:
        cache.mkdir(exist_ok=True)
        _save_atomic(cache / f"{split}-{key}-labels.npy", labels)
        _save_atomic(cache / f"{split}-{key}-images.npy", images)
        for old in cache.glob(f"{split}-*.npy"):
            if not old.name.startswith(f"{split}-{key}-"):
                old.unlink()
    except OSError:
        pass  # a read-only data folder: decode again next time


def _read_cache(image_cache: Path, label_cache: Path, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        images, labels = np.load(image_cache), np.load(label_cache)
    except (OSError, ValueError, EOFError):
        return None  # absent or damaged: decode again
    if images.shape != (n, 3, SIDE, SIDE) or images.dtype != np.uint8 or labels.shape != (n,):
        return None
    return images, labels


def _cache_key(directory: Path, wnids: list[str], files: list[tuple[str, int]]) -> str:
    h = hashlib.sha1("\n".join(wnids).encode())
    digest_code(h, {__name__, read_images.__module__}, libraries=("pillow", "numpy"))
    for f, y in files:
        st = os.stat(directory / f)
        h.update(f"{f}\t{y}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load(directory: Path, split: str, *, name: str = "tinyimagenet") -> ImageData:
    wnids = _read_lines(directory / "wnids.txt")
    files = _train_files(directory, wnids) if split == "train" else _val_files(directory, wnids)
    if not files:
        raise FormatError(directory, f"no images in the {split} split")
    key = _cache_key(directory, wnids, files)
    cache = directory / CACHE_DIR
    image_cache, label_cache = cache / f"{split}-{key}-images.npy", cache / f"{split}-{key}-labels.npy"
    cached = _read_cache(image_cache, label_cache, len(files))
    if cached:
        images, labels = cached
    else:
        images, _, failed = read_images([directory / f for f, _ in files], "RGB", (SIDE, SIDE))
        if failed:
            path, why = failed[0]
            raise FormatError(path, f"cannot be decoded ({why}); {counted(len(failed), 'file')} in all")
        labels = np.array([y for _, y in files], np.int64)
        _write_cache(cache, split, key, images, labels)
    return from_numpy(images, labels, len(wnids), name, wnids)
