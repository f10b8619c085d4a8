"""CIFAR-10 and CIFAR-100: the official "python version" pickle batches.

Each batch is a pickled dict (written by Python 2, so its keys are bytes) holding `data`, a numpy
uint8 array (N, 3072) whose rows are the red, green and blue 32x32 planes in row-major order, and
the labels as a list of ints (`labels` for CIFAR-10, `fine_labels` for CIFAR-100). The class names
come from `batches.meta` (`label_names`) or `meta` (`fine_label_names`).

Unpickling can run arbitrary code, so the files are read with an unpickler that resolves only the
few globals a pickled numpy array needs (`_reconstruct`, `ndarray`, `dtype`, and, for pickles
written by Python 3, `_codecs.encode` and numpy's `_frombuffer`) and refuses every other one.
"""
from __future__ import annotations

import codecs
import errno
import pickle
from pathlib import Path

import numpy as np

from .images import FormatError, ImageData, from_numpy

LAYOUT = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
                "meta": "batches.meta", "labels": "labels", "names": "label_names", "num_classes": 10},
    "cifar100": {"train": ["train"], "test": ["test"],
                 "meta": "meta", "labels": "fine_labels", "names": "fine_label_names", "num_classes": 100},
}
SIDE = 32

_array = np.zeros(1)
_ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _array.__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): _array.__reduce__()[0],
    ("numpy.core.numeric", "_frombuffer"): _array.__reduce_ex__(5)[0],
    ("numpy._core.numeric", "_frombuffer"): _array.__reduce_ex__(5)[0],
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def unpickle(path: Path) -> dict:
    """The dict stored in a CIFAR batch, with str keys."""
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"no {path.name}", str(path))
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # any failure to unpickle means the file is not a CIFAR batch
        raise FormatError(path, f"not a CIFAR pickle batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise FormatError(path, f"holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _field(batch: dict, key: str, path: Path):
    if key not in batch:
        raise FormatError(path, f"has no {key!r} entry (keys: {', '.join(map(str, batch))})")
    return batch[key]


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = unpickle(path)
    data = _field(batch, "data", path)
    labels = np.asarray(_field(batch, label_key, path))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE:
        shape = getattr(data, "shape", None)
        raise FormatError(path, f"'data' is {type(data).__name__} {getattr(data, 'dtype', '')} {shape}, "
                                f"expected uint8 (N, {3 * SIDE * SIDE})")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise FormatError(path, f"{len(data)} images but {label_key!r} is {labels.dtype} {labels.shape}")
    return data.reshape(-1, 3, SIDE, SIDE), labels


def load(directory: Path, split: str, *, name: str) -> ImageData:
    layout = LAYOUT[name]
    meta_path = directory / layout["meta"]
    names = [n.decode() if isinstance(n, bytes) else str(n)
             for n in _field(unpickle(meta_path), layout["names"], meta_path)]
    if len(names) != layout["num_classes"]:
        raise FormatError(meta_path, f"lists {len(names)} classes, expected {layout['num_classes']}")
    parts = [_read_batch(directory / f, layout["labels"]) for f in layout[split]]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts])
    return from_numpy(images, labels, len(names), name, names, source=directory)
