"""The paper's experiments as commands: `randteach experiment NAME --scale cpu|paper`.

Each experiment is a small module (its claim, the runs it needs, its report) plus recipes, which are data:
`recipes/<name>.<scale>.yaml` (see `recipe.py`). Runs are content-addressed run directories shared by all
experiments of a scale, so nothing is computed twice; every experiment ends in `<out>/<name>/report.md`
with its table (mean ± std over seeds), CSV files and figures.

    name             paper (RT: Random Teachers are Good Teachers, Sarnthein et al. 2023;
                            ESC: Escaping Random Teacher Initialization, Sarnthein et al.)
    probes           RT Tab. 1, 3, Fig. 1
    locality         RT Fig. 3, App. D
    data-dependence  RT Fig. 4
    transfer         RT Tab. 2, 4
    head-ablations   RT App. B
    architectures    RT App. C.2, Tab. 5
    restart          RT App. D.1
    landscape        RT Fig. 5, 13-16
    imp              RT Fig. 8
    lmc              RT Fig. 9
    lr-range         ESC Fig. 1a
    escape           ESC Fig. 1b-d, App. A
    signal           ESC Fig. 2-3 (on the escape experiment's runs)
"""
from __future__ import annotations

import importlib
from pathlib import Path

from ..config import canonical_key
from .base import DEFAULT_ROOT, Context, Experiment, Outcome, dry_run, execute
from .recipe import SCALES, Recipe, load_recipe

MODULES = {"probes": "probes", "locality": "locality", "data-dependence": "data_dependence",
           "transfer": "transfer", "head-ablations": "head_ablations", "architectures": "architectures",
           "restart": "restart", "landscape": "landscape", "imp": "imp", "lmc": "lmc",
           "lr-range": "lr_range", "escape": "escape", "signal": "signal_propagation"}
NAMES = tuple(MODULES)


def get_experiment(name: str) -> Experiment:
    from ..errors import UserError
    if name not in MODULES:
        raise UserError(f"unknown experiment {name!r}; valid: {', '.join(NAMES)}")
    module = importlib.import_module(f"{__name__}.{MODULES[name]}")
    found = [e for e in getattr(module, "EXPERIMENTS", [getattr(module, "EXPERIMENT", None)]) if e and e.name == name]
    return found[0]


def make_context(name: str, scale: str, *, out: str | Path | None = None, seeds: int | None = None,
                 overrides: dict | None = None, recipe: str | Path | None = None, launcher: str = "local",
                 workers: int | None = None, progress: bool = True, command: str = "", stack: int = 1,
                 stack_mode: str = "auto", slurm: dict | None = None) -> Context:
    from ..runs.sweep import check_slurm_given, check_stack_options, submitit_parameters
    check_stack_options(stack, stack_mode, launcher, workers)  # before a dry run too
    check_slurm_given(slurm or {}, launcher)
    r: Recipe = load_recipe(name, scale, recipe)
    r.slurm = {**r.slurm, **(slurm or {})}  # options over the recipe's
    if launcher == "slurm":
        submitit_parameters(r.slurm, name)  # names and values refused before anything runs
    if seeds is not None:
        if seeds < 1:
            from ..errors import UserError
            raise UserError(f"--seeds must be at least 1, got {seeds}")
        r.seeds = list(range(seeds))
    root = Path(out) if out else Path(DEFAULT_ROOT) / scale
    # --train.max-steps is --train.max_steps (as the config reads it): one spelling for the checks on overrides
    overrides = {canonical_key(k): v for k, v in (overrides or {}).items()}
    return Context(r, root, overrides, launcher, workers, progress, command, stack, stack_mode)


def run_experiment(name: str, scale: str = "cpu", *, dry: bool = False, **kw) -> Outcome | str:
    """Run (or, with dry=True, list) experiment `name`; returns the Outcome (report path, run statuses) or
    the listing.
    Keywords: out, seeds, overrides, recipe, launcher, workers, progress, command, stack, stack_mode, slurm (see
    `make_context`)."""
    exp = get_experiment(name)
    ctx = make_context(name, scale, **kw)
    return dry_run(exp, ctx) if dry else execute(exp, ctx)


__all__ = ["NAMES", "SCALES", "Context", "Experiment", "Outcome", "get_experiment", "make_context", "run_experiment",
           "load_recipe"]
