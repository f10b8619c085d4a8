"""Your own images: one sub-folder per class.

    DIR/train/<class>/*.png   DIR/test/<class>/*.png   (or DIR/val/ for the test split)
    DIR/<class>/*.png         (no split folders: a class-stratified fraction, data.test_fraction = 0.2 by
                               default, is held out as the test split, the same for every run)

Classes are the sorted sub-folder names of train/ (of DIR itself without split folders). All images
of the folder, every split, are decoded with Pillow to one format, so that train and test match:
greyscale (1 channel) if every image is, RGB otherwise; one size: if all files share one size it is
kept (center-cropped to a square of the shorter side), mixed sizes are center-cropped and resized
to `MIXED_SIZE` px. `data.image_size` then resizes each batch to the model's input side, like for
every other data set. Files Pillow cannot decode are skipped and reported.

Decoded images are cached in `<data root>/folder-cache/<hash of DIR>/<key>.npz` (the data root of
`data.root`, else $RANDTEACH_DATA, else the per-user cache), or, when the data root is not writable,
in `DIR/.randteach-cache/<key>.npz`. The key hashes the class names, the relative path,
byte size and mtime of every image file, the decode settings, and the decoding code with the versions of
Pillow and numpy, so adding, removing or changing a file, or upgrading the decoder, decodes the folder
again (and deletes the stale cache file). Each load prints one line saying
how many images and classes it found, where they came from, and which files it skipped.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..digests import digest_code
from ..errors import DataMissingError, RandteachWarning, UserError
from ..files import written_whole
from ..text import counted
from .decode import read_headers, read_images
from .images import ImageData, from_numpy, stratified_subset
from .roots import resolve_root

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MIXED_SIZE = 64
HELD_OUT = 0.2        # default test fraction of a folder without split folders (data.test_fraction)
HELD_OUT_SEED = 0     # the held-out split is a pure function of the folder's contents and the fraction
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
CACHE_DIR = ".randteach-cache"
CACHE_VERSION = 1     # the cache file's format; the decoding code and Pillow are keyed by `digest_code`
SHOWN_SKIPPED = 10    # unreadable files named in the report line
TRAIN, TEST, FLAT = 0, 1, 2


@dataclass
class Listing:
    """The image files of a folder, in a fixed order, and what each one is."""

    classes: list[str]
    files: list[Path]       # relative to the folder
    labels: list[int]
    splits: list[int]       # TRAIN, TEST, or FLAT (no split folders)
    stats: list[tuple[int, int]]  # (bytes, mtime ns): part of the cache key

    @property
    def flat(self) -> bool:
        return not self.files or self.splits[0] == FLAT

    def contents_key(self) -> str:
        """What the folder holds: its classes and every image file's path, split, byte size and mtime."""
        h = hashlib.sha1(f"{chr(0).join(self.classes)}\n".encode())
        for f, (size, mtime), split in zip(self.files, self.stats, self.splits):
            h.update(f"{f.as_posix()}\t{size}\t{mtime}\t{split}\n".encode())
        return h.hexdigest()[:16]

    def key(self) -> str:
        """The decoded cache's key: the contents and how they are decoded."""
        h = hashlib.sha1(f"v{CACHE_VERSION} mixed={MIXED_SIZE}\n{self.contents_key()}\n".encode())
        digest_code(h, {__name__, read_images.__module__}, libraries=("pillow", "numpy"))  # decoder and its code
        return h.hexdigest()[:16]


@dataclass
class Decoded:
    images: np.ndarray      # (n, C, H, W) uint8, readable files in listing order
    labels: np.ndarray
    splits: np.ndarray
    skipped: list[tuple[str, str]]   # (relative path, why)
    origin: str


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    """The images under a class folder, at any depth; a randteach run folder there (its figures would pass
    for images of the class) means data.path names the wrong folder."""
    found = sorted(folder.rglob("*"))
    run = next((p.parent for p in found if p.name == "metrics.jsonl" and (p.parent / "config.yaml").is_file()), None)
    if run is not None:
        raise UserError(f"{run} is a randteach run folder, inside what data.path makes the class folder {folder}; "
                        "data.path should name the folder whose sub-folders are the classes, each holding images")
    return [p for p in found if p.suffix.lower() in EXTENSIONS and not p.name.startswith(".") and p.is_file()]


def _split_dir(base: Path, names: tuple[str, ...]) -> Path | None:
    """The first of `names` in `base` that holds class folders (a Kaggle-style test/ of unlabelled images
    does not hide a labelled val/), else the first that exists. One with images of its own is a class, not
    a split (CIFAR-100 has a class named train)."""
    found = [base / d for d in names if (base / d).is_dir() and not _holds_images(base / d)]
    return next((d for d in found if _subdirs(d)), found[0] if found else None)


def _holds_images(folder: Path) -> bool:
    return any(p.suffix.lower() in EXTENSIONS and p.is_file() for p in folder.iterdir())


