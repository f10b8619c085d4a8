"""Each reader on small files written here in the official on-disk format, and the real Fashion-MNIST."""
import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from randteach.data import DATASETS, load_dataset
from randteach.data.registry import DEBIAN_FASHION_MNIST
from randteach.errors import DataMissingError, UserError


# ------------------------------------------------------------------ IDX (MNIST, Fashion-MNIST)

def write_idx(path: Path, array: np.ndarray) -> None:
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def write_mnist(directory: Path, n_train=12, n_test=5, gz=True):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        out[split] = images, labels
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    written = write_mnist(tmp_path / "mnist", gz=gz)
    for split in ("train", "test"):
        data = load_dataset("mnist", split, root=str(tmp_path))
        images, labels = written[split]
        assert data.images.dtype == torch.uint8 and data.images.shape == (len(images), 1, 28, 28)
        assert data.images.is_contiguous()
        assert data.labels.dtype == torch.int64 and data.labels.tolist() == labels.tolist()
        assert data.num_classes == 10 and data.name == "mnist"
        # row-major: pixel (row 3, column 17) of image 2
        assert data.images[2, 0, 3, 17] == images[2, 3, 17]


def test_idx_wrong_magic_is_corrupt(tmp_path):
    write_mnist(tmp_path / "mnist")
    bad = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(bad.read_bytes()))
    raw[3] = 1  # claims one dimension
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataMissingError, match="corrupt") as e:
        load_dataset("mnist", root=str(tmp_path))
    assert "train-images-idx3-ubyte.gz" in str(e.value)
    assert f"randteach data fetch mnist --data.root {tmp_path}" in str(e.value)


def test_idx_truncated_is_corrupt(tmp_path):
    write_mnist(tmp_path / "mnist", gz=False)
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataMissingError, match="bytes, expected"):
        load_dataset("mnist", "test", root=str(tmp_path))


def test_labels_out_of_range_name_the_labels_file(tmp_path):
    write_mnist(tmp_path / "mnist", gz=False)
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte", np.array([0, 12, 3, 4, 5], np.uint8))
    with pytest.raises(DataMissingError, match=r"t10k-labels-idx1-ubyte: labels range over \[0, 12\]"):
        load_dataset("mnist", "test", root=str(tmp_path))


# ------------------------------------------------------------------ CIFAR-10 / CIFAR-100

def test_cifar10(tmp_path, write_cifar10):
    written = write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=4)
    train = load_dataset("cifar10", "train", root=str(tmp_path))
    test = load_dataset("cifar10", "test", root=str(tmp_path))
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.num_classes == 10 and train.classes[0] == "airplane"
    data, labels = written["train"]
    assert train.labels.tolist() == labels.tolist()
    # green (plane 1), row 5, column 9 of image 6 sits at byte 1024 + 5 * 32 + 9 of its row
    assert train.images[6, 1, 5, 9] == data[6, 1024 + 5 * 32 + 9]
    assert test.images[3, 2, 31, 0] == written["test"][0][3, 2048 + 31 * 32]


def write_cifar100(directory: Path, n=6, protocol=2):
    directory.mkdir(parents=True)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    fine = [99 - i for i in range(n)]
    for split in ("train", "test"):
        with open(directory / split, "wb") as f:
            pickle.dump({b"filenames": [b"a.png"] * n, b"batch_label": b"x", b"fine_labels": fine,
                         b"coarse_labels": [0] * n, b"data": data}, f, protocol=protocol)
    with open(directory / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, f, protocol=protocol)
    return data, fine


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar100_fine_labels(tmp_path, protocol):
    data, fine = write_cifar100(tmp_path / "cifar-100-python", protocol=protocol)
    ds = load_dataset("cifar100", "test", root=str(tmp_path))
    assert ds.num_classes == 100 and len(ds.classes) == 100
    assert ds.labels.tolist() == fine
    assert ds.images[1, 0, 0, 1] == data[1, 1]


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar_refuses_foreign_pickle_globals(tmp_path, write_cifar10, capsys):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar10(directory)
    with open(directory / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(DataMissingError, match="refusing to load global .*print"):
        load_dataset("cifar10", root=str(tmp_path))
    assert "never run" not in capsys.readouterr().out


def test_cifar_wrong_structure_is_corrupt(tmp_path, write_cifar10):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar10(directory)
    with open(directory / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, f, protocol=2)
    with pytest.raises(DataMissingError, match=r"expected uint8 \(N, 3072\)"):
        load_dataset("cifar10", "test", root=str(tmp_path))


def test_a_label_of_minus_one_in_a_labelled_split_is_corrupt(tmp_path, write_cifar10):
    # -1 stands for "no label" only in STL-10's unlabeled split; in CIFAR's test batch it is damage
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar10(directory)
    with open(directory / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [-1, 8, 5, 0]}, f, protocol=2)
    with pytest.raises(DataMissingError, match=r"labels range over \[-1, 8\], expected \[0, 9\]"):
        load_dataset("cifar10", "test", root=str(tmp_path))


