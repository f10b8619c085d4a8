"""Image folders: layouts, the held-out split, one decode then the cache, invalidation, and the CLI end to end."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from randteach.config import build_config
from randteach.data import folder, load_dataset
from randteach.errors import DataMissingError, UserError
from randteach.probes.embedding import load_probe_splits
from randteach.runs.rundir import RunDir

CLASSES = ("a", "b", "c")  # sorted, so class k is label k


def write_png(path, label, side=16, seed=0, mode="RGB", size=None):
    """A class-coloured image with a little noise: class k is about 40 + 80k grey levels."""
    rng = np.random.default_rng(seed)
    w, h = size or (side, side)
    pixels = np.clip(40 + 80 * label + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)


def write_folder(base, counts=(("train", 6), ("test", 3)), **kw):
    for split, n in counts:
        for k, cls in enumerate(CLASSES):
            for j in range(n):
                write_png(base / split / cls / f"{j}.png", k, seed=hash((split, k, j)) % 1000, **kw)
    return base


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    """Caches go under the data root: a fresh one per test, never the user's."""
    monkeypatch.setenv("RANDTEACH_DATA", str(tmp_path / "root"))
    return tmp_path / "root"


def cache_files(root):
    return list((root / "folder-cache").glob("*/*.npz"))


@pytest.fixture
def decodes(monkeypatch):
    """Counts decode passes over a folder."""
    calls = []
    real = folder.read_images

    def counting(*args):
        calls.append(len(args[0]))
        return real(*args)
    monkeypatch.setattr(folder, "read_images", counting)
    return calls


def test_split_folders_are_decoded_once_then_read_from_the_cache(tmp_path, decodes, data_root):
    base = write_folder(tmp_path / "imgs")
    (base / "train" / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.warns(UserWarning, match=r"27 images in 3 classes \(train 18, test 9\).*skipped 1 unreadable "
                                         r"file of 28: train/b/broken.png"):
        train = load_dataset("folder", "train", path=str(base))
    assert train.images.shape == (18, 3, 16, 16) and train.classes == CLASSES
    assert train.labels.bincount().tolist() == [6, 6, 6]
    test = load_dataset("folder", "test", path=str(base))
    assert len(test) == 9 and decodes == [28]                 # one pass decoded both splits
    cache, = cache_files(data_root)
    stamp = cache.stat().st_mtime_ns

    again = load_dataset("folder", "train", path=str(base))
    assert decodes == [28] and cache.stat().st_mtime_ns == stamp
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)

    write_png(base / "train" / "c" / "new.png", 2)            # a file added: decoded again, stale cache gone
    with pytest.warns(UserWarning, match="28 images"):
        assert len(load_dataset("folder", "train", path=str(base))) == 19 and decodes == [28, 29]
    assert not cache.exists() and len(cache_files(data_root)) == 1 and not (base / ".randteach-cache").exists()

    first = base / "train" / "a" / "0.png"                 # a file changed in place
    Image.new("RGB", (16, 16), (255, 0, 0)).save(first)
    with pytest.warns(UserWarning, match="broken.png"):
        changed = load_dataset("folder", "train", path=str(base))
    assert decodes == [28, 29, 29] and changed.images[0, :, 0, 0].tolist() == [255, 0, 0]


def test_cache_report_line_on_reuse(tmp_path, capsys, data_root):
    base = write_folder(tmp_path / "imgs")
    load_dataset("folder", "train", path=str(base))
    assert "decoded in" in capsys.readouterr().err
    folder._reported.clear()
    load_dataset("folder", "train", path=str(base))
    err = capsys.readouterr().err
    assert "27 images in 3 classes (train 18, test 9)" in err and f"read from cache {data_root / 'folder-cache'}" in err


def test_flat_folder_holds_out_a_stratified_fifth(tmp_path):
    base = tmp_path / "flat"
    for k, cls in enumerate(CLASSES):
        for j in range(10):
            write_png(base / cls / f"{j}.png", k, seed=10 * k + j)
    train = load_dataset("folder", "train", path=str(base))
    test = load_dataset("folder", "test", path=str(base))
    assert len(train) == 24 and len(test) == 6 and test.labels.bincount().tolist() == [2, 2, 2]
    both = torch.cat([train.images, test.images]).flatten(1)
    assert len({tuple(x.tolist()) for x in both}) == 30       # disjoint, and together every image
    assert torch.equal(load_dataset("folder", "test", path=str(base)).images, test.images)  # deterministic
    cfg = build_config(None, None, {"data.name": "folder", "data.path": str(base), "data.test_fraction": "0.5"})
    half = load_probe_splits(cfg)
    assert len(half.train) == len(half.test) == 15 and half.test.labels.bincount().tolist() == [5, 5, 5]
    assert len({tuple(x.tolist()) for x in torch.cat([half.train.images, half.test.images]).flatten(1)}) == 30
    with pytest.raises(UserError, match="test_fraction=1.5"):
        load_dataset("folder", "test", path=str(base), test_fraction=1.5)


