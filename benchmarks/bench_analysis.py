"""Probe times at the paper's scale and landscape points per second, through the project's own functions.

Probe features: Fashion-MNIST pixels (60,000 train, 10,000 test, real labels) through one random ReLU
layer 784 -> 512 (He init, seed 0): real-data features of the shape a VGG11/ResNet18 encoder gives,
cheap to make. Landscape: `randteach.analysis.landscape.compute_landscape` (functional_call at every
point, no model rebuilt) on a plane through three random inits of the benchmark's model, loss only.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from randteach.analysis.landscape import Anchor, compute_landscape
from randteach.config import build_config
from randteach.data import load_dataset
from randteach.models import build_model
from randteach.probes.linear_knn import knn_probe, linear_probe
from randteach.train.setup import model_image_size
from randteach.train.supervised import RunInfo


def probe_features(data: str = "fashion-mnist", dim: int = 512, n_train: int | None = None,
                   n_test: int | None = None) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, test_x, test_y): flattened pixels in [0, 1] through a random ReLU layer."""
    train, test = load_dataset(data, "train"), load_dataset(data, "test")
    train_x = train.images[:n_train].flatten(1).float() / 255
    test_x = test.images[:n_test].flatten(1).float() / 255
    w = torch.randn(train_x.shape[1], dim, generator=torch.Generator().manual_seed(0)) * (2 / train_x.shape[1]) ** 0.5
    return (train_x @ w).relu(), train.labels[:n_train], (test_x @ w).relu(), test.labels[:n_test]


def probe_times(reps: int = 2, threads: tuple[int, ...] = (1,), device: str = "cpu", **feature_kw) -> dict:
    """Wall and process-CPU seconds (all repetitions and medians) and accuracy of the linear (logreg) and
    k-NN (k = 20, cosine) probes with their defaults, per torch thread count, linear and k-NN alternating.
    The top-level "linear"/"knn" entries are those of the first thread count. On a GPU the features start
    on the GPU, and each timing ends with the probe's accuracy back on the host."""
    train_x, train_y, test_x, test_y = (t.to(device) for t in probe_features(**feature_kw))
    runs = {"linear": lambda: linear_probe(train_x, train_y, test_x, test_y, device=device),
            "knn": lambda: knn_probe(train_x, train_y, test_x, test_y, device=device)}
    before = torch.get_num_threads()
    by_threads = {}
    try:
        for n in threads:
            torch.set_num_threads(n)
            out = {name: {"seconds": [], "cpu_seconds": []} for name in runs}
            for _ in range(reps):
                for name, fn in runs.items():
                    start, start_cpu = time.perf_counter(), time.process_time()
                    out[name]["accuracy"] = fn()
                    out[name]["seconds"].append(time.perf_counter() - start)
                    out[name]["cpu_seconds"].append(time.process_time() - start_cpu)
            for r in out.values():
                r["median_s"] = statistics.median(r["seconds"])
                r["median_cpu_s"] = statistics.median(r["cpu_seconds"])
            by_threads[n] = out
    finally:
        torch.set_num_threads(before)
    source = f"{feature_kw.get('data', 'fashion-mnist')} pixels through a random ReLU layer (He init, seed 0)"
    return {**by_threads[threads[0]], "threads": {str(n): r for n, r in by_threads.items()}, "source": source,
            "shape": {"train": list(train_x.shape), "test": list(test_x.shape)}}


def landscape_rate(overrides: dict[str, str], grid: int = 3, n_loss: int = 256,
                   device: str = "cpu") -> dict:
    """Points per second of a loss-only landscape (`compute_landscape`, probe=False) on a grid x grid plane.

    Setup (data, teacher outputs) is paid once per call: the rate is (k - 1) points over the time of a
    k-point call minus that of a one-point call, k = grid^2 - 1 (one point short of the full grid, so no
    plot is drawn)."""
    cfg = build_config("cpu", None, overrides)
    data = load_dataset(cfg.data.name, "train")
    size = model_image_size(cfg, data.images.shape[-1])
    channels = data.images.shape[1]
    anchors = [Anchor(f"seed{s}", build_model(cfg, channels, size, seed=s).state_dict(), f"seed {s}")
               for s in (1, 2, 3)]
    k = grid * grid - 1
    wall, cpu = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        run = RunInfo(Path(tmp), cfg, channels, size)
        for limit in (1, k):
            start, start_cpu = time.perf_counter(), time.process_time()
            compute_landscape(anchors, run, Path(tmp) / str(limit), grid=grid, n_loss=n_loss, probe=False, limit=limit,
                              device=device)
            wall[limit], cpu[limit] = time.perf_counter() - start, time.process_time() - start_cpu
    return {"points": k, "n_loss": n_loss, "device": device, "k_points_s": wall[k], "one_point_s": wall[1],
            "points_per_s": _rate(k - 1, wall[k] - wall[1]), "points_per_s_with_setup": k / wall[k],
            "points_per_cpu_s": _rate(k - 1, cpu[k] - cpu[1])}


def _rate(points: int, seconds: float) -> float:
    """Points per second, NaN where the k-point call was not measurably slower than the one-point call (a
    model so small that the points cost less than the machine's noise): no rate, rather than a negative one."""
    return points / seconds if seconds > 0 else float("nan")
