"""Where the student lands and how it escapes, as experiments: thin wrappers that distill the runs an analysis
needs (through the recipe's arms, shared with the other experiments) and call the analysis modules:

- landscape (E9)  `randteach.analysis.landscape.compute_landscape` on the non-local and shared views
- imp (E10)       `randteach.analysis.imp.run_imp`: lottery tickets from the distilled student vs rewinding
- lmc (E11)       `randteach.analysis.lmc.run_lmc`: linear mode connectivity from the student vs a random init
- escape (E13, E15) `randteach.analysis.escape.run_escape`: step-size, batch-size and stabilization sweeps

The supervised analyses and the landscape run in this process (on `params.device`, default auto), after
the distillations, whichever launcher ran those.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..config import Config, config_from_dict, dotted_to_nested
from ..errors import UserError
from .base import Context, Experiment
from .recipe import Arm, deep_merge
from .tables import fmt, mean_std


def _device(ctx: Context):
    from ..distill import resolve_device
    return resolve_device(str(ctx.overrides.get("train.device", ctx.params.get("device", "auto"))))


def _completed(configs: list[Config]) -> list[Config]:
    from ..sweep import finished_summary
    return [c for c in configs if (finished_summary(c) or {}).get("status") == "completed"]


def _missing(arms: dict, names: list[str]) -> list[str]:
    total = sum(len(arms.get(a, [])) for a in names)
    done = sum(len(_completed(arms.get(a, []))) for a in names)
    return [] if done == total else [f"_{total - done} of {total} distillation runs are not completed; "
                                     "the analysis covers the completed ones (run the command again to finish)._", ""]


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows] + [""]


# ------------------------------------------------------------------------------------------ E9 landscape

def anchor_values(result: dict) -> list[dict]:
    """Every metric of a landscape at the grid point nearest each anchor; "on_grid": whether that point is the
    anchor itself (the grid snaps onto anchors it passes within 1e-9 of, e.g. 0 and 1 on [-0.5, 1.5] with
    9 points, not with 3)."""
    out = []
    for (ax, ay), label in zip(result["anchors"], result["anchor_labels"]):
        j = int(np.argmin(np.abs(np.asarray(result["x"]) - ax)))
        i = int(np.argmin(np.abs(np.asarray(result["y"]) - ay)))
        on_grid = math.isclose(result["x"][j], ax, abs_tol=1e-9) and math.isclose(result["y"][i], ay, abs_tol=1e-9)
        out.append({"label": str(label), "x": float(ax), "y": float(ay), "on_grid": on_grid,
                    **{m: float(result[m][i, j]) for m in result["metrics"]}})
    return out


class Landscape(Experiment):
    name = "landscape"
    ids = "E9"
    paper = "Fig. 5, 13-16"
    claim = ("the student distilled from alpha ~ 0 settles in a local minimum next to an asymmetric valley around "
             "the teacher (the global optimum); an independent student (alpha = 1) reaches a different, worse "
             "minimum; the basin of the local solution coincides with higher probe accuracy.")

    def post(self, ctx: Context) -> list[str]:
        p = ctx.params
        return [f"landscape {v} view, {proj} projection, grid {p['grid']}, extent {p['extent']}"
                for v in p["views"] for proj in p["projections"]]

    def analyze(self, ctx: Context, arms) -> list[str]:
        from ..analysis.landscape import compute_landscape, view_anchors
        from ..analysis.supervised import run_info
        from ..checkpoint import load_state_dict
        p = ctx.params
        lines = _missing(arms, ["alpha0", "alpha1"])
        done0 = {c.train.seed: c for c in _completed(arms["alpha0"])}
        for a1 in _completed(arms["alpha1"]):
            a0 = done0.get(a1.train.seed)
            for view in p["views"]:
                if view == "shared" and a0 is None:
                    continue
                runs = [str(a1.run_dir())] if view == "non-local" else [str(a0.run_dir()), str(a1.run_dir())]
                anchors = view_anchors(view, runs)
                info = run_info(runs[0])
                if p.get("probe_overrides"):  # e.g. smaller probe subsets: one probe per grid point
                    info.cfg = config_from_dict(deep_merge(info.cfg.to_dict(),
                                                           dotted_to_nested(p["probe_overrides"])))
                for projection in p["projections"]:
                    out = ctx.out / f"seed{a1.train.seed}" / f"{view}-{projection}"
                    result = compute_landscape(anchors, info, out,
                                               teacher=load_state_dict(runs[0], "teacher"), grid=p["grid"],
                                               extent=p["extent"], projection=projection, n_loss=p["n_loss"],
                                               probe=p.get("probe", True), device=_device(ctx),
                                               progress=ctx.progress)
                    rel = out.relative_to(ctx.out)
                    lines += [f"## {view} view, {projection} projection (seed {a1.train.seed})", ""]
                    if not result["complete"]:
                        lines += [f"_partial: {result['done']} of {result['total']} points; run again to finish._", ""]
                        continue
                    metrics = result["metrics"]
                    values = anchor_values(result)
                    origin = values[0].get("loss", math.nan) if values[0]["on_grid"] else math.nan
                    rows = [[v["label"], f"({v['x']:.3g}, {v['y']:.3g})"]
                            + [("–" if not v["on_grid"] else f"{100 * v[m]:.2f}" if m.startswith("probe_")
                                else f"{v[m]:.6g}") for m in metrics]
                            + ([f"{v['loss'] - origin:.3g}" if v["on_grid"] else "–"] if "loss" in metrics else [])
                            for v in values]
                    lines += _md_table(["anchor", "coordinates"] + [m + (" (%)" if m.startswith("probe_") else "")
                                                                    for m in metrics]
                                       + (["loss − loss at θ_T (= KL to the teacher for CE)"]
                                          if "loss" in metrics else []), rows)
                    finite = {m: np.asarray(result[m], float) for m in ("loss",) if m in result}
                    if "loss" in finite:
                        lines += [f"Loss over the grid: min {np.nanmin(finite['loss']):.6g}, "
                                  f"max {np.nanmax(finite['loss']):.6g}.", ""]
                    lines += [f"![{m}]({rel}/{m}.png)" for m in ("loss", "probe_linear", "embed_kl")
                              if (out / f"{m}.png").exists()] + [""]
        return lines


# --------------------------------------------------------------------------------------- E10, E11 supervised

def _supervised(ctx: Context, cfg: Config):
    from ..analysis.supervised import Recipe, load_supervised_data, run_info
    p = ctx.params
    info = run_info(cfg.run_dir())
    data = load_supervised_data(info.cfg, info.image_size, name=p.get("data"), n_train=p.get("n_train"),
                                n_test=p.get("n_test"))
    return info, data, Recipe(**(p.get("recipe") or {}))


class Imp(Experiment):
    name = "imp"
    ids = "E10"
    paper = "Fig. 8"
    claim = ("the distilled student already holds lottery tickets: IMP rewound to theta*_S keeps its accuracy to "
             "high sparsity like rewinding to supervised epoch 1-2, while rewinding to a random init (l = 0) "
             "does not.")

    def post(self, ctx: Context) -> list[str]:
        p = ctx.params
        return [f"IMP ({p['rounds']} rounds, prune {p.get('fraction', 0.2)} per round) from {', '.join(p['starts'])} "
                "for every completed run"]

    def analyze(self, ctx: Context, arms) -> list[str]:
        from ..analysis.imp import run_imp
        p = ctx.params
        lines = _missing(arms, ["student"])
        series: dict[tuple[str, int], list[dict]] = {}
        for cfg in _completed(arms["student"]):
            info, data, recipe = _supervised(ctx, cfg)
            out = ctx.out / f"seed{cfg.train.seed}"
            result = run_imp(info, list(p["starts"]), data, recipe, _device(ctx), rounds=int(p["rounds"]), out=out,
                             fraction=float(p.get("fraction", 0.2)), progress=ctx.progress)
            lines += [f"![IMP seed {cfg.train.seed}]({out.relative_to(ctx.out)}/imp.png)"]
            for s in result["series"]:
                for k, r in enumerate(s["rounds"]):
                    series.setdefault((s["start"], k), []).append(r)
        starts = list(p["starts"])
        rounds = sorted({k for _, k in series})
        head = ["weights remaining (%)"] + [f"{s} test acc. (%)" for s in starts]
        rows = []
        for k in rounds:
            remaining = next((100 * (1 - r["sparsity"]) for s in starts for r in series.get((s, k), [])), math.nan)
            rows.append([f"{remaining:.3g}"] + [fmt(*mean_std([r["test_accuracy"] for r in series.get((s, k), [])]))
                                                for s in starts])
        return ["## test accuracy vs sparsity (mean ± std over distilled checkpoints)", ""] + \
            _md_table(head, rows) + lines + [""]


class Lmc(Experiment):
    name = "lmc"
    ids = "E11"
    paper = "Fig. 9"
    claim = ("supervised runs started from the distilled student with different data orders land in one linear "
             "basin (small barrier), while runs from the random initialization face a significantly larger barrier.")

    def post(self, ctx: Context) -> list[str]:
        p = ctx.params
        return [f"LMC: {p['runs']} supervised runs from each of {', '.join(p['starts'])} for every completed run"]

    def analyze(self, ctx: Context, arms) -> list[str]:
        from ..analysis.lmc import run_lmc
        p = ctx.params
        lines = _missing(arms, ["student"])
        barriers: dict[str, list[float]] = {}
        errors: dict[str, list[float]] = {}
        for cfg in _completed(arms["student"]):
            info, data, recipe = _supervised(ctx, cfg)
            out = ctx.out / f"seed{cfg.train.seed}"
            result = run_lmc(info, list(p["starts"]), data, recipe, _device(ctx), out=out, runs=int(p["runs"]),
                             resolution=int(p.get("resolution", 11)), bn_batches=int(p.get("bn_batches", 8)),
                             progress=ctx.progress)
            lines += [f"![LMC seed {cfg.train.seed}]({out.relative_to(ctx.out)}/lmc.png)"]
            for s in result["series"]:
                barriers.setdefault(s["start"], []).extend(pair["barrier"] for pair in s["pairs"])
                errors.setdefault(s["start"], []).extend(e for pair in s["pairs"]
                                                         for e in (pair["test_error"][0], pair["test_error"][-1]))
        rows = [[s, str(len(barriers[s])), fmt(*mean_std(barriers[s])), fmt(*mean_std(errors[s]))] for s in barriers]
        return ["## barrier heights (test error, mean ± std over all pairs of all distilled checkpoints)", ""] + \
            _md_table(["start", "pairs", "barrier (pp of test error)", "endpoint test error (%)"], rows) + lines + [""]


# ------------------------------------------------------------------------------------------ E13, E15 escape

ESCAPE_PARAMS = ("steps", "probe_every_steps", "lrs", "batch_sizes", "batch_lr", "stabilize", "stabilize_losses",
                 "stabilize_lr", "warmup_steps", "collapse_metric", "exact", "erank_samples", "prune_checkpoints")


class Escape(Experiment):
    name = "escape"
    ids = "E13, E15"
    paper = "escaping paper Fig. 1b-d, App. A"
    claim = ("with SGD on the normalized loss the student leaves the teacher only at large step sizes (eta ~ 1e4), "
             "through a representational collapse (probe minimum) followed by a slow recovery; larger batches "
             "escape alike; ND-MSE with a warm-up is the stable variant.")

    def stages(self, ctx: Context):
        return []  # run_escape distills its own runs (locally, in this process)

    def _kwargs(self, ctx: Context) -> dict:
        unknown = sorted(set(ctx.params) - set(ESCAPE_PARAMS) - {"device"})
        if unknown:
            raise UserError(f"recipe {ctx.recipe.source}: unknown escape params {', '.join(unknown)}; "
                            f"valid: {', '.join(ESCAPE_PARAMS)}")
        return {k: v for k, v in ctx.params.items() if k in ESCAPE_PARAMS}

    def _bases(self, ctx: Context) -> list[Config]:
        arm = ctx.recipe.arms[0] if ctx.recipe.arms else Arm("base")
        return ctx.recipe.configs(arm, ctx.out / "base", ctx.overrides)

    def post(self, ctx: Context) -> list[str]:
        from ..analysis.escape import escape_variants
        kw = self._kwargs(ctx)
        keep = {k: kw[k] for k in ("lrs", "batch_sizes", "batch_lr", "stabilize", "stabilize_losses", "stabilize_lr",
                                   "warmup_steps") if k in kw}
        variants = escape_variants(**keep)
        return [f"seed {c.train.seed}: run_escape with {len(variants)} runs of {kw.get('steps')} steps each "
                f"({', '.join(v.group + '/' + v.label for v in variants)}) into {ctx.out / f'seed{c.train.seed}'}"
                for c in self._bases(ctx)]

    def analyze(self, ctx: Context, arms) -> list[str]:
        from ..analysis.escape import run_escape
        lines = []
        for cfg in self._bases(ctx):
            out = ctx.out / f"seed{cfg.train.seed}"
            result = run_escape(cfg, out, progress=ctx.progress, **self._kwargs(ctx))
            rows = []
            for r in result["runs"]:
                probes = r["probes"]
                teacher = next((p["teacher"].get("linear") for p in probes if "teacher" in p), None)
                # a diverged run's last probe is from before it diverged: no final accuracy to show
                final = r["final_probe"].get("student", {}).get("linear") if r["status"] == "completed" else None
                c = r.get("collapse") or {}
                rows.append([r["group"], r["label"], str(r["status"]) + (f" at step {r['diverged_step']}"
                                                                         if r.get("diverged_step") else ""),
                             f"{100 * teacher:.2f}" if teacher is not None else "–",
                             f"{100 * c['value']:.2f} (step {c['step']})" if c.get("value") is not None else "–",
                             f"{100 * final:.2f}" if final is not None else "–"])
            lines += [f"## seed {cfg.train.seed}: {result['encoder']} on {result['data']} (n = {result['n_samples']}, "
                      f"{result['steps']} steps, probe every {result['probe_every_steps']})", ""]
            lines += _md_table(["group", "run", "status", "teacher linear (%)", "collapse: min student linear (%)",
                                "final student linear (%)"], rows)
            lines += [f"![{g}]({Path(p).relative_to(ctx.out)})" for g, p in result["figures"].items()] + [""]
        return lines


EXPERIMENTS = [Landscape(), Imp(), Lmc(), Escape()]