def test_mixed_sizes_and_modes_give_one_format_for_both_splits(tmp_path):
    base = tmp_path / "mixed"
    write_png(base / "train" / "a" / "0.png", 0, mode="L", size=(12, 12))
    write_png(base / "train" / "b" / "0.png", 1, size=(40, 30))
    write_png(base / "test" / "a" / "0.png", 0, mode="L", size=(12, 12))
    train = load_dataset("folder", "train", path=str(base))
    test = load_dataset("folder", "test", path=str(base))
    assert train.images.shape == (2, 3, 64, 64) and test.images.shape == (1, 3, 64, 64)
    same = tmp_path / "same"                                   # one non-square size: center crop, no resize
    write_png(same / "a" / "0.png", 0, mode="L", size=(20, 14))
    write_png(same / "b" / "0.png", 1, mode="L", size=(20, 14))
    assert load_dataset("folder", "train", path=str(same)).images.shape == (2, 1, 14, 14)


def test_cache_follows_data_root_else_stays_in_the_folder(tmp_path, decodes, data_root):
    base = write_folder(tmp_path / "imgs", counts=(("train", 2), ("val", 1)))
    other = tmp_path / "other-root"                            # --data.root beats $RANDTEACH_DATA
    load_dataset("folder", "test", root=str(other), path=str(base))
    assert len(load_dataset("folder", "train", root=str(other), path=str(base))) == 6 and decodes == [9]
    assert len(cache_files(other)) == 1 and not cache_files(data_root)
    cfg = build_config(None, None, {"data.name": "folder", "data.path": str(base), "data.root": str(other)})
    load_probe_splits(cfg)                                     # the config's data root reaches the folder
    assert decodes == [9]
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")                 # an unwritable data root
    load_dataset("folder", "test", root=str(blocked), path=str(base))
    assert decodes == [9, 9] and len(list((base / ".randteach-cache").glob("*.npz"))) == 1
    load_dataset("folder", "train", root=str(blocked), path=str(base))
    assert decodes == [9, 9]                                   # read back from inside the folder


def test_folder_errors_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative data.path (as a run records it) names where it was read from
    with pytest.raises(DataMissingError, match=f"folder imgs does not exist .a relative data.path is read from the "
                                               f"current folder: {tmp_path}/imgs; .*from the folder it was started in"):
        load_dataset("folder", path="imgs")
    with pytest.raises(DataMissingError, match=f"folder {tmp_path}/gone does not exist; expected"):
        load_dataset("folder", path=str(tmp_path / "gone"))
    base = write_folder(tmp_path / "only-train", counts=(("train", 2),))
    with pytest.raises(UserError, match="no test/ or val/ folder"):
        load_dataset("folder", "test", path=str(base))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataMissingError, match="no images"):
        load_dataset("folder", path=str(tmp_path / "empty"))
    # found by a data walkthrough: each was silent or said something else
    write_png(tmp_path / "one.png", 0)
    with pytest.raises(UserError, match="data.path .*one.png is a file; give the folder"):  # "does not exist"
        load_dataset("folder", path=str(tmp_path / "one.png"))
    few = tmp_path / "few"
    for k, cls in enumerate(CLASSES):
        write_png(few / cls / "0.png", k)
    with pytest.raises(DataMissingError, match="data.test_fraction 0.1 of its 3 images rounds to none: add images"):
        load_dataset("folder", "test", path=str(few), test_fraction=0.1)
    (few / "d").mkdir()  # an empty class folder: a class no image has
    with pytest.warns(UserWarning, match="class folder.s. d hold no readable image"):
        load_dataset("folder", "test", path=str(few), test_fraction=0.5)
    (tmp_path / "junk" / "cls").mkdir(parents=True)
    (tmp_path / "junk" / "cls" / "x.png").write_bytes(b"junk")
    with pytest.raises(DataMissingError, match="none of the 1 image files"):
        load_dataset("folder", path=str(tmp_path / "junk"))
    extra = write_folder(tmp_path / "extra", counts=(("train", 1), ("test", 1)))
    write_png(extra / "test" / "zebra" / "0.png", 0)
    with pytest.raises(UserError, match="zebra"):
        load_dataset("folder", "test", path=str(extra))
    # data.path one level too high: a class folder holding a run folder, whose figures are PNGs too
    high = tmp_path / "high"
    write_png(high / "images" / "cat" / "0.png", 0)
    run = high / "runs" / "run-1a2b"
    write_png(run / "probes.png", 1)
    (run / "config.yaml").write_text("name: run\n")
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="run-1a2b is a randteach run folder.*sub-folders are the classes"):
        load_dataset("folder", path=str(high))


