"""Escape dynamics (escaping paper, Fig. 1b-d, App. A): step-size, batch-size and stabilization
sweeps, `randteach.analysis.escape.run_escape`."""
from __future__ import annotations

from pathlib import Path

from .base import Context, Experiment, known_params, markdown_rows, seed_bases


ESCAPE_PARAMS = ("steps", "probe_every_steps", "lrs", "batch_sizes", "batch_lr", "stabilize", "stabilize_losses",
                 "stabilize_lr", "warmup_steps", "collapse_metric", "exact", "erank_samples", "prune_checkpoints",
                 "group_steps", "early_probes")


ESCAPE_SWEEP = ("lrs", "batch_sizes", "batch_lr", "stabilize", "stabilize_losses", "stabilize_lr", "warmup_steps")


class Escape(Experiment):
    name = "escape"
    ids = "E13, E15"
    paper = "escaping paper Fig. 1b-d, App. A"
    claim = ("with SGD on the normalized loss the student leaves the teacher only at large step sizes (eta ~ 1e4), "
             "through a representational collapse (probe minimum) followed by a slow recovery; larger batches "
             "escape alike; ND-MSE with a warm-up is the stable variant.")

    # variant_config's run length, probe schedule and logging, and every variant's step size and schedule
    sets = ("train.epochs", "train.max_steps", "train.probe_every", "train.checkpoint_every", "train.probe_at",
            "train.checkpoint_at", "train.log_every", "optim.lr", "optim.schedule")

    def stages(self, ctx: Context):
        return []  # run_escape distills its own runs (locally, in this process)

    def _kwargs(self, ctx: Context) -> dict:
        return known_params(ctx, ESCAPE_PARAMS)

    def post(self, ctx: Context) -> list[str]:
        from ..analysis.escape import escape_variants
        kw = self._kwargs(ctx)
        variants = escape_variants(**{k: kw[k] for k in ESCAPE_SWEEP if k in kw})
        per_group = "".join(f", {g} {s}" for g, s in (kw.get("group_steps") or {}).items())
        return [f"seed {c.train.seed}: run_escape with {len(variants)} runs of {kw.get('steps')} steps each{per_group} "
                f"({', '.join(v.group + '/' + v.label for v in variants)}) into {ctx.out / f'seed{c.train.seed}'}"
                for c in seed_bases(ctx)]

    def own_runs(self, ctx: Context) -> list[Path]:
        from ..analysis.escape import escape_variants
        kw = self._kwargs(ctx)
        variants = escape_variants(**{k: kw[k] for k in ESCAPE_SWEEP if k in kw})
        return [ctx.out / f"seed{c.train.seed}" / v.group / v.label for c in seed_bases(ctx) for v in variants]

    def analyze(self, ctx: Context, arms) -> list[str]:
        from ..analysis.escape import probe_value, run_escape
        lines = []
        for cfg in seed_bases(ctx):
            out = ctx.out / f"seed{cfg.train.seed}"
            result = run_escape(cfg, out, progress=ctx.progress, **self._kwargs(ctx))
            rows = []
            erank = result["collapse_metric"] == "erank"
            for r in result["runs"]:
                teacher = next((probe_value(p, "teacher") for p in r["probes"] if "teacher" in p), None)
                # a diverged run's last probe is from before it diverged: no final accuracy to show
                final = probe_value(r["final_probe"]) if r["status"] == "completed" else None
                c = r.get("collapse") or {}
                lowest = (None if c.get("value") is None else
                          f"{c['value']:.1f}" if erank else f"{100 * c['value']:.2f}")
                rows.append([r["group"], r["label"], str(r["status"]) + (f" at step {r['diverged_step']}"
                                                                         if r.get("diverged_step") else ""),
                             f"{100 * teacher:.2f}" if teacher is not None else "–",
                             f"{lowest} (step {c['step']})" if lowest else "–",
                             f"{100 * final:.2f}" if final is not None else "–"])
            lines += [f"## seed {cfg.train.seed}: {result['encoder']} on {result['data']} (n = {result['n_samples']}, "
                      f"{result['steps']} steps, probe every {result['probe_every_steps']}{_early(result)})", ""]
            kind = _probe_kind(result["runs"])
            lowest = "collapse: lowest student embedding erank" if erank else f"collapse: lowest student {kind} (%)"
            lines += markdown_rows(["group", "run", "status", f"teacher {kind} (%)", lowest,
                                    f"final student {kind} (%)"], rows)
            lines += [f"![{g}]({Path(p).relative_to(ctx.out)})" for g, p in result["figures"].items()] + [""]
        return lines


def _probe_kind(runs: list[dict]) -> str:
    """What `probe_value` read: linear where the runs were probed linearly, else k-NN."""
    return "linear" if any("linear" in p.get("student", {}) for r in runs for p in r["probes"]) else "k-NN"


def _early(result: dict) -> str:
    early = result.get("early_probes")
    return f" and at steps {', '.join(map(str, early))}" if early else ""


EXPERIMENT = Escape()