# ------------------------------------------------------------------ STL-10

def test_stl10_column_major(tmp_path):
    directory = tmp_path / "stl10_binary"
    directory.mkdir()
    n, plane = 3, 96 * 96
    x = np.zeros(n * 3 * plane, np.uint8)
    # image 1, blue plane, row 5, column 70: column-major means byte column * 96 + row within the plane
    x[1 * 3 * plane + 2 * plane + 70 * 96 + 5] = 200
    x.tofile(directory / "train_X.bin")
    np.array([1, 10, 4], np.uint8).tofile(directory / "train_y.bin")
    x[:3 * plane * 2].tofile(directory / "unlabeled_X.bin")
    ds = load_dataset("stl10", "train", root=str(tmp_path))
    assert ds.images.shape == (3, 3, 96, 96) and ds.images.is_contiguous()
    assert ds.images[1, 2, 5, 70] == 200 and ds.images[1, 2, 70, 5] == 0
    assert ds.labels.tolist() == [0, 9, 3] and ds.num_classes == 10
    unlabeled = load_dataset("stl10", "unlabeled", root=str(tmp_path))
    assert len(unlabeled) == 2 and unlabeled.labels.tolist() == [-1, -1]


def test_stl10_bad_size_is_corrupt(tmp_path):
    directory = tmp_path / "stl10_binary"
    directory.mkdir()
    np.zeros(1000, np.uint8).tofile(directory / "test_X.bin")
    with pytest.raises(DataMissingError, match="whole number"):
        load_dataset("stl10", "test", root=str(tmp_path))


# ------------------------------------------------------------------ TinyImageNet

def write_jpeg(path: Path, color, size=64, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), color).save(path, quality=95)


