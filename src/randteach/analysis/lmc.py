"""Linear mode connectivity (random-teacher paper Sec. 6, Fig. 9; Frankle et al. 2020).

From one start (optionally after L epochs of supervised training: 'random@1'), K supervised runs that
differ only in their data order and augmentation (recipe seed + 1 ... seed + K; the shared first L
epochs use the recipe's seed). For every pair i < j the test error is measured along
    theta(gamma) = gamma * theta_i + (1 - gamma) * theta_j,   gamma in linspace(0, 1, resolution),
so gamma = 1 is run i and gamma = 0 is run j.

Barrier height of a pair: max over gamma of  err(gamma) - [gamma err(1) + (1 - gamma) err(0)],
the largest rise of the test error above the straight line between the endpoint errors (>= 0, since
the endpoints themselves are on the grid); mean +- sample std over pairs per start. (Frankle et al. 2020
subtract the mean of the two endpoint errors instead; the two agree when the endpoint errors do.)

Batch norm: an interpolated network's running statistics are not those of its own activations, so
at every point on the path (endpoints included, right after each run finishes) they are recomputed
from `bn_batches` training batches (`recompute_bn_stats`); the endpoint errors are therefore those of
the same procedure, and gamma = 0 and 1 reproduce them exactly. Networks without batch norm are
interpolated as they are; bn_batches = 0 interpolates the running statistics with the weights instead.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..runs.checkpoint import load_checkpoint, save_checkpoint
from ..runs.rundir import changed_settings, write_json
from ..text import counted
from ..train.supervised import (Classifier, Recipe, RunInfo, SupervisedData, accuracy, build_classifier,
                                check_distinct, label_of, parse_start, provenance, recompute_bn_stats, rewind_step,
                                state_of, train_supervised)
from .params import interpolate_states

BARRIER = "max_gamma err(gamma) - (gamma err(1) + (1 - gamma) err(0)); err = test error; gamma = 1 is run i"


def barrier_height(gammas, errors) -> float:
    """max_gamma [err(gamma) - (gamma err(gamma=1) + (1 - gamma) err(gamma=0))] (see the module docstring)."""
    g = np.asarray(gammas, dtype=float)
    e = np.asarray(errors, dtype=float)
    return float(np.max(e - (g * e[-1] + (1 - g) * e[0])))


def _calibrate(model, data: SupervisedData, device, bn_batches: int, recipe: Recipe) -> None:
    if bn_batches > 0:
        recompute_bn_stats(model, data.train, data.preprocess, device, bn_batches, recipe.batch_size, recipe.seed)


def path_errors(model: Classifier, a: dict, b: dict, gammas, data: SupervisedData, device: torch.device, *,
                bn_batches: int, recipe: Recipe) -> list[float]:
    """Test error of gamma * a + (1 - gamma) * b for each gamma (BN statistics recomputed at each point)."""
    errors = []
    for g in gammas:
        model.load_state_dict(interpolate_states(a, b, float(g)))
        _calibrate(model, data, device, bn_batches, recipe)
        errors.append(1.0 - accuracy(model, data.test, data.preprocess, device))
    return errors


def lmc_series(run: RunInfo, start: str, data: SupervisedData, recipe: Recipe, device: torch.device, *,
               runs: int = 5, resolution: int = 11, bn_batches: int = 8, out: str | Path | None = None,
               progress: bool = False) -> dict:
    """K runs from one start and the error along the linear path between every pair (resumable per run)."""
    source, l_epochs = parse_start(start)
    n = len(data.train)
    l_step = rewind_step(recipe, n, l_epochs)
    out = Path(out) if out is not None else None
    model = build_classifier(run, source, data.num_classes, recipe.seed).to(device)
    settings = {"start": start, "recipe": asdict(recipe), "bn_batches": bn_batches, "n_train": n,
                "n_test": len(data.test), "data": data.train.name}
    spec = json.dumps(settings, sort_keys=True)
    start_state = None
    finals, endpoints = [], []
    for k in range(runs):
        seed = recipe.seed + 1 + k
        path = out / f"run{k}.pt" if out is not None else None
        if path is not None and path.exists():
            saved = load_checkpoint(path)
            if saved["spec"] != spec:
                changes = changed_settings(json.loads(saved["spec"]), settings)
                raise UserError(f"{path} was trained with other settings ({changes}); give those to continue, "
                                f"choose another --out, or delete {path.parent} to start over")
            finals.append(saved["model"])
            endpoints.append(json.loads(saved["record"]))
            continue
        if start_state is None:
            if l_step > 0:  # the shared first L epochs, with the recipe's own seed
                trunk = recipe.replace(epochs=l_step / recipe.steps_per_epoch(n), eval_every=0)
                train_supervised(model, data, trunk, device, progress=progress,
                                 desc=f"lmc {start} first {l_epochs:g} epochs")
            start_state = state_of(model)
        model.load_state_dict(start_state)
        result = train_supervised(model, data, recipe.replace(seed=seed), device, start_step=l_step,
                                  progress=progress, desc=f"lmc {start} run {k}")
        _calibrate(model, data, device, bn_batches, recipe)
        record = {"seed": seed, "test_error": 1.0 - accuracy(model, data.test, data.preprocess, device),
                  "test_error_before_bn_recompute": 1.0 - result["test_accuracy"],
                  "history": result["history"]}  # test accuracy every --eval-every epochs
        finals.append(state_of(model))
        endpoints.append(record)
        if path is not None:
            save_checkpoint({"model": finals[-1], "record": json.dumps(record), "spec": spec}, path)
    gammas = np.linspace(0.0, 1.0, resolution).tolist()
    pairs = []
    for i, j in itertools.combinations(range(runs), 2):
        errors = path_errors(model, finals[i], finals[j], gammas, data, device, bn_batches=bn_batches, recipe=recipe)
        pairs.append({"i": i, "j": j, "test_error": errors, "barrier": barrier_height(gammas, errors)})
    return {"start": start, "source": source, "rewind_epochs": l_epochs, "gammas": gammas, "runs": endpoints,
            "pairs": pairs, **barrier_stats(pairs)}


def barrier_stats(pairs: list[dict]) -> dict[str, float]:
    """Mean, sample std and max of the pairs' barriers (nan where there are too few)."""
    barriers = [p["barrier"] for p in pairs]
    return {"barrier_mean": float(np.mean(barriers)) if barriers else float("nan"),
            "barrier_std": float(np.std(barriers, ddof=1)) if len(barriers) > 1 else float("nan"),
            "barrier_max": float(np.max(barriers)) if barriers else float("nan")}


