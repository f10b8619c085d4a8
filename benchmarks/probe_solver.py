"""Logistic-regression probe: the fused objective-and-gradient solver against the same L-BFGS driven by autograd.

Both fit the same 60,000 x 512 features (Fashion-MNIST pixels through a random ReLU layer, as in
bench_analysis.py) to the probe's tolerance, alternating within each round so that both see the same machine
state; printed per round: seconds, L-BFGS iterations and test accuracy of each, and the time ratio.
Run from the repository root (one core is what docs/PERFORMANCE.md reports):
`PYTHONPATH=src OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/probe_solver.py [ROUNDS]`.
`... probe_solver.py profile` instead prints torch.profiler's top operators over one fit of the fused solver.
"""
import sys
import time

import torch

from bench_analysis import probe_features
from randteach.probes.linear_knn import PROBE_TOL, fit_logistic_regression, logistic_objective, standardize


def fit_with_autograd(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-4, tol: float = PROBE_TOL):
    """The baseline: the probe's L-BFGS settings, gradient by autograd through `logistic_objective`."""
    weight = torch.zeros(10, x.shape[1], requires_grad=True)
    bias = torch.zeros(10, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=500, tolerance_grad=tol,
                            tolerance_change=torch.finfo(torch.float64).eps, history_size=100,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = logistic_objective(weight, bias, x, y, l2)
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach(), opt.state[weight].get("n_iter", 0)


def fit_fused(x: torch.Tensor, y: torch.Tensor):
    fit = fit_logistic_regression(x, y, 10, l2=1e-4, tol=PROBE_TOL)
    return fit.weight, fit.bias, fit.n_iter


def main(rounds: int) -> None:
    train_x, train_y, test_x, test_y = probe_features()
    z_train, z_test = standardize(train_x, test_x)
    for r in range(rounds):
        seconds = {}
        for name, fit in (("autograd", fit_with_autograd), ("fused", fit_fused)):
            t0 = time.perf_counter()
            weight, bias, iters = fit(z_train, train_y.long())
            seconds[name] = time.perf_counter() - t0
            acc = float(((z_test @ weight.T + bias).argmax(1) == test_y.long()).double().mean())
            print(f"round {r} {name:8s}: {seconds[name]:.2f} s, {iters} iterations, test accuracy {100 * acc:.2f} %",
                  flush=True)
        print(f"round {r}: fused is {seconds['autograd'] / seconds['fused']:.2f}x the autograd solver "
              f"(threads {torch.get_num_threads()}, load {open('/proc/loadavg').read().split()[0]})", flush=True)


def profile_fit(top: int = 10) -> None:
    """Where one fit's time goes: self CPU time per operator, with its share (the profiler's own overhead
    weighs more on the many small operators than on the two products)."""
    from torch.profiler import profile
    train_x, train_y, test_x, _ = probe_features()
    z_train, _ = standardize(train_x, test_x)
    with profile() as prof:
        _, _, iters = fit_fused(z_train, train_y.long())
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"one fit: {iters} iterations, {total / 1e6:.2f} s of operator time (threads {torch.get_num_threads()})")
    for e in events[:top]:
        print(f"{e.key[:40]:<40} {e.self_cpu_time_total / 1e6:8.2f} s {e.self_cpu_time_total / total:7.1%} "
              f"{e.count:7d} calls")


if __name__ == "__main__":
    if sys.argv[1:] == ["profile"]:
        profile_fit()
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
