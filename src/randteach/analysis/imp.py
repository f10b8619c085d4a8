"""Iterative magnitude pruning with rewinding: lottery tickets (random-teacher paper Sec. 6, Fig. 8;
Frankle & Carbin 2019; Frankle et al. 2019).

What is pruned: the weights of every nn.Conv2d and nn.Linear layer of the encoder, globally ranked by
magnitude; biases and normalization parameters are never pruned. The new linear classifier (`fc`) is
left dense by default, as in Frankle et al.'s CIFAR ResNets (open_lth ignores `fc.weight`);
`prune_classifier=True` ranks it together with the encoder's weights.

Rounding: round r keeps exactly round(N * (1 - fraction)^r) of the N prunable weights (Python's round,
half to even), so after r rounds N - round(N * 0.8^r) weights are zero; each round removes the
smallest-magnitude surviving weights (ties broken by position), about 20 % of those remaining.

One series (a start and a rewinding epoch l):
  round 0: train from the start for the whole recipe, remembering the state theta(l) after l epochs;
  round r: prune the trained weights of round r-1, reset every parameter and buffer to theta(l), zero
           the pruned weights, and train from step l to the end (the schedule continues from l; the
           optimizer's momentum starts at 0). Masks hold pruned weights at exactly 0 throughout.
A series is resumable: its state after each finished round is checkpointed in its folder.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..runs.checkpoint import load_checkpoint, save_checkpoint
from ..runs.rundir import changed_settings, write_json
from ..train.supervised import (Recipe, RunInfo, SupervisedData, build_classifier, check_distinct, label_of,
                                parse_start, provenance, rewind_step, state_of, train_supervised)

# RT Fig. 8: 20 % of the remaining weights pruned per round, to 0.8^24 = 0.47 % left, the end of its axis
PAPER_ROUNDS = 24


def prunable_names(model: nn.Module, prune_classifier: bool = False) -> list[str]:
    """Names of the conv and linear weights that IMP ranks (see the module docstring)."""
    names = []
    for mod_name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if mod_name == "fc" and not prune_classifier:
                continue
            names.append(f"{mod_name}.weight")
    return names


def kept_after(n_prunable: int, rounds: int, fraction: float = 0.2) -> int:
    """Number of prunable weights that survive `rounds` rounds: round(N (1 - fraction)^rounds)."""
    return round(n_prunable * (1.0 - fraction) ** rounds)


@torch.no_grad()
def magnitude_prune(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                    keep: int) -> dict[str, torch.Tensor]:
    """New masks keeping the `keep` largest-magnitude weights among those the current masks keep,
    ranked globally over all tensors (ties: the earlier position survives)."""
    names = list(weights)
    magnitude = torch.cat([weights[k].detach().abs().reshape(-1).cpu().double() for k in names])
    alive = torch.cat([masks[k].reshape(-1).cpu().bool() for k in names])
    if keep > int(alive.sum()):
        raise ValueError(f"cannot keep {keep} weights: only {int(alive.sum())} survive")
    score = torch.where(alive, magnitude, torch.full_like(magnitude, -1.0))
    order = torch.argsort(score, descending=True, stable=True)
    new = torch.zeros_like(alive)
    new[order[:keep]] = True
    out, start = {}, 0
    for k in names:
        n = weights[k].numel()
        out[k] = new[start:start + n].reshape(weights[k].shape).to(weights[k].dtype)
        start += n
    return out


def count_zeros(model: nn.Module, names: list[str]) -> tuple[int, int]:
    """(exactly-zero entries, total entries) over the named weights."""
    params = dict(model.named_parameters())
    return (sum(int((params[k] == 0).sum()) for k in names), sum(params[k].numel() for k in names))


def imp_series(run: RunInfo, start: str, data: SupervisedData, recipe: Recipe, device: torch.device, *,
               rounds: int, fraction: float = 0.2, prune_classifier: bool = False, out: str | Path | None = None,
               progress: bool = False) -> dict:
    """IMP of one start specification (e.g. 'student@0', 'random@1'): a record per round with
    sparsity, test accuracy, and the count of pruned weights that are not exactly 0 (always 0)."""
    source, l_epochs = parse_start(start)
    n = len(data.train)
    l_step = rewind_step(recipe, n, l_epochs)
    model = build_classifier(run, source, data.num_classes, recipe.seed).to(device)
    names = prunable_names(model, prune_classifier)
    n_prunable = sum(dict(model.named_parameters())[k].numel() for k in names)
    # Not the number of rounds: round r depends on the rounds before it only, so a saved series is extended
    # by more rounds and read in part for fewer.
    spec = {"start": start, "fraction": fraction, "prune_classifier": prune_classifier,
            "recipe": asdict(recipe), "n_train": n, "n_test": len(data.test), "data": data.train.name}
    state_path = Path(out) / "imp_state.pt" if out is not None else None
    records, rewind, masks, trained = [], None, None, None
    if state_path is not None and state_path.exists():
        saved = load_checkpoint(state_path)
        before = {k: v for k, v in json.loads(saved["spec"]).items() if k != "rounds"}  # recorded until 2026-12-03
        if before != json.loads(json.dumps(spec)):
            raise UserError(f"{state_path.parent} holds an IMP series made with other settings "
                            f"({changed_settings(before, spec)}); give those to continue it, choose another --out, "
                            f"or delete {state_path} to start over")
        records, rewind, masks, trained = (json.loads(saved["records"]), saved["rewind"], saved["masks"],
                                           saved["trained"])
    for r in range(len(records), rounds + 1):
        if r == 0:
            result = train_supervised(model, data, recipe, device, snapshot_steps=(l_step,), progress=progress,
                                      desc=f"imp {start} round 0")
            rewind = result["snapshots"][l_step]
            masks = {k: torch.ones_like(dict(model.named_parameters())[k]).cpu() for k in names}
        else:
            masks = magnitude_prune({k: trained[k] for k in names}, masks, kept_after(n_prunable, r, fraction))
            model.load_state_dict(rewind)
            result = train_supervised(model, data, recipe, device, start_step=l_step, masks=masks,
                                      progress=progress, desc=f"imp {start} round {r}")
        trained = state_of(model)
        zeros, _ = count_zeros(model, names)
        kept = int(sum(int(m.sum()) for m in masks.values()))
        pruned_nonzero = sum(int(((masks[k] == 0) & (p.detach().cpu() != 0)).sum())
                             for k, p in model.named_parameters() if k in masks)
        records.append({"round": r, "prunable": n_prunable, "remaining": kept, "sparsity": 1 - kept / n_prunable,
                        "zero_weights": zeros, "pruned_nonzero": pruned_nonzero,
                        "test_accuracy": result["test_accuracy"], "train_loss": result["train_loss"],
                        "history": result["history"]})  # test accuracy every --eval-every epochs
        if state_path is not None:
            save_checkpoint({"spec": json.dumps(spec), "records": json.dumps(records), "rewind": rewind,
                             "masks": masks, "trained": trained}, state_path)
    return {"start": start, "source": source, "rewind_epochs": l_epochs, "rewind_step": l_step,
            "pruned": names, "rounds": records[:rounds + 1]}


def run_imp(run: RunInfo, starts: list[str], data: SupervisedData, recipe: Recipe, device: torch.device, *,
            rounds: int, out: str | Path, fraction: float = 0.2, prune_classifier: bool = False,
            progress: bool = False) -> dict:
    """IMP for every start; writes OUT/imp.json and OUT/imp.png (test accuracy vs weights remaining)."""
    check_distinct(starts)
    out = Path(out)
    series = [imp_series(run, s, data, recipe, device, rounds=rounds, fraction=fraction,
                         prune_classifier=prune_classifier, out=out / label_of(s), progress=progress)
              for s in starts]
    result = {**provenance(run, data, recipe), "fraction": fraction, "prune_classifier": prune_classifier,
              "rounding": "round r keeps round(N * (1 - fraction)^r) of the N prunable weights",
              "series": series}
    write_json(out / "imp.json", result)
    plot_imp([result], out / "imp.png")
    return result


def plot_imp(results: list[dict], path: Path) -> Path:
    """Test accuracy vs percentage of prunable weights remaining (log axis, decreasing), one line per start:
    the mean over the results (one per distilled checkpoint; RT Fig. 8 aggregates 5), ± their std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, s in enumerate(results[0]["series"]):
        runs = [r["series"][i]["rounds"] for r in results]
        n = min(len(rounds) for rounds in runs)  # the rounds every result reached
        remaining = [100 * (1 - r["sparsity"]) for r in s["rounds"][:n]]
        acc = 100 * np.asarray([[r["test_accuracy"] for r in rounds[:n]] for rounds in runs])  # in %, as the tables
        ax.errorbar(remaining, acc.mean(0), yerr=acc.std(0, ddof=1) if len(runs) > 1 else None, fmt="o-", ms=3,
                    capsize=2, label=f"init {s['source']}, rewind to l={s['rewind_epochs']:g}")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ticks = [100 * (1 - r["sparsity"]) for r in results[0]["series"][0]["rounds"]]
    ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test accuracy (%)")
    over = f"; mean ± std over {len(results)} checkpoints" if len(results) > 1 else ""
    ax.set_title(f"IMP on {results[0]['data']} (prune {100 * results[0]['fraction']:g} % per round{over})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
