"""Escape dynamics (escaping paper, Fig. 1b-d, App. A): step-size, batch-size and stabilization
sweeps, `randteach.analysis.escape.run_escape`."""
from __future__ import annotations

from pathlib import Path

from ..text import counted
from .base import Context, Experiment, known_params, markdown_rows, seed_bases


ESCAPE_PARAMS = ("steps", "probe_every_steps", "lrs", "batch_sizes", "batch_lr", "stabilize", "stabilize_losses",
                 "stabilize_lr", "warmup_steps", "collapse_metric", "exact", "erank_samples", "prune_checkpoints",
                 "group_steps", "early_probes", "keep_steps")


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
        probes = f"probed every {kw.get('probe_every_steps')}{_schedule(kw)}"
        runs = ", ".join(v.group + "/" + v.label for v in variants)
        return [f"seed {c.train.seed}: run_escape with {counted(len(variants), 'run')} of {kw.get('steps')} steps each"
                f"{per_group}, {probes} ({runs}) into {ctx.out / f'seed{c.train.seed}'}" for c in seed_bases(ctx)]

    def own_runs(self, ctx: Context) -> list[Path]:
        from ..analysis.escape import escape_variants
        kw = self._kwargs(ctx)
        variants = escape_variants(**{k: kw[k] for k in ESCAPE_SWEEP if k in kw})
        return [ctx.out / f"seed{c.train.seed}" / v.group / v.label for c in seed_bases(ctx) for v in variants]

    def analyze(self, ctx: Context, arms) -> list[str]:
        from ..analysis.escape import run_escape
        lines = []
        for cfg in seed_bases(ctx):
            out = ctx.out / f"seed{cfg.train.seed}"
            result = run_escape(cfg, out, progress=ctx.progress, **self._kwargs(ctx))
            lines += [f"## seed {cfg.train.seed}: {result['encoder']} on {result['data']} (n = {result['n_samples']}, "
                      f"{result['steps']} steps, probe every {result['probe_every_steps']}{_schedule(result)})", ""]
            lines += _table(result)
            lines += [f"![{g}]({Path(p).relative_to(ctx.out)})" for g, p in result["figures"].items()] + [""]
        return lines


def _table(result: dict) -> list[str]:
    """One row per run: its teacher, its collapse (lowest probe or embedding rank) and its final student."""
    from ..analysis.escape import probe_reading
    from ..reports.run import KIND_LABEL
    erank = result["collapse_metric"] == "erank"
    readings = [probe_reading(p) for r in result["runs"] for p in r["probes"]]
    kind = KIND_LABEL[next((k for k, _ in filter(None, readings)), "linear")]
    rows = []
    for r in result["runs"]:
        teacher = next((probe_reading(p, "teacher") for p in r["probes"] if "teacher" in p), None)
        # a diverged run's last probe is from before it diverged: no final accuracy to show
        final = probe_reading(r["final_probe"]) if r["status"] == "completed" else None
        c = r.get("collapse") or {}
        status = str(r["status"]) + (f" at step {r['diverged_step']}" if r.get("diverged_step") else "")
        rows.append([r["group"], r["label"], status, _percent(teacher), _lowest(c, erank), _percent(final)])
    lowest = "collapse: lowest student embedding erank" if erank else f"collapse: lowest student {kind} (%)"
    return markdown_rows(["group", "run", "status", f"teacher {kind} (%)", lowest, f"final student {kind} (%)"],
                         rows)


def _percent(reading: tuple[str, float] | None) -> str:
    return f"{100 * reading[1]:.2f}" if reading else "–"


def _lowest(collapse: dict, erank: bool) -> str:
    value = collapse.get("value")
    if value is None:
        return "–"
    return (f"{value:.1f}" if erank else f"{100 * value:.2f}") + f" (step {collapse['step']})"


def _schedule(result: dict) -> str:
    early, kept = result.get("early_probes"), result.get("keep_steps")
    return ((f" and at steps {', '.join(map(str, early))}" if early else "")
            + (f"; the student of step {', '.join(map(str, kept))} kept" if kept else ""))


EXPERIMENT = Escape()
