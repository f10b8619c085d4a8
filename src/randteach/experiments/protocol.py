"""The papers' probe protocols beside ours, for tables that show the papers' reference numbers.

Our probes are a converged L2 logistic regression and DINO's cosine k-NN; the random-teacher paper's numbers
come from an AdamW 10-epoch linear probe (Tab. 1, 2, 5) and an unweighted L2 majority-vote k-NN (Tab. 3). A
recipe's `params.paper_protocol` (probe overrides, e.g. {probe.linear: adamw, probe.knn_weighting:
majority}) re-probes every finished run with them; the results enter the tables as the kinds
`paper_linear` and `paper_knn`, labelled, beside ours. Each re-probe is cached in the run directory.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..runs.rundir import write_json

PAPER_KINDS = {"linear": "paper_linear", "knn": "paper_knn"}


def cached_probe(run_dir: str | Path, overrides: dict, stem: str, progress: bool = False) -> dict:
    """Teacher/student/input probes of a finished run under `overrides`, cached in
    RUN_DIR/probes/<stem>-<hash of the overrides>.json (a re-run probes only what is missing)."""
    from ..probes.run import probe_run
    key = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
    cache = Path(run_dir) / "probes" / f"{stem}-{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())["probe"]
    result = probe_run(run_dir, overrides, progress=progress)
    write_json(cache, {"overrides": overrides, "probe": result})
    return result


def paper_metrics(probe: dict) -> dict[str, float]:
    """{"<role>.paper_<kind>": accuracy} of a probe result under the papers' protocol."""
    return {f"{role}.{PAPER_KINDS[kind]}": float(v) for role, r in probe.items() for kind, v in r.items()
            if kind in PAPER_KINDS and isinstance(v, (int, float))}


def with_paper_protocol(rows: list[dict], protocol: dict | None, extra: dict | None = None,
                        progress: bool = False) -> list[dict]:
    """`rows` (aggregate rows) with the papers' protocol metrics added to every completed run
    (`extra`: further probe overrides, e.g. a transfer target). Unchanged without a protocol."""
    if not protocol:
        return rows
    pairs = {**(extra or {}), **{k: str(v) for k, v in protocol.items()}}
    out = []
    for row in rows:
        if row["status"] == "completed":
            probe = cached_probe(row["run_dir"], pairs, "paper-protocol", progress)
            row = {**row, "metrics": {**row["metrics"], **paper_metrics(probe)}}
        out.append(row)
    return out
