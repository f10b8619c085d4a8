"""The LR range test (escaping paper, Fig. 1a): teacher-student vs supervised loss as the step size
grows, `randteach.analysis.lr_range.lr_range` on each seed's base config."""
from __future__ import annotations

import math
from pathlib import Path

from ..analysis.lr_range import RANGE_KEYS
from ..errors import UserError
from .base import Context, Experiment, known_params, markdown_rows, seed_bases


LR_RANGE_PARAMS = ("lr_start", "lr_end", "steps", "epochs", "supervised", "smoothing", "factor", "floor")
LR_RANGE_FLOATS = ("lr_start", "lr_end", "smoothing", "factor", "floor")


def _lr_range_kwargs(ctx: Context) -> dict:
    kw = known_params(ctx, LR_RANGE_PARAMS)
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

    sets = tuple(RANGE_KEYS)  # range_config: one exponential sweep of a set length, without probes or checkpoints

    def stages(self, ctx: Context):
        return []  # lr_range runs its own distillation and supervised side (locally, in this process)

    def post(self, ctx: Context) -> list[str]:
        kw = _lr_range_kwargs(ctx)
        length = f"{kw['steps']} steps" if kw.get("steps") is not None else f"{kw.get('epochs')} epochs"
        return [f"seed {c.train.seed}: lr_range {kw.get('lr_start', 1e-6):g} -> {kw.get('lr_end', 1e6):g} over "
                f"{length} into {ctx.out / f'seed{c.train.seed}'}" for c in seed_bases(ctx)]

    def own_runs(self, ctx: Context) -> list[Path]:
        return [ctx.out / f"seed{c.train.seed}" / "teacher-student" for c in seed_bases(ctx)]  # lr_range's layout

    def analyze(self, ctx: Context, arms) -> list[str]:
        from ..analysis.lr_range import lr_range
        kw = _lr_range_kwargs(ctx)
        lines = []
        for cfg in seed_bases(ctx):
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
            lines += markdown_rows(["loss", "lowest loss", "rise at eta", "non-finite at eta"], rows)
            lines += [f"![LR range seed {cfg.train.seed}]({Path(r['png']).relative_to(ctx.out)})", ""]
        return lines


EXPERIMENT = LrRange()