def test_cli_distills_and_probes_an_image_folder(tmp_path):
    base = write_folder(tmp_path / "imgs", counts=(("train", 16), ("val", 8)))
    (base / "val" / "c" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "randteach.cli", "--quiet", "distill", "--preset", "cpu",
                        "--data.name", "folder", "--data.path", str(base), "--model.width", "8",
                        "--head.hidden_dims", "[32]", "--head.bottleneck_dim", "8", "--head.out_dim", "32",
                        "--train.epochs", "1", "--train.device", "cpu", "--probe.max_iter", "50",
                        "--out", str(out)], capture_output=True, text=True,
                       env={**os.environ, "RANDTEACH_DATA": str(tmp_path / "root"), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "72 images in 3 classes (train 48, test 24)" in r.stderr
    assert "skipped 1 unreadable file of 73: val/c/broken.png" in r.stderr
    summary = RunDir(out).summary()
    assert summary["status"] == "completed"
    assert summary["probe"]["student"]["linear"] > 0.9 and summary["probe"]["input"]["linear"] > 0.9  # 3 separable classes


def test_sixteen_bit_and_float_greyscale_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit PNG's 0...65535 become 0...255 (Pillow's convert("L") made every value above 255 white)."""
    from randteach.data.decode import read_images
    ramp = np.arange(0, 65536, 257, dtype=np.uint16)[:256].reshape(16, 16)           # 0, 257, ..., 65535
    Image.fromarray(ramp).save(tmp_path / "deep.png")                                # mode I;16
    Image.fromarray((ramp / 65535).astype(np.float32)).save(tmp_path / "float.tif")   # mode F
    Image.fromarray((ramp / 65535 * 2).astype(np.float32)).save(tmp_path / "bright.tif")
    images, ok, failed = read_images([tmp_path / "deep.png", tmp_path / "float.tif", tmp_path / "bright.tif"],
                                     "L", (16, 16))
    want = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    assert ok == [0, 1] and np.array_equal(images[0], want) and np.abs(images[1].astype(int) - want).max() <= 1
    assert len(failed) == 1 and "outside [0, 1]" in failed[0][1]


def test_a_class_named_like_a_split_is_a_class(tmp_path):
    """CIFAR-100 has a class "train": a flat folder with it is not a split layout."""
    base = tmp_path / "vehicles"
    for k, cls in enumerate(("bus", "car", "train")):
        for j in range(5):
            write_png(base / cls / f"{j}.png", k, seed=10 * k + j)
    train, test = (load_dataset("folder", split, path=str(base)) for split in ("train", "test"))
    assert train.num_classes == 3 and len(train) + len(test) == 15 and test.labels.bincount().tolist() == [1, 1, 1]


def test_a_labelled_val_folder_is_not_hidden_by_an_unlabelled_test_folder(tmp_path):
    base = write_folder(tmp_path / "kaggle", counts=(("train", 3), ("val", 2)))
    write_png(base / "test" / "0.png", 0)  # a competition's test images: no class folders
    test = load_dataset("folder", "test", path=str(base))
    assert len(test) == 2 * len(CLASSES) and test.num_classes == len(CLASSES)


def test_probing_or_resuming_a_run_on_a_changed_folder_warns(tmp_path):
    """With --out the address does not follow the folder's contents: the run records them when it begins, and a
    probe or resume on a folder changed since says so (it read the changed folder without a word)."""
    from randteach.probes.run import probe_run
    from randteach.train.loop import distill
    base = write_folder(tmp_path / "imgs", counts=(("train", 8), ("test", 4)))
    cfg = build_config("cpu", overrides={"data.name": "folder", "data.path": str(base), "model.width": 8,
                                         "head.hidden_dims": [32], "head.bottleneck_dim": 8, "head.out_dim": 32,
                                         "train.epochs": 1, "probe.which": ["student"], "probe.max_iter": 20,
                                         "probe.knn_k": 3, "out": str(tmp_path / "run")})
    distill(cfg, progress=False)
    run = RunDir(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the folder as it was: no warning
        probe_run(run.path, progress=False)
    write_png(base / "train" / "a" / "extra.png", 0, seed=99)
    with pytest.warns(UserWarning, match=r"probing .*run: its image folder .* has changed since the run began "
                                         r"\(36 image files then, 37 now"):
        probe_run(run.path, progress=False)
    (run.path / "summary.json").unlink()  # a run killed after its last checkpoint: the distill resumes it
    with pytest.warns(UserWarning, match="resuming .*run: its image folder .* has changed"):
        distill(cfg, progress=False)
    # a run started again from its first step (stopped before its first checkpoint) records the folder anew:
    # it warned of a resume and kept the old record
    (run.path / "checkpoints" / "last.pt").unlink()
    (run.path / "summary.json").write_text('{"status": "interrupted", "steps": 0}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distill(cfg, progress=False)
        probe_run(run.path, progress=False)
