"""Every data set randteach reads: its facts, its official files with checksums, and `load_dataset`.

Checksums are the MD5s published with each release (the CIFAR and Fashion-MNIST pages, and the
values every mirror of MNIST, STL-10 and TinyImageNet agrees on). For the gzipped IDX files the MD5 of
the decompressed file is listed too (`raw_md5`): it identifies the data whatever gzip produced the
archive. The Debian package `dataset-fashion-mnist` re-compressed its copies, so their archive MD5s
differ from Zalando's while their contents match `raw_md5` exactly.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from .. import launcher
from ..errors import DataMissingError, UserError
from . import cifar, cifar5m, digits, folder, idx, stl10, tinyimagenet
from .images import FormatError, ImageData, joined
from .roots import fetch_command, resolve_root


@dataclass(frozen=True)
class Remote:
    """One official file: its name, its mirrors (tried in order) and its checksums."""

    filename: str
    urls: tuple[str, ...]
    md5: str                    # of the file as served
    raw_md5: str | None = None  # of its decompressed content (gzipped files)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    title: str
    channels: int
    size: int                   # native side length in pixels
    num_classes: int
    splits: tuple[str, ...]
    folder: str | None          # where its files live under a data root (None: not under a root)
    contents: tuple[str, ...]   # files of a complete copy, relative to `folder`
    remote: tuple[Remote, ...]  # official downloads; empty when there is none we can verify
    homepage: str
    reader: Callable[[Path, str], ImageData] | None = None
    system_dirs: tuple[str, ...] = ()  # also looked in, after the data root
    torchvision: str | None = None     # torchvision's folder for it under a root (its downloads are reused)
    manual: str = ""            # how to get it by hand, when `remote` is empty

    @property
    def archive(self) -> bool:
        return len(self.remote) == 1 and self.remote[0].filename.endswith((".tar.gz", ".tgz", ".zip"))


_ZALANDO = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")


def _idx_files(mirrors: tuple[str, ...], md5s: dict[str, tuple[str, str]]) -> tuple[Remote, ...]:
    return tuple(Remote(f"{stem}.gz", tuple(m + f"{stem}.gz" for m in mirrors), md5, raw)
                 for stem, (md5, raw) in md5s.items())


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot")
FASHION_MD5 = {  # file: (md5 of the .gz from Zalando, md5 of the decompressed IDX file)
    "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
}
MNIST_MD5 = {
    "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

DATASETS: dict[str, DatasetInfo] = {info.name: info for info in [
    DatasetInfo(
        "fashion-mnist", "Fashion-MNIST", 1, 28, 10, ("train", "test"), "fashion-mnist",
        tuple(f"{stem}.gz" for stem in FASHION_MD5), _idx_files((_ZALANDO,), FASHION_MD5),
        "https://github.com/zalandoresearch/fashion-mnist",
        partial(idx.load, name="fashion-mnist", classes=FASHION_CLASSES),
        system_dirs=(DEBIAN_FASHION_MNIST,), torchvision="FashionMNIST/raw"),
    DatasetInfo(
        "mnist", "MNIST", 1, 28, 10, ("train", "test"), "mnist",
        tuple(f"{stem}.gz" for stem in MNIST_MD5), _idx_files(_MNIST_MIRRORS, MNIST_MD5),
        "http://yann.lecun.com/exdb/mnist/",
        partial(idx.load, name="mnist", classes=tuple(str(d) for d in range(10))),
        torchvision="MNIST/raw"),
    DatasetInfo(
        "digits", "scikit-learn digits", 1, 8, 10, ("train", "test"), None, (), (),
        "https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        manual="it ships with scikit-learn; there is nothing to fetch"),
    DatasetInfo(
        "cifar10", "CIFAR-10", 3, 32, 10, ("train", "test"), "cifar-10-batches-py",
        tuple(cifar.LAYOUT["cifar10"]["train"]) + ("test_batch", "batches.meta"),
        (Remote("cifar-10-python.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                "c58f30108f718f92721af3b95e74349a"),),
        "https://www.cs.toronto.edu/~kriz/cifar.html", partial(cifar.load, name="cifar10")),
    DatasetInfo(
        "cifar100", "CIFAR-100", 3, 32, 100, ("train", "test"), "cifar-100-python",
        ("train", "test", "meta"),
        (Remote("cifar-100-python.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
                "eb9058c3a382ffc7106e4002c42a8d85"),),
        "https://www.cs.toronto.edu/~kriz/cifar.html", partial(cifar.load, name="cifar100")),
    DatasetInfo(
        "stl10", "STL-10", 3, 96, 10, ("train", "test", "unlabeled"), "stl10_binary",
        ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin"),
        (Remote("stl10_binary.tar.gz", ("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",),
                "91f7769df0f17e558f3565bffb0c7dfb"),),
        "https://cs.stanford.edu/~acoates/stl10/", partial(stl10.load, name="stl10")),
    DatasetInfo(
        "tinyimagenet", "TinyImageNet-200", 3, 64, 200, ("train", "test"), "tiny-imagenet-200",
        ("wnids.txt", "val/val_annotations.txt"),
        (Remote("tiny-imagenet-200.zip", ("http://cs231n.stanford.edu/tiny-imagenet-200.zip",),
                "90528d7ca1a48142e341f4ef8d21d0de"),),
        "http://cs231n.stanford.edu/", partial(tinyimagenet.load, name="tinyimagenet")),
    DatasetInfo(
        "cifar5m", "CIFAR-5M", 3, 32, 10, ("train",), "cifar5m",
        tuple(f"cifar5m_part{i}.npz" for i in range(cifar5m.PARTS)), (),
        "https://github.com/preetum/cifar5m", partial(cifar5m.load, name="cifar5m"),
        manual="there is no official download with published checksums, so randteach cannot fetch it; "
               "download cifar5m_part0.npz ... cifar5m_part5.npz (links at https://github.com/preetum/cifar5m; "
               "any subset of the parts works) into {folder}/"),
    DatasetInfo(
        "folder", "image folder", 3, 0, 0, ("train", "test"), None, (), (),
        "", manual="it is your own folder: pass data.path=DIR (one sub-folder per class)"),
]}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise UserError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[name]


def how_to_get(info: DatasetInfo, root: Path) -> str:
    """The instruction a missing-data message ends with."""
    if info.remote:
        return f"Get it with:\n  {fetch_command(info.name, root)}"
    return "Get it by hand: " + info.manual.format(folder=root / (info.folder or ""))


_sharing = threading.local()  # .loads: set inside `shared_loads`, on this thread only


@contextlib.contextmanager
def shared_loads() -> Iterator[None]:
    """Within it, `load_configured` on this thread reads each data set split once and hands every caller the
    same ImageData: runs opened side by side in one process share their data instead of each reading, decoding
    and holding its own copy. The callers only read it (a subset is a copy)."""
    outer = getattr(_sharing, "loads", None)
    _sharing.loads = {} if outer is None else outer
    try:
        yield
    finally:
        _sharing.loads = outer


def load_configured(data_cfg, split: str = "train", name: str | None = None) -> ImageData:
    """Split `split` of data set `name` (default: the configured one) with a `DataConfig`'s root and folder
    options; the folder path belongs to the configured data set only (a probe data set reads no folder).
    '+'-joined splits ('train+unlabeled') are their images one after another."""
    name = name or data_cfg.name
    path = data_cfg.path if name == data_cfg.name else None
    key = (name, split, data_cfg.root, path, data_cfg.test_fraction)
    shared = getattr(_sharing, "loads", None)
    if shared is not None and key in shared:
        return shared[key]
    parts = [load_dataset(name, part, root=data_cfg.root, path=path, test_fraction=data_cfg.test_fraction)
             for part in split.split("+")]  # the parts are not kept beside the whole: STL10's are 2.9 GB
    data = parts[0] if len(parts) == 1 else joined(parts)
    if shared is not None:
        shared[key] = data
    return data


def load_distilled(data_cfg) -> ImageData:
    """The images distilled on: data.split of the configured data set."""
    return load_configured(data_cfg, data_cfg.split)


def search_dirs(info: DatasetInfo, base: Path) -> list[Path]:
    """Where a data set's files are looked for, in order: the data root, torchvision's layout, system folders."""
    torchvision = [base / info.torchvision] if info.torchvision else []
    return [base / info.folder, *torchvision, *map(Path, info.system_dirs)] if info.folder else []


def located(name: str, root: str | None = None) -> Path | None:
    """The first folder that holds every file of a complete copy of `name` (no reading), or None."""
    info = dataset_info(name)
    return next((d for d in search_dirs(info, resolve_root(root))
                 if info.contents and all(_present(d, f) for f in info.contents)), None)


def missing_data_notes(configs) -> list[str]:
    """One line per data set that `configs` distill or probe on and that is not on disk (for a dry run: the
    runs themselves would stop at it), with the command that gets it."""
    from ..probes.embedding import probe_data_name  # the probes' rule (CIFAR-5M is probed on CIFAR-10)
    wanted = {(name, c.data.root) for c in configs
              for name in (c.data.name, *([probe_data_name(c)] if c.probe.which else []))}
    notes = []
    for name, root in sorted(wanted, key=lambda w: (w[0], str(w[1]))):
        info = dataset_info(name)
        if info.contents and located(name, root) is None:
            how = how_to_get(info, resolve_root(root)).replace("\n ", "")
            notes.append(f"note: {info.title} is not on disk (searched under {resolve_root(root)}); "
                         f"{how[0].lower()}{how[1:]}")
    return notes


_noted: set[tuple[str, str]] = set()


def _note_missing_root(root, base: Path, info: DatasetInfo, found: Path) -> None:
    """One line on stderr (once per process, and under torchrun from rank 0 only) when a data root the user named
    does not exist and the data came from elsewhere (a system folder): a mistyped --data.root would otherwise
    pass unnoticed."""
    key = (str(base), info.name)
    if root is None or base.is_dir() or key in _noted or launcher.rank() != 0:
        return
    _noted.add(key)
    print(f"note: data.root {base} does not exist; {info.title} was read from {found}", file=sys.stderr)


def _present(folder: Path, name: str) -> bool:
    """`name` in `folder`; a gzipped IDX file also as its uncompressed copy, which the IDX reader takes first."""
    return (folder / name).is_file() or (name.endswith(".gz") and (folder / name[:-3]).is_file())


def load_dataset(name: str, split: str = "train", root: str | None = None, path: str | None = None,
                 test_fraction: float = folder.HELD_OUT) -> ImageData:
    """Read split `split` of data set `name` from `root` (see `resolve_root`), or `path` for name=folder
    (decoded images cached under `root`; `test_fraction` held out of a folder without split folders)."""
    info = dataset_info(name)
    if split not in info.splits:
        if name == "cifar5m":
            raise UserError("CIFAR-5M has only a train split; probe on CIFAR-10 instead (probe.data=cifar10)")
        raise UserError(f"{info.title} has no split {split!r}; valid splits: {', '.join(info.splits)}")
    if name == "digits":
        return digits.load(split, name=name)
    if name == "folder":
        return folder.load(path, split, name=name, root=root, test_fraction=test_fraction)
    base = resolve_root(root)
    looked = []
    for directory in search_dirs(info, base):
        if not directory.is_dir():
            looked.append(f"  {directory}  (no such folder)")
            continue
        try:
            data = info.reader(directory, split)
            _note_missing_root(root, base, info, directory)
            return data
        except FormatError as e:
            remedy = (f"Delete {directory} and get a fresh copy." if directory == base / info.folder
                      else "Get a fresh copy into the data root.")
            where = Path(e.path)
            where = where.relative_to(directory) if where.is_relative_to(directory) else where
            raise DataMissingError(f"{info.title} in {directory} is corrupt: {where}: {e.why}\n{remedy}\n"
                                   f"{how_to_get(info, base)}") from None
        except FileNotFoundError as e:
            looked.append(f"  {directory}  (missing {Path(e.filename).name if e.filename else e})")
    raise DataMissingError(f"{info.title} ({split} split) was not found. Looked in:\n"
                           + "\n".join(looked) + f"\n{how_to_get(info, base)}")
