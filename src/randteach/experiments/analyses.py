"""Where the student lands and how it escapes, as experiments: thin wrappers that distill the runs an analysis
needs (through the recipe's arms, shared with the other experiments) and call the analysis modules:

- landscape (RT Fig. 5)  `randteach.analysis.landscape.compute_landscape` on the non-local and shared views
- imp (RT Fig. 8)        `randteach.analysis.imp.run_imp`: lottery tickets from the distilled student vs rewinding
- lmc (RT Fig. 9)        `randteach.analysis.lmc.run_lmc`: linear mode connectivity from the student vs a random init
- lr-range (ESC Fig. 1a)  `randteach.analysis.lr_range.lr_range`: teacher-student vs supervised loss as eta grows
- escape (ESC Fig. 1b-d, App. A) `randteach.analysis.escape.run_escape`: step-size, batch-size and stabilization sweeps
- signal (ESC Fig. 2-3)  `randteach.analysis.signal_layers.analyze_signal` on runs of the escape experiment (its
                  teacher, kept collapse checkpoint and final student; the escape experiment runs first if
                  its sweep of the same scale and root has not)

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


# ------------------------------------------------------------------- RT Fig. 8-9: supervised from the student

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


# ------------------------------------------------------------------------------------- the escaping paper

def _known_params(ctx: Context, valid: tuple[str, ...]) -> dict:
    """The recipe's params, every one of them a keyword of the analysis (`device` aside)."""
    unknown = sorted(set(ctx.params) - set(valid) - {"device"})
    if unknown:
        raise UserError(f"recipe {ctx.recipe.source}: unknown {ctx.recipe.experiment} params {', '.join(unknown)}; "
                        f"valid: {', '.join(valid)}")
    return {k: v for k, v in ctx.params.items() if k in valid}


def _bases(ctx: Context) -> list[Config]:
    """One base config per seed: the recipe's base (and its one arm, if any); the analysis derives its runs."""
    arm = ctx.recipe.arms[0] if ctx.recipe.arms else Arm("base")
    return ctx.recipe.configs(arm, ctx.out / "base", ctx.overrides)


LR_RANGE_PARAMS = ("lr_start", "lr_end", "steps", "epochs", "supervised", "smoothing", "factor", "floor")
LR_RANGE_FLOATS = ("lr_start", "lr_end", "smoothing", "factor", "floor")


def _lr_range_kwargs(ctx: Context) -> dict:
    kw = _known_params(ctx, LR_RANGE_PARAMS)
    for k in LR_RANGE_FLOATS:
        if k in kw:
            try:  # YAML 1.1 reads 1.0e6 (no exponent sign) as a string
                kw[k] = float(kw[k])
            except (TypeError, ValueError):
                raise UserError(f"recipe {ctx.recipe.source}: params.{k} must be a number, got {kw[k]!r}") from None
    return kw


class LrRange(Experiment):
    name = "lr-range"
    ids = "E12"
    paper = "escaping paper Fig. 1a"
    claim = ("growing the step size exponentially from 1e-6 to 1e6 over 5 epochs, the supervised loss diverges at "
             "eta ~ 10, while the teacher-student loss leaves the teacher in two steps, the second at eta ~ 500.")

    def stages(self, ctx: Context):
        return []  # lr_range runs its own distillation and supervised side (locally, in this process)

    def post(self, ctx: Context) -> list[str]:
        kw = _lr_range_kwargs(ctx)
        length = f"{kw['steps']} steps" if kw.get("steps") is not None else f"{kw.get('epochs')} epochs"
        return [f"seed {c.train.seed}: lr_range {kw.get('lr_start', 1e-6):g} -> {kw.get('lr_end', 1e6):g} over "
                f"{length} into {ctx.out / f'seed{c.train.seed}'}" for c in _bases(ctx)]

    def own_runs(self, ctx: Context) -> list[Path]:
        return [ctx.out / f"seed{c.train.seed}" / "teacher-student" for c in _bases(ctx)]  # lr_range's layout

    def analyze(self, ctx: Context, arms) -> list[str]:
        from ..analysis.lr_range import lr_range
        kw = _lr_range_kwargs(ctx)
        lines = []
        for cfg in _bases(ctx):
            out = ctx.out / f"seed{cfg.train.seed}"
            r = lr_range(cfg, out=out, progress=ctx.progress, **kw)
            rows = []
            for side, curve in r["sides"].items():
                rise, bad = curve["rise"], curve["nonfinite"]
                finite = [float(v) for v in curve["loss"] if math.isfinite(float(v))]  # cached JSON: "nan"
                rows.append([side.replace("_", "-"), f"{min(finite):.3g}" if finite else "–",
                             f"{rise['lr']:.3g} (step {rise['step']})" if rise else "none",
                             f"{bad['lr']:.3g} (step {bad['step']})" if bad else "stays finite"])
            lines += [f"## seed {cfg.train.seed}: {r['encoder']} on {r['data']} (n = {r['n_samples']}, batch "
                      f"{r['batch_size']}, {r['steps']} steps = {r['epochs']:.3g} epochs, {r['optimizer']}, "
                      f"{r['loss']} loss; eta {r['lr_start']:g} -> {r['lr_end']:g})", "",
                      f"Schedule {r['schedule']}. Divergence: {r['divergence']}; smoothing: {r['smoothing']}.", ""]
            lines += _md_table(["loss", "lowest loss", "rise at eta", "non-finite at eta"], rows)
            lines += [f"![LR range seed {cfg.train.seed}]({Path(r['png']).relative_to(ctx.out)})", ""]
        return lines


