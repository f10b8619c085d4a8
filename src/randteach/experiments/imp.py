"""Lottery tickets from the distilled student vs rewinding (Sarnthein et al. 2023, Fig. 8): the runs,
then `randteach.analysis.imp.run_imp` (in this process, on `params.device`)."""
from __future__ import annotations

import math

from ..reports.experiment import fmt, mean_std
from .base import Context, Experiment, analysis_device, completed, markdown_rows, missing_note, supervised_inputs


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
        lines = missing_note(arms, ["student"])
        series: dict[tuple[str, int], list[dict]] = {}
        for cfg in completed(arms["student"]):
            info, data, recipe = supervised_inputs(ctx, cfg)
            out = ctx.out / f"seed{cfg.train.seed}"
            result = run_imp(info, list(p["starts"]), data, recipe, analysis_device(ctx), rounds=int(p["rounds"]),
                             out=out, fraction=float(p.get("fraction", 0.2)), progress=ctx.progress)
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
            markdown_rows(head, rows) + lines + [""]


EXPERIMENT = Imp()
