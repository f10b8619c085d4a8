"""Signal propagation per layer (escaping paper, Fig. 2-3): `randteach.analysis.signal_layers.analyze_signal`
on runs of the escape experiment (its teacher, kept collapse checkpoint and final student; the escape
experiment runs first if its sweep of the same scale and root has not)."""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import UserError
from .base import Context, Experiment, known_params, markdown_rows, seed_bases
from .escape import Escape


SIGNAL_PARAMS = ("runs", "n_samples", "n_test", "spatial", "center", "standardize", "rank_eps", "threshold", "probe",
                 "student_step")
ROLE_NAMES = {"teacher": "θ_T", "collapse": "θ_C", "student": "θ_S"}


class Signal(Experiment):
    name = "signal"
    ids = "E14"
    paper = "escaping paper Fig. 2-3"
    claim = ("from the teacher via the collapse point to the final student of the eta = 1e4 run, the per-layer "
             "effective rank drops to single digits at the collapse and ends above the teacher's; the final student "
             "is better conditioned, with more separable representations (tr(Sigma_w^+ Sigma_b)) and higher probe "
             "accuracy per layer.")

    def stages(self, ctx: Context):
        return []  # the runs are the escape experiment's

    def _escape(self, ctx: Context) -> Context:
        """The escape experiment of this scale and root (same overrides): where the analysed runs live."""
        from .recipe import load_recipe
        return Context(load_recipe("escape", ctx.recipe.scale), ctx.root, ctx.overrides, ctx.launcher, ctx.workers,
                       ctx.progress, stack=ctx.stack, stack_mode=ctx.stack_mode)

    def post(self, ctx: Context) -> list[str]:
        kw = known_params(ctx, SIGNAL_PARAMS)
        esc = self._escape(ctx)
        return [f"analyze_signal of {esc.out / f'seed{c.train.seed}' / run} (after the escape experiment, if it "
                "has not run)" for c in seed_bases(esc) for run in kw.get("runs", [])]

    def analyze(self, ctx: Context, arms) -> list[str]:
        from ..analysis.signal_layers import analyze_signal
        from .base import execute
        kw = known_params(ctx, SIGNAL_PARAMS)
        runs = kw.pop("runs", None)
        if not runs:
            raise UserError(f"recipe {ctx.recipe.source}: params.runs must name escape runs as GROUP/LABEL, "
                            "e.g. [step_size/lr10000]")
        esc = self._escape(ctx)
        lines = []
        for cfg in seed_bases(esc):
            seed_dir = esc.out / f"seed{cfg.train.seed}"
            if not (seed_dir / "escape.json").exists():
                execute(Escape(), esc)
            for run in runs:
                if not (seed_dir / run / "summary.json").exists():
                    raise UserError(f"the escape experiment has no run {run!r} in {seed_dir}; params.runs names "
                                    "runs of its recipe as GROUP/LABEL, e.g. step_size/lr10000")
                out = ctx.out / f"seed{cfg.train.seed}" / run
                r = analyze_signal(seed_dir / run, out=out, overrides=_probe_overrides(ctx.overrides),
                                   progress=ctx.progress, **kw)
                lines += [f"## seed {cfg.train.seed}: `{run}` of the escape experiment", ""] + _signal_tables(r)
                lines += [f"![{f}]({Path(p).relative_to(ctx.out)})" for f, p in r["figures"].items()] + [""]
        return lines


def _probe_overrides(overrides: dict) -> dict:
    """The command line's overrides that `randteach signal` accepts for a finished run (probe, device, root)."""
    return {k: v for k, v in overrides.items() if k.startswith("probe.") or k in ("train.device", "data.root")}


def _signal_tables(r: dict) -> list[str]:
    """Fig. 2 (propagation) and Fig. 3 (representation) as tables: one row per layer, cells θ_T / θ_C / θ_S."""
    roles = list(r["metrics"])
    ckpt = r["checkpoints"]
    lines = ["Checkpoints: " + ", ".join(f"{ROLE_NAMES.get(k, k)} = step {ckpt[k].get('step')}" for k in roles)
             + f". Metrics on {r['n_samples']} training images"
             + (f" (dead neurons on all {r['n_dead_samples']})" if r.get("n_dead_samples", 0) > r["n_samples"] else "")
             + f" ({r['spatial']} over positions; "
             f"{'standardized' if r['standardize'] else 'centered' if r['center'] else 'uncentered'}); probes "
             f"scored on {r['n_test']} test images. Cells: " + " / ".join(ROLE_NAMES.get(k, k) for k in roles) + ".",
             ""]

    def cells(i: int, key, f) -> str:
        vals = [r["metrics"][k][i] for k in roles]
        return " / ".join(f(key(v) if callable(key) else v[key]) for v in vals)

    def num(x) -> str:
        return "–" if x is None or not math.isfinite(x) else f"{x:.3g}"

    def pct(x) -> str:
        return "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"

    prop, rep = [], []
    for i, layer in enumerate(r["layers"]):
        prop.append([f"{i + 1} {layer['name']}", str(layer["dim"]), cells(i, "effective_rank", num),
                     cells(i, "dead_neurons", str), cells(i, "condition_number", num)])
        rep.append([f"{i + 1} {layer['name']}", cells(i, "trace_within", num), cells(i, "trace_between", num),
                    cells(i, "separability_rel_teacher", num),
                    cells(i, lambda v: v.get("probe", {}).get("linear"), pct)])
    lines += ["### signal propagation (Fig. 2)", ""]
    lines += markdown_rows(["layer", "neurons", "effective rank", "dead neurons", "condition number"], prop)
    lines += ["### representations (Fig. 3)", ""]
    lines += markdown_rows(["layer", "tr Σ_w", "tr Σ_b", "tr(Σ_w† Σ_b) / teacher's", "linear probe (%)"], rep)
    return lines


EXPERIMENT = Signal()