def _scan(base: Path) -> Listing:
    split_dirs = {s: _split_dir(base, dirs) for s, dirs in SPLIT_DIRS.items()}
    if not any(split_dirs.values()):
        parts = [(FLAT, base)]
        classes = [d.name for d in _subdirs(base)]
    else:
        parts = [(code, split_dirs[s]) for code, s in ((TRAIN, "train"), (TEST, "test")) if split_dirs[s]]
        class_root = split_dirs["train"] or split_dirs["test"]
        classes = [d.name for d in _subdirs(class_root)]
        for _, d in parts:
            extra = sorted({c.name for c in _subdirs(d)} - set(classes))
            if extra:
                raise UserError(f"{d} has classes that {class_root} lacks: {', '.join(extra)}; "
                                f"every class of the test split needs a folder in {class_root}")
    files, labels, splits = [], [], []
    for code, d in parts:
        for label, cls in enumerate(classes):
            if (d / cls).is_dir():
                found = _images_in(d / cls)
                files += [p.relative_to(base) for p in found]
                labels += [label] * len(found)
                splits += [code] * len(found)
    stats = [(st.st_size, st.st_mtime_ns) for st in (os.stat(base / f) for f in files)]
    return Listing(classes, files, labels, splits, stats)


def configured_contents(data_cfg) -> tuple[str, int] | None:
    """`contents` of a config's image folder (data.name=folder); None for other data or a folder not there."""
    if data_cfg.name != "folder" or not data_cfg.path or not Path(data_cfg.path).expanduser().is_dir():
        return None
    return contents(data_cfg.path)


def contents(path: str | Path) -> tuple[str, int]:
    """(contents key, number of image files) of the image folder `path`. The key names the data a run reads: it
    enters the run's default address and the run's record of its folder (`runs.rundir.open_data_folder`)."""
    listing = _scan(Path(path).expanduser())
    return listing.contents_key(), len(listing.files)


def _cache_dirs(base: Path, root: str | Path | None) -> list[Path]:
    """Where the decoded folder is cached: under the data root, else (not writable) inside the folder."""
    outside = hashlib.sha1(str(base.resolve()).encode()).hexdigest()[:16]
    return [resolve_root(root) / "folder-cache" / outside, base / CACHE_DIR]


def _read_cache(base: Path, key: str, root: str | Path | None) -> Decoded | None:
    for d in _cache_dirs(base, root):
        try:
            with np.load(d / f"{key}.npz", allow_pickle=False) as z:
                out = Decoded(z["images"], z["labels"], z["splits"],
                              list(zip(z["skipped_paths"].tolist(), z["skipped_why"].tolist())), f"read from cache {d}")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            continue  # absent or damaged: look further, else decode
        if out.images.dtype == np.uint8 and out.images.ndim == 4 and len(out.images) == len(out.labels) == len(out.splits):
            return out
    return None


def _write_cache(base: Path, key: str, d: Decoded, root: str | Path | None) -> str:
    """Store `d`; returns where (or why not), for the report line."""
    arrays = dict(images=d.images, labels=d.labels, splits=d.splits,
                  skipped_paths=np.array([p for p, _ in d.skipped], dtype=str),
                  skipped_why=np.array([w for _, w in d.skipped], dtype=str))
    for folder in _cache_dirs(base, root):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with written_whole(folder / f"{key}.npz", "wb") as f:
                np.savez(f, **arrays)
        except OSError:
            continue  # not writable: try the next place
        for old in folder.glob("*.npz"):
            if old.name != f"{key}.npz":
                old.unlink(missing_ok=True)  # the folder changed: its previous decoding is stale
        return f"cached in {folder}"
    return "not cached (neither the folder nor the data root is writable)"


def _decode(base: Path, listing: Listing) -> Decoded:
    t0 = time.perf_counter()
    paths = [base / f for f in listing.files]
    headers = [h for h in read_headers(paths) if h]
    sizes = Counter(size for _, size in headers)
    side = min(sizes.most_common(1)[0][0]) if len(sizes) == 1 else MIXED_SIZE
    mode = "L" if headers and all(m in GREY_MODES for m, _ in headers) else "RGB"
    images, ok, failed = read_images(paths, mode, (side, side))
    skipped = [(Path(p).relative_to(base).as_posix(), why.replace(f" '{p}'", "")) for p, why in failed]
    return Decoded(images, np.array(listing.labels, np.int64)[ok], np.array(listing.splits, np.int8)[ok], skipped,
                   f"decoded in {time.perf_counter() - t0:.1f} s")


_reported: set[tuple[str, str]] = set()


