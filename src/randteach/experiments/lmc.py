"""Linear mode connectivity from the student vs a random init (Sarnthein et al. 2023, Fig. 9): the runs,
then `randteach.analysis.lmc.run_lmc` (in this process, on `params.device`)."""
from __future__ import annotations

from ..reports.experiment import fmt, mean_std
from .base import Context, Experiment, analysis_device, completed, markdown_rows, missing_note, supervised_inputs


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
        from ..analysis.lmc import BARRIER, plot_lmc, pooled_series, run_lmc
        p = ctx.params
        figures = []
        results = []
        for cfg in completed(arms["student"]):
            info, data, recipe = supervised_inputs(ctx, cfg)
            out = ctx.out / f"seed{cfg.train.seed}"
            results.append(run_lmc(info, list(p["starts"]), data, recipe, analysis_device(ctx), out=out,
                                   runs=int(p["runs"]), resolution=int(p.get("resolution", 11)),
                                   bn_batches=int(p.get("bn_batches", 8)), progress=ctx.progress))
            figures += [f"![LMC seed {cfg.train.seed}]({out.relative_to(ctx.out)}/lmc.png)"]
        if results:  # RT Fig. 9: every pair of every distilled checkpoint in one figure
            figures.insert(0, f"![LMC, all checkpoints]({plot_lmc(results, ctx.out / 'lmc.png').name})")
        rows = [[s["start"], str(len(s["pairs"])), fmt(*mean_std([pair["barrier"] for pair in s["pairs"]])),
                 fmt(*mean_std([r["test_error"] for r in s["runs"]]))] for s in pooled_series(results)]
        return ["## barrier heights (test error, mean ± std over all pairs of all distilled checkpoints)", "",
                f"barrier of a pair: {BARRIER}; endpoint test error: mean ± std over the runs.", ""] + \
            markdown_rows(["start", "pairs", "barrier (pp of test error)", "endpoint test error (%)"], rows) + \
            missing_note(arms, ["student"]) + figures + [""]


EXPERIMENT = Lmc()