def write_tinyimagenet(directory: Path):
    wnids = ["n01443537", "n01629819", "n01641577"]
    colors = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    (directory / "val" / "images").mkdir(parents=True)
    (directory / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for k, wnid in enumerate(wnids):
        for j in range(2):
            write_jpeg(directory / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", colors[k])
        (directory / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for j, k in enumerate([2, 0, 1, 2]):
        write_jpeg(directory / "val" / "images" / f"val_{j}.JPEG", colors[k])
        lines.append(f"val_{j}.JPEG\t{wnids[k]}\t0\t0\t63\t63")
    (directory / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return wnids, colors


def test_tinyimagenet_and_cache(tmp_path):
    directory = tmp_path / "tiny-imagenet-200"
    wnids, colors = write_tinyimagenet(directory)
    # a greyscale image of another size is converted to RGB 64x64
    write_jpeg(directory / "train" / wnids[1] / "images" / "grey.JPEG", 128, size=80, mode="L")
    train = load_dataset("tinyimagenet", "train", root=str(tmp_path))
    assert train.images.shape == (7, 3, 64, 64) and train.num_classes == 3 and train.classes == tuple(wnids)
    assert train.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert (train.images[0, :, 32, 32].int() - torch.tensor(colors[0])).abs().max() < 8
    test = load_dataset("tinyimagenet", "test", root=str(tmp_path))
    assert test.labels.tolist() == [2, 0, 1, 2]
    assert (test.images[1, :, 10, 50].int() - torch.tensor(colors[0])).abs().max() < 8

    cache = directory / ".randteach-cache"
    assert len(list(cache.glob("train-*-images.npy"))) == 1
    # second load: served from the cache
    assert torch.equal(load_dataset("tinyimagenet", "train", root=str(tmp_path)).images, train.images)
    # a rewritten or damaged image under the same name is decoded again (the cache served the old pixels)
    first = directory / "train" / wnids[0] / "images" / f"{wnids[0]}_0.JPEG"
    write_jpeg(first, colors[1])
    again = load_dataset("tinyimagenet", "train", root=str(tmp_path))
    assert (again.images[0, :, 32, 32].int() - torch.tensor(colors[1])).abs().max() < 8
    first.write_bytes(b"not a jpeg")
    with pytest.raises(DataMissingError, match="cannot be decoded"):
        load_dataset("tinyimagenet", "train", root=str(tmp_path))
    # a changed file list too
    write_jpeg(first, colors[0])
    write_jpeg(directory / "train" / wnids[2] / "images" / "new.JPEG", colors[2])
    assert len(load_dataset("tinyimagenet", "train", root=str(tmp_path))) == 8
    assert len(list(cache.glob("train-*-images.npy"))) == 1


def test_tinyimagenet_bad_annotation(tmp_path):
    directory = tmp_path / "tiny-imagenet-200"
    write_tinyimagenet(directory)
    (directory / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataMissingError, match="corrupt.*line 1"):
        load_dataset("tinyimagenet", "test", root=str(tmp_path))


# ------------------------------------------------------------------ CIFAR-5M

def test_cifar5m_parts(tmp_path):
    directory = tmp_path / "cifar5m"
    directory.mkdir()
    rng = np.random.default_rng(2)
    parts = []
    for i, n in ((0, 5), (2, 3)):  # parts need not all be present
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, n)
        np.savez(directory / f"cifar5m_part{i}.npz", X=x, Y=y)
        parts.append((x, y))
    ds = load_dataset("cifar5m", root=str(tmp_path))
    assert ds.images.shape == (8, 3, 32, 32) and ds.num_classes == 10
    assert ds.labels.tolist() == parts[0][1].tolist() + parts[1][1].tolist()
    # NHWC on disk -> NCHW: image 6 is image 1 of part 2; pixel (row 4, column 30), red
    assert ds.images[6, 0, 4, 30] == parts[1][0][1, 4, 30, 0]
    with pytest.raises(UserError, match="probe on CIFAR-10"):
        load_dataset("cifar5m", "test", root=str(tmp_path))


def test_cifar5m_wrong_arrays_is_corrupt(tmp_path):
    (tmp_path / "cifar5m").mkdir()
    np.savez(tmp_path / "cifar5m" / "cifar5m_part0.npz", X=np.zeros((2, 3, 32, 32), np.uint8), Y=np.zeros(2))
    with pytest.raises(DataMissingError, match="corrupt"):
        load_dataset("cifar5m", root=str(tmp_path))


def test_cifar5m_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(DataMissingError) as e:
        load_dataset("cifar5m", root=str(tmp_path))
    assert str(tmp_path / "cifar5m") in str(e.value) and "github.com/preetum/cifar5m" in str(e.value)


# ------------------------------------------------------------------ digits, folder

def test_digits_split():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) == 1437 and len(test) == 360 and train.images.shape[1:] == (1, 8, 8)
    assert train.images.max() == 255 and test.num_classes == 10
    assert test.labels.bincount().min() >= 35  # stratified: about 36 per class
    assert torch.equal(load_dataset("digits", "test").images, test.images)


def test_folder(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for k, cls in enumerate(["cat", "dog"]):
            for j in range(n):
                path = tmp_path / split / cls / f"{j}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (20, 20), (k * 200, j * 50, 7)).save(path)
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"garbage")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="skipped 1 unreadable file"):
        train = load_dataset("folder", "train", path=str(tmp_path))
    assert train.images.shape == (6, 3, 20, 20) and train.classes == ("cat", "dog") and train.num_classes == 2
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.images[4, :, 0, 0].tolist() == [200, 50, 7]
    test = load_dataset("folder", "test", path=str(tmp_path))
    assert len(test) == 4


def test_folder_missing(tmp_path):
    with pytest.raises(DataMissingError, match="does not exist"):
        load_dataset("folder", path=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="data.path"):
        load_dataset("folder")


# ------------------------------------------------------------------ missing data, names

def test_missing_names_places_and_command(tmp_path):
    with pytest.raises(DataMissingError) as e:
        load_dataset("cifar100", "test", root=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "cifar-100-python") in msg
    assert f"randteach data fetch cifar100 --data.root {tmp_path}" in msg


def test_missing_file_in_existing_folder(tmp_path, write_cifar10):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar10(directory)
    (directory / "data_batch_4").unlink()
    with pytest.raises(DataMissingError, match="missing data_batch_4"):
        load_dataset("cifar10", root=str(tmp_path))


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(UserError, match="valid names"):
        load_dataset("imagenet", root=str(tmp_path))
    with pytest.raises(UserError, match="valid splits"):
        load_dataset("cifar10", "unlabeled", root=str(tmp_path))


# ------------------------------------------------------------------ the real Fashion-MNIST (Debian package)

needs_debian = pytest.mark.skipif(not Path(DEBIAN_FASHION_MNIST).is_dir(),
                                  reason="Debian package dataset-fashion-mnist not installed")


@needs_debian
def test_real_fashion_mnist(tmp_path):
    train = load_dataset("fashion-mnist", "train", root=str(tmp_path))  # empty root: the Debian copy
    test = load_dataset("fashion-mnist", "test", root=str(tmp_path))
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.num_classes == 10 and train.classes[9] == "Ankle boot"
    assert train.labels.bincount().tolist() == [6000] * 10 and test.labels.bincount().tolist() == [1000] * 10


@needs_debian
def test_a_named_root_that_does_not_exist_is_noted_once_when_the_data_comes_from_elsewhere(tmp_path, capsys):
    load_dataset("fashion-mnist", "test", root=str(tmp_path))  # an empty root that exists: nothing to say
    assert "note" not in capsys.readouterr().err
    missing = tmp_path / "typo"
    for _ in range(2):
        load_dataset("fashion-mnist", "test", root=str(missing))
    err = capsys.readouterr().err
    assert err.count(f"note: data.root {missing} does not exist; Fashion-MNIST was read from "
                     f"{DEBIAN_FASHION_MNIST}") == 1, err


@needs_debian
def test_the_missing_root_note_comes_from_torchruns_rank_0_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # what torchrun sets in its second process
    load_dataset("fashion-mnist", "test", root=str(tmp_path / "typo-on-rank-1"))
    assert "note" not in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    load_dataset("fashion-mnist", "test", root=str(tmp_path / "typo-on-rank-0"))
    assert "typo-on-rank-0 does not exist" in capsys.readouterr().err


@needs_debian
def test_real_fashion_mnist_checksums():
    for remote in DATASETS["fashion-mnist"].remote:
        content = gzip.decompress((Path(DEBIAN_FASHION_MNIST) / remote.filename).read_bytes())
        assert hashlib.md5(content).hexdigest() == remote.raw_md5, remote.filename


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_torchvision_layout_is_found(tmp_path, name, folder):
    # torchvision.datasets.MNIST(root) keeps <root>/MNIST/raw/*-ubyte (and the .gz it downloaded)
    written = write_mnist(tmp_path / folder / "raw", n_train=7, n_test=3, gz=False)
    for split in ("train", "test"):
        data = load_dataset(name, split, root=str(tmp_path))
        assert data.labels.tolist() == written[split][1].tolist()
        assert torch.equal(data.images[:, 0], torch.from_numpy(written[split][0]))


def test_randteach_folder_comes_before_torchvision_layout(tmp_path):
    ours = write_mnist(tmp_path / "mnist", n_train=4, n_test=2)
    write_mnist(tmp_path / "MNIST" / "raw", n_train=9, n_test=2)
    assert len(load_dataset("mnist", "train", root=str(tmp_path))) == len(ours["train"][0])


def test_missing_mnist_names_the_torchvision_folder_it_looked_in(tmp_path):
    with pytest.raises(DataMissingError, match=r"MNIST/raw"):
        load_dataset("mnist", "train", root=str(tmp_path))