def run_lmc(run: RunInfo, starts: list[str], data: SupervisedData, recipe: Recipe, device: torch.device, *,
            out: str | Path, runs: int = 5, resolution: int = 11, bn_batches: int = 8,
            progress: bool = False) -> dict:
    """LMC for every start; writes OUT/lmc.json and OUT/lmc.png (one panel per start, like Fig. 9)."""
    check_distinct(starts)
    out = Path(out)
    series = [lmc_series(run, s, data, recipe, device, runs=runs, resolution=resolution, bn_batches=bn_batches,
                         out=out / label_of(s), progress=progress) for s in starts]
    result = {**provenance(run, data, recipe), "barrier_definition": BARRIER,
              "bn": f"statistics recomputed on {bn_batches} training batches at every point" if bn_batches
              else "statistics interpolated with the weights",
              "series": series}
    write_json(out / "lmc.json", result)
    plot_lmc([result], out / "lmc.png")
    return result


def plot_lmc(results: list[dict], path: Path) -> Path:
    """Test error vs gamma, one panel per start, over the pairs of every result (one per distilled checkpoint,
    RT Fig. 9 aggregates 3 of them): every pair thin, the mean thick, ± the std over pairs shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pooled = pooled_series(results)
    fig, axes = plt.subplots(1, len(pooled), figsize=(4 * len(pooled), 3.5), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], pooled):
        g = s["gammas"]
        errors = 100 * np.asarray([p["test_error"] for p in s["pairs"]])  # in %, as the reports' tables
        for e in errors:
            ax.plot(g, e, color="tab:blue", alpha=0.3, lw=1)
        if len(errors):
            ax.plot(g, errors.mean(0), color="tab:blue", lw=2.5)
        if len(errors) > 1:
            std = errors.std(0, ddof=1)
            ax.fill_between(g, errors.mean(0) - std, errors.mean(0) + std, color="tab:blue", alpha=0.15, lw=0)
        where = f", {len(results)} checkpoints" if len(results) > 1 else ""
        ax.set_title(f"from {s['start']}: {barrier_text(s, 2)}\n({counted(len(errors), 'pair')}{where})", fontsize=9)
        ax.set_xlabel("γ  (θ = γ θ_i + (1 − γ) θ_j)")
        ax.set_xticks([0, 1], ["θ_j", "θ_i"], minor=False)
    axes[0][0].set_ylabel("test error (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pooled_series(results: list[dict]) -> list[dict]:
    """One series per start with the pairs and the runs of every result (each run once, not once per pair it
    ends), and the pairs' barrier statistics."""
    pooled: dict[str, dict] = {}
    for result in results:
        for s in result["series"]:
            into = pooled.setdefault(s["start"], {"start": s["start"], "gammas": s["gammas"], "pairs": [], "runs": []})
            into["pairs"] += s["pairs"]
            into["runs"] += s["runs"]
    return [{**s, **barrier_stats(s["pairs"])} for s in pooled.values()]


def barrier_text(series: dict, digits: int) -> str:
    """"barrier mean ± std pp" of one start's pairs (lmc.json holds fractions; reports show points); one pair
    has no spread to show (its sample std is nan)."""
    mean, std = 100 * series["barrier_mean"], 100 * series["barrier_std"]
    return f"barrier {mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) else "") + " pp"