ESCAPE_PARAMS = ("steps", "probe_every_steps", "lrs", "batch_sizes", "batch_lr", "stabilize", "stabilize_losses",
                 "stabilize_lr", "warmup_steps", "collapse_metric", "exact", "erank_samples", "prune_checkpoints",
                 "group_steps")
ESCAPE_SWEEP = ("lrs", "batch_sizes", "batch_lr", "stabilize", "stabilize_losses", "stabilize_lr", "warmup_steps")


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
        return _known_params(ctx, ESCAPE_PARAMS)

    def post(self, ctx: Context) -> list[str]:
        from ..analysis.escape import escape_variants
        kw = self._kwargs(ctx)
        variants = escape_variants(**{k: kw[k] for k in ESCAPE_SWEEP if k in kw})
        per_group = "".join(f", {g} {s}" for g, s in (kw.get("group_steps") or {}).items())
        return [f"seed {c.train.seed}: run_escape with {len(variants)} runs of {kw.get('steps')} steps each{per_group} "
                f"({', '.join(v.group + '/' + v.label for v in variants)}) into {ctx.out / f'seed{c.train.seed}'}"
                for c in _bases(ctx)]

    def own_runs(self, ctx: Context) -> list[Path]:
        from ..analysis.escape import escape_variants
        kw = self._kwargs(ctx)
        variants = escape_variants(**{k: kw[k] for k in ESCAPE_SWEEP if k in kw})
        return [ctx.out / f"seed{c.train.seed}" / v.group / v.label for c in _bases(ctx) for v in variants]

    def analyze(self, ctx: Context, arms) -> list[str]:
        from ..analysis.escape import run_escape
        lines = []
        for cfg in _bases(ctx):
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


SIGNAL_PARAMS = ("runs", "n_samples", "n_test", "spatial", "center", "standardize", "rank_eps", "threshold", "probe")
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
                       ctx.progress)

    def post(self, ctx: Context) -> list[str]:
        kw = _known_params(ctx, SIGNAL_PARAMS)
        esc = self._escape(ctx)
        return [f"analyze_signal of {esc.out / f'seed{c.train.seed}' / run} (after the escape experiment, if it "
                "has not run)" for c in _bases(esc) for run in kw.get("runs", [])]

    def analyze(self, ctx: Context, arms) -> list[str]:
        from ..analysis.signal_layers import analyze_signal
        from .base import execute
        kw = _known_params(ctx, SIGNAL_PARAMS)
        runs = kw.pop("runs", None)
        if not runs:
            raise UserError(f"recipe {ctx.recipe.source}: params.runs must name escape runs as GROUP/LABEL, "
                            "e.g. [step_size/lr10000]")
        esc = self._escape(ctx)
        lines = []
        for cfg in _bases(esc):
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
    lines = [f"Checkpoints: " + ", ".join(f"{ROLE_NAMES.get(k, k)} = step {ckpt[k].get('step')}" for k in roles)
             + f". Metrics on {r['n_samples']} training images ({r['spatial']} over positions; "
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
    lines += _md_table(["layer", "neurons", "effective rank", "dead neurons", "condition number"], prop)
    lines += ["### representations (Fig. 3)", ""]
    lines += _md_table(["layer", "tr Σ_w", "tr Σ_b", "tr(Σ_w† Σ_b) / teacher's", "linear probe (%)"], rep)
    return lines


EXPERIMENTS = [Landscape(), Imp(), Lmc(), LrRange(), Escape(), Signal()]
