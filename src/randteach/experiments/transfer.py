"""E5 (Tab. 2, Tab. 4): transfer. Distill on a source data set (one arm per source), then probe teacher,
student and raw input on every target data set of `params.targets` with `randteach.probes.run.probe_run`.
A target's probe result is cached in the run directory (probes/transfer-<target>-<hash>.json), so a
re-run probes only what is missing. The source itself as a target is the run's own final probe."""
from __future__ import annotations

from pathlib import Path

from ..reports.experiment import arm_section, rows_of
from .base import Context, Experiment
from .protocol import cached_probe, paper_metrics

TARGET_KEY = "probe.data"


def targets(ctx: Context) -> list[dict]:
    """[{"name": target, "overrides": {dotted probe overrides}}] from params.targets (names or mappings)."""
    out = []
    for t in ctx.params.get("targets", []):
        t = {"name": t} if isinstance(t, str) else dict(t)
        name = t.pop("name")
        out.append({"name": name, "overrides": {k: str(v) for k, v in t.items()}})
    return out


def transfer_probe(run_dir: str | Path, target: str, overrides: dict, progress: bool = False) -> dict:
    """Teacher/student/input probes of a finished run on `target` (cached in the run directory)."""
    return cached_probe(run_dir, {TARGET_KEY: target, **overrides}, f"transfer-{target}", progress)


def _metrics(probe: dict) -> dict[str, float]:
    return {f"{role}.{kind}": float(v) for role, r in probe.items() for kind, v in r.items()
            if isinstance(v, (int, float))}


class Transfer(Experiment):
    name = "transfer"
    ids = "E5"
    paper = "Tab. 2, Tab. 4"
    claim = ("features distilled on one data set transfer: probed on other data sets, the student still beats "
             "its random teacher (TinyImageNet -> CIFAR10: ResNet18 35.50 -> 46.06, VGG11 36.55 -> 52.45).")

    def post(self, ctx: Context) -> list[str]:
        return [f"probe every finished run on {t['name']}"
                + (" with " + ", ".join(f"{k}={v}" for k, v in t["overrides"].items()) if t["overrides"] else "")
                for t in targets(ctx)]

    def analyze(self, ctx: Context, arms) -> list[str]:
        rows = []
        keys: list[str] = []
        seen: set[str] = set()  # arms whose configs are one run (the tiny recipe's): each run counts once
        for arm in ctx.recipe.arms:
            keys += [k for k in arm.keys() if k not in keys]
            for row in rows_of(arms[arm.name]):
                if row["run_dir"] in seen:
                    continue
                seen.add(row["run_dir"])
                for t in targets(ctx):
                    own = t["name"] == row["config"]["data.name"] and not t["overrides"]
                    if row["status"] != "completed":
                        probe = {}
                    elif own:
                        probe = row["summary"].get("probe", {})
                    else:
                        probe = transfer_probe(row["run_dir"], t["name"], t["overrides"], ctx.progress)
                    metrics = _metrics(probe)
                    protocol = ctx.params.get("paper_protocol")
                    if protocol and row["status"] == "completed":  # the papers' probes beside ours (Tab. 2)
                        pairs = {**t["overrides"], **{k: str(v) for k, v in protocol.items()}}
                        metrics.update(paper_metrics(transfer_probe(row["run_dir"], t["name"], pairs, ctx.progress)))
                    rows.append({**row, "config": {**row["config"], TARGET_KEY: t["name"]}, "metrics": metrics})
        keys = ["data.name"] + [k for k in keys if k != "data.name"] + [TARGET_KEY]
        section, _ = arm_section("source (data.name) -> target (probe.data)", rows, keys, ctx.out, "transfer",
                                 references=ctx.recipe.reference, curves=False,
                                 labels={"data.name": "source", TARGET_KEY: "target"})
        return section


EXPERIMENT = Transfer()
