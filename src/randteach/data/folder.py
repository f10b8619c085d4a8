"""Your own images: one sub-folder per class.

    PATH/train/<class>/*.png   PATH/test/<class>/*.png   (or PATH/val/ for the test split)
    PATH/<class>/*.png         (no split folders: everything is the train split)

Classes are the sorted sub-folder names of the train split. Files are decoded with Pillow; those
that cannot be decoded are skipped and reported with a warning. Images that all share one size keep
it; mixed sizes are center-cropped and resized to `MIXED_SIZE` x `MIXED_SIZE`. Images are
greyscale (1 channel) if every one is, RGB otherwise.
"""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

from PIL import Image

from ..errors import DataMissingError, UserError
from .decode import read_images
from .images import ImageData, from_numpy

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MIXED_SIZE = 64
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_dir(base: Path, split: str) -> tuple[Path, Path]:
    """(folder of the split, folder whose sub-folders define the classes)."""
    if not any((base / d).is_dir() for d in ("train", "test", "val")):
        if split != "train":
            raise UserError(f"{base} has no test/ or val/ folder, so there is no {split} split; "
                            f"put the images in {base}/train/<class>/ and {base}/test/<class>/")
        return base, base
    for d in SPLIT_DIRS[split]:
        if (base / d).is_dir():
            train = base / "train"
            return base / d, train if train.is_dir() else base / d
    raise UserError(f"{base} has no {' or '.join(d + '/' for d in SPLIT_DIRS[split])} folder for the {split} split")


def _header(path: Path) -> tuple[str, tuple[int, int]] | None:
    try:
        with Image.open(path) as img:
            return img.mode, img.size
    except Exception:  # unreadable: decoding reports it below
        return None


def load(path: str | Path | None, split: str = "train", *, name: str = "folder") -> ImageData:
    if not path:
        raise UserError("data.name=folder needs data.path=DIR (one sub-folder per class)")
    base = Path(path).expanduser()
    if not base.is_dir():
        raise DataMissingError(f"image folder {base} does not exist; expected one sub-folder per class "
                               f"(optionally inside train/ and test/ or val/)")
    split_dir, class_root = _split_dir(base, split)
    classes = [d.name for d in _class_dirs(class_root)]
    extra = sorted({d.name for d in _class_dirs(split_dir)} - set(classes))
    if extra:
        raise UserError(f"{split_dir} has classes that {class_root} lacks: {', '.join(extra)}")
    files, labels = [], []
    for label, cls in enumerate(classes):
        if (split_dir / cls).is_dir():
            found = sorted(p for p in (split_dir / cls).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
            files += found
            labels += [label] * len(found)
    if not files:
        raise DataMissingError(f"no images ({', '.join(sorted(EXTENSIONS))}) in {split_dir}/<class>/")
    headers = [_header(p) for p in files]
    readable = [h for h in headers if h]
    sizes = Counter(size for _, size in readable)
    (w, h) = sizes.most_common(1)[0][0] if len(sizes) == 1 else (MIXED_SIZE, MIXED_SIZE)
    mode = "L" if readable and all(m in GREY_MODES for m, _ in readable) else "RGB"
    images, ok, failed = read_images(files, mode, (h, w))
    if failed:
        shown = "; ".join(f"{p} ({why})" for p, why in failed[:5])
        warnings.warn(f"{name}: skipped {len(failed)} unreadable file(s) of {len(files)}: {shown}", stacklevel=2)
    if not ok:
        raise DataMissingError(f"none of the {len(files)} image files in {split_dir} could be decoded")
    return from_numpy(images, [labels[i] for i in ok], len(classes), name, classes)