def _report(base: Path, listing: Listing, d: Decoded, name: str, counts: dict[str, int],
            test_fraction: float) -> None:
    """One line per folder and process: what was found, where it came from, what was skipped."""
    seen = (str(base), listing.key(), test_fraction if listing.flat else None)
    if seen in _reported:
        return
    _reported.add(seen)
    n, c, h, w = d.images.shape
    held = f", test = {test_fraction:.0%} held out" if listing.flat else ""
    line = (f"{name} {base}: {n} images in {len(listing.classes)} classes (train {counts['train']}, "
            f"test {counts['test']}{held}), {h}x{w} {'grey' if c == 1 else 'RGB'}; {d.origin}")
    empty = [c for k, c in enumerate(listing.classes) if not (d.labels == k).any()]
    if empty:  # still classes (the labels keep the folder order), with no example: likely a mistake
        line += (f"; class folder(s) {', '.join(empty)} hold no readable image: they count among the classes but "
                 "no image has their label (add images, or remove the folders)")
    if d.skipped:
        shown = "; ".join(f"{p} ({why})" for p, why in d.skipped[:SHOWN_SKIPPED])
        more = f"; and {len(d.skipped) - SHOWN_SKIPPED} more" if len(d.skipped) > SHOWN_SKIPPED else ""
        line += f"; skipped {counted(len(d.skipped), 'unreadable file')} of {len(listing.files)}: {shown}{more}"
    if d.skipped or empty:
        warnings.warn(line, RandteachWarning, stacklevel=4)
    else:
        print(line, file=sys.stderr)


def _split_indices(listing: Listing, d: Decoded, test_fraction: float) -> dict[str, np.ndarray]:
    if not listing.flat:
        return {"train": np.flatnonzero(d.splits == TRAIN), "test": np.flatnonzero(d.splits == TEST)}
    n_test = round(test_fraction * len(d.labels))
    test = stratified_subset(torch.from_numpy(d.labels), n_test, seed=HELD_OUT_SEED).numpy()
    mask = np.ones(len(d.labels), bool)
    mask[test] = False
    return {"train": np.flatnonzero(mask), "test": test}


def load(path: str | Path | None, split: str = "train", *, name: str = "folder", root: str | Path | None = None,
         test_fraction: float = HELD_OUT) -> ImageData:
    """Split `split` ("train" or "test") of the image folder `path`, decoded once and then cached under
    the data root `root`. Without split folders, `test_fraction` of each class is the test split."""
    if not 0 < test_fraction < 1:
        raise UserError(f"data.test_fraction={test_fraction}: expected a fraction between 0 and 1 (exclusive) "
                        "of a folder's images to hold out as its test split, e.g. 0.2")
    if not path:
        raise UserError("data.name=folder needs data.path=DIR (one sub-folder per class)")
    base = Path(path).expanduser()
    if base.exists() and not base.is_dir():
        raise UserError(f"data.path {base} is a file; give the folder that holds one sub-folder per class "
                        "(optionally inside train/ and test/ or val/)")
    if not base.is_dir():
        where = "" if base.is_absolute() else (
            f" (a relative data.path is read from the current folder: {base.absolute()}; a run records it as "
            "given, so analyse such a run from the folder it was started in)")
        raise DataMissingError(f"image folder {base} does not exist{where}; expected one sub-folder per class "
                               "(optionally inside train/ and test/ or val/)")
    listing = _scan(base)
    if not listing.flat and split == "train" and TRAIN not in listing.splits:
        raise DataMissingError(f"{base} has no images in train/<class>/; the train split needs them")
    if not listing.flat and split == "test" and not any((base / d).is_dir() for d in SPLIT_DIRS["test"]):
        raise UserError(f"{base} has a train/ folder but no test/ or val/ folder for the test split; add one, "
                        f"or move the class folders out of train/ to hold out data.test_fraction ({test_fraction:.0%}) "
                        "of the images")
    if not listing.files:
        raise DataMissingError(f"no images ({', '.join(sorted(EXTENSIONS))}) in {base}/<class>/ "
                               f"(or {base}/train/<class>/)")
    key = listing.key()
    decoded = _read_cache(base, key, root)
    if decoded is None:
        decoded = _decode(base, listing)
        decoded.origin += ", " + _write_cache(base, key, decoded, root)
    if not len(decoded.labels):
        raise DataMissingError(f"none of the {len(listing.files)} image files in {base} could be decoded; "
                               f"e.g. {decoded.skipped[0][0]}: {decoded.skipped[0][1]}")
    idx = _split_indices(listing, decoded, test_fraction)
    _report(base, listing, decoded, name, {s: len(i) for s, i in idx.items()}, test_fraction)
    if not len(idx[split]):
        why = (f"data.test_fraction {test_fraction:g} of its {len(decoded.labels)} images rounds to "
               f"{'none' if split == 'test' else 'all of them'}: add images, or change data.test_fraction"
               if listing.flat else f"add images to its {split} folder")
        raise DataMissingError(f"no readable images in the {split} split of {base}; {why}")
    return from_numpy(decoded.images[idx[split]], decoded.labels[idx[split]], len(listing.classes), name,
                      listing.classes)
