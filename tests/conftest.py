"""Shared fixtures."""
import os
import pickle

import numpy as np
import pytest

@pytest.fixture(autouse=True, scope="session")
def _session_data_root(tmp_path_factory):
    """One data root for the whole session, not the user's cache: the caches the tests fill there (teacher
    targets, probe results) never come from an earlier session, so no test passes or fails by what ran
    before it. Fashion-MNIST is still found at the Debian package's path; subprocesses inherit the root."""
    if "RANDTEACH_DATA" not in os.environ:
        os.environ["RANDTEACH_DATA"] = str(tmp_path_factory.mktemp("data-root"))
    yield


@pytest.fixture
def one_thread():
    """One torch thread for tests of many small ops: on 2 shared cores, two OpenMP threads wait on each other
    far longer than the work takes (measured: 1.1 s vs 0.01 s per tiny step). No result depends on it."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


@pytest.fixture
def write_cifar10():
    """Writes a small CIFAR-10 in the official python-pickle layout; returns (images (N,3,32,32), labels) per split.

    Rows of `data` are the R, G and B planes, each 32x32 row-major, as the CIFAR page describes.
    """
    def write(directory, per_batch=4, seed=0):
        rng = np.random.default_rng(seed)
        directory.mkdir(parents=True, exist_ok=True)
        out = {"train": [], "test": []}
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            labels = [int(x) for x in rng.integers(0, 10, per_batch)]
            with open(directory / name, "wb") as f:
                pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                             b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
            out["test" if name == "test_batch" else "train"].append((data, labels))
        with open(directory / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": CIFAR10_NAMES, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f,
                        protocol=2)
        return {split: (np.concatenate([d for d, _ in parts]), np.concatenate([l for _, l in parts]))
                for split, parts in out.items()}
    return write
