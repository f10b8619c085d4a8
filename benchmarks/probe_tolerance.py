"""Logistic-regression probe: test accuracy and L-BFGS iterations against the stopping tolerance.

Features: Fashion-MNIST pixels through a random ReLU layer 784 -> 512 (the shape of a VGG11 embedding), as in
bench_analysis.py. Run from the repository root: `PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/probe_tolerance.py`.
"""
import sys
import time

import torch

from randteach.config import build_config
from randteach.data import load_configured
from randteach.probes.linear_knn import fit_logistic_regression, standardize

TOLS = [float(t) for t in sys.argv[1:]] or [1e-4, 3e-4, 5e-4, 1e-3, 3e-3, 1e-2]


def main():
    cfg = build_config("cpu")
    train, test = load_configured(cfg.data, "train"), load_configured(cfg.data, "test")
    weight = torch.randn(784, 512, generator=torch.Generator().manual_seed(0)) / 784 ** 0.5
    z_train, z_test = standardize((train.images.flatten(1).float() / 255 @ weight).relu(),
                                  (test.images.flatten(1).float() / 255 @ weight).relu())
    for tol in TOLS:
        t0 = time.perf_counter()
        fit = fit_logistic_regression(z_train, train.labels.long(), 10, l2=1e-4, max_iter=500, tol=tol)
        seconds = time.perf_counter() - t0
        acc = float(((z_test @ fit.weight.T + fit.bias).argmax(1) == test.labels.long()).double().mean())
        print(f"tol={tol:g}: iterations={fit.n_iter} accuracy={100 * acc:.2f} % time={seconds:.1f} s "
              f"threads={torch.get_num_threads()} load={open('/proc/loadavg').read().split()[0]}", flush=True)


if __name__ == "__main__":
    main()
