"""scikit-learn's digits: 1,797 real 8x8 greyscale digits, shipped inside scikit-learn.

Pixel values 0..16 are scaled to 0..255. The split is fixed: a class-stratified 360-image test set
(seed 0) and the remaining 1,437 images for training.
"""
from __future__ import annotations

import numpy as np
import torch

from .images import ImageData, from_numpy, stratified_subset

TEST_SIZE = 360
SPLIT_SEED = 0


def load(split: str = "train", *, name: str = "digits") -> ImageData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    test = stratified_subset(torch.from_numpy(labels), TEST_SIZE, seed=SPLIT_SEED).numpy()
    keep = np.zeros(len(labels), bool)
    keep[test] = True
    if split == "train":
        keep = ~keep
    names = [str(c) for c in bunch.target_names]
    return from_numpy(images[keep], labels[keep], len(names), name, names)
