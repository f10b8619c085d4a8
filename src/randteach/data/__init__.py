"""Data: readers for each data set's official on-disk format, subsets, noise inputs and the fetcher.

    data = load_dataset("fashion-mnist", "train")        # ImageData: uint8 (N, C, H, W) + int64 labels
    pre = Preprocess.fit(data, size=32)                  # per-channel stats; pads 28 -> 32
    x = pre(data.images[:256].to(device))                # float32 (256, 1, 32, 32), on the device

Data sets are looked for under the data root (`resolve_root`); `fetch` downloads them there from
their official sources, checksums verified. Fashion-MNIST is also read from the Debian package's
path, and scikit-learn's digits ship with scikit-learn.
"""
from .fetcher import FetchError, extract_archive, fetch
from .images import ImageData, noise_like, stratified_subset
from .preprocess import Preprocess
from .registry import DATASETS, dataset_info, load_configured, load_dataset, load_distilled
from .roots import resolve_root

__all__ = ["ImageData", "load_dataset", "stratified_subset", "noise_like", "Preprocess", "resolve_root", "fetch",
           "FetchError", "extract_archive", "DATASETS", "dataset_info", "load_configured",
           "load_distilled"]
