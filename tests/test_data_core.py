"""ImageData, stratified subsets, noise inputs, Preprocess and the data root."""
from pathlib import Path

import numpy as np
import pytest
import torch

from randteach.data import ImageData, Preprocess, noise_like, resolve_root, stratified_subset
from randteach.data.preprocess import Widen


def make_data(n=40, channels=3, side=6, seed=0, num_classes=4):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, side, side), generator=g, dtype=torch.uint8)
    return ImageData(images, torch.arange(n) % num_classes, num_classes, "toy")


# ------------------------------------------------------------------ ImageData

def test_imagedata_subset_and_checks():
    data = make_data()
    sub = data.subset(torch.tensor([3, 1]))
    assert len(sub) == 2 and sub.num_classes == 4 and sub.name == "toy"
    assert torch.equal(sub.images[0], data.images[3]) and sub.labels.tolist() == [3, 1]
    assert sub.images.is_contiguous()
    assert len(data.subset([0, 2, 4])) == 3 and len(data.subset(slice(0, 5))) == 5
    with pytest.raises(ValueError, match="uint8 or float"):
        ImageData(torch.zeros(2, 1, 3, 3, dtype=torch.int32), torch.zeros(2, dtype=torch.long), 2, "x")
    assert ImageData(torch.zeros(2, 1, 3, 3), torch.zeros(2), 2, "x").images.dtype == torch.float32  # Python API
    with pytest.raises(ValueError, match="labels"):
        ImageData(torch.zeros(2, 1, 3, 3, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), 2, "x")


# ------------------------------------------------------------------ stratified_subset

def test_stratified_subset_proportions_and_determinism():
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]
    idx = stratified_subset(labels, 100, seed=3)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100
    assert torch.equal(idx, idx.sort().values)
    assert labels[idx].bincount().tolist() == [50, 30, 20]
    assert torch.equal(idx, stratified_subset(labels, 100, seed=3))
    assert not torch.equal(idx, stratified_subset(labels, 100, seed=4))


def test_stratified_subset_remainders():
    labels = torch.tensor([0] * 7 + [1] * 7 + [2] * 6)   # 10 of 20: exact shares 3.5, 3.5, 3
    counts = labels[stratified_subset(labels, 10)].bincount().tolist()
    assert counts == [4, 3, 3]
    for n in (0, 1, 13, 19):
        assert len(stratified_subset(labels, n)) == n
    assert stratified_subset(labels, 20).tolist() == list(range(20))
    assert stratified_subset(labels, 50).tolist() == list(range(20))
    with pytest.raises(ValueError):
        stratified_subset(labels, -1)


# ------------------------------------------------------------------ noise_like

def test_noise_like():
    data = make_data(n=200, side=8)
    x = noise_like(data, std=2.0, seed=5)
    # stored in bf16 (half of fp32's memory): the fp32 Gaussian draws of the seed, rounded
    assert x.dtype == torch.bfloat16 and x.shape == data.images.shape
    fp32 = torch.randn(x.numel(), generator=torch.Generator().manual_seed(5)).mul_(2.0)
    assert torch.equal(x.flatten(), fp32.to(torch.bfloat16))
    assert abs(x.float().mean().item()) < 0.05 and abs(x.float().std().item() - 2.0) < 0.05
    assert torch.equal(x, noise_like(data, std=2.0, seed=5))
    assert not torch.equal(x, noise_like(data, std=2.0, seed=6))
    assert noise_like(data, size=32).shape == (200, 3, 32, 32)
    assert Widen()(x).dtype == torch.float32 and torch.equal(Widen()(x), x.float())


# ------------------------------------------------------------------ Preprocess

def test_preprocess_fit_matches_numpy():
    data = make_data(n=5000 + 17, side=5)  # more than one statistics chunk
    pre = Preprocess.fit(data)
    x = data.images.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(pre.mean, x.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(pre.std, x.std(axis=(0, 2, 3)), rtol=1e-8)
    y = pre(data.images[:10])
    assert y.dtype == torch.float32 and y.shape == (10, 3, 5, 5)
    expected = (x[:10] - x.mean(axis=(0, 2, 3))[:, None, None]) / x.std(axis=(0, 2, 3))[:, None, None]
    np.testing.assert_allclose(y.numpy(), expected, atol=1e-5)
    assert pre.out_size == 5 and pre.channels == 3
    assert Preprocess(**pre.as_dict()).mean == pre.mean


def test_preprocess_pads_centered():
    data = make_data(n=3, channels=1, side=28)
    pre = Preprocess([0.5], [0.25], size=32)
    y = pre(data.images)
    assert y.shape == (3, 1, 32, 32) and pre.out_size == 32
    inner = (data.images.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(y[:, :, 2:30, 2:30], inner)
    border = torch.ones_like(y, dtype=torch.bool)
    border[:, :, 2:30, 2:30] = False
    assert torch.all(y[border] == (0 - 0.5) / 0.25)  # zero (black) pixels, normalized


def test_preprocess_resizes_larger_and_single_image():
    data = make_data(n=2, side=64)
    pre = Preprocess([0.5] * 3, [0.5] * 3, size=32)
    assert pre(data.images).shape == (2, 3, 32, 32)
    flat = ImageData(torch.full((1, 3, 64, 64), 255, dtype=torch.uint8), torch.zeros(1), 1, "white")
    torch.testing.assert_close(pre(flat.images), torch.ones(1, 3, 32, 32))
    assert pre(data.images[0]).shape == (3, 32, 32)
    with pytest.raises(TypeError, match="uint8"):
        pre(data.images.float())
    with pytest.raises(ValueError, match="channels|expected images"):
        Preprocess([0.5], [0.5])(data.images)


# ------------------------------------------------------------------ data root

def test_resolve_root(monkeypatch, tmp_path):
    monkeypatch.setenv("RANDTEACH_DATA", str(tmp_path / "env"))
    assert resolve_root(str(tmp_path / "explicit")) == tmp_path / "explicit"
    assert resolve_root() == tmp_path / "env"
    monkeypatch.delenv("RANDTEACH_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_root() == tmp_path / "xdg" / "randteach"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_root() == Path.home() / ".cache" / "randteach"
