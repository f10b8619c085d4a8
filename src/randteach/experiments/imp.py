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
        from ..analysis.imp import plot_imp, run_imp
        p = ctx.params
        figures = []
        results = []
        series: dict[tuple[str, int], dict[int, dict]] = {}  # (start, round) -> seed -> that round's record
        for cfg in completed(arms["student"]):
            info, data, recipe = supervised_inputs(ctx, cfg)
            out = ctx.out / f"seed{cfg.train.seed}"
            result = run_imp(info, list(p["starts"]), data, recipe, analysis_device(ctx), rounds=int(p["rounds"]),
                             out=out, fraction=float(p.get("fraction", 0.2)), progress=ctx.progress)
            results.append(result)
            figures += [f"![IMP seed {cfg.train.seed}]({out.relative_to(ctx.out)}/imp.png)"]
            for s in result["series"]:
                for k, r in enumerate(s["rounds"]):
                    series.setdefault((s["start"], k), {})[cfg.train.seed] = r
        if results:  # RT Fig. 8: mean and std over the distilled checkpoints
            figures.insert(0, f"![IMP, all checkpoints]({plot_imp(results, ctx.out / 'imp.png').name})")
        starts = list(p["starts"])
        rounds = sorted({k for _, k in series})
        paired = starts[:2] if len(starts) > 1 else []  # Fig. 8's question: the student's start against the next
        head = ["weights remaining (%)"] + [f"{s} test acc. (%)" for s in starts] + \
            [f"{paired[0]} − {paired[1]}, paired over seeds (pp)"] * bool(paired)
        rows = []
        for k in rounds:
            at = {s: series.get((s, k), {}) for s in starts}
            remaining = next((100 * (1 - r["sparsity"]) for s in starts for r in at[s].values()), math.nan)
            row = [f"{remaining:.3g}"] + [fmt(*mean_std([r["test_accuracy"] for r in at[s].values()])) for s in starts]
            if paired:
                a, b = at[paired[0]], at[paired[1]]
                gaps = [a[seed]["test_accuracy"] - b[seed]["test_accuracy"] for seed in a if seed in b]
                row.append(fmt(*mean_std(gaps)))
            rows.append(row)
        return ["## test accuracy vs sparsity (mean ± std over distilled checkpoints)", ""] + \
            markdown_rows(head, rows) + missing_note(arms, ["student"]) + figures + [""]


EXPERIMENT = Imp()
