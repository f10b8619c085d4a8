"""The run directory: one format for every run.

    RUN_DIR/config.yaml     the resolved config
    RUN_DIR/metrics.jsonl   one JSON object per line, each with an "event": training steps
                            ({"event": "step", "step", "loss", ...}, every train.log_every steps) and
                            probes ({"event": "probe", "epoch", "teacher": {...}, ...})
    RUN_DIR/checkpoints/    teacher.pt, student_init.pt, student_step<N>.pt, student.pt, last.pt (resume state)
    RUN_DIR/summary.json    status, final probes, steps, wall time
    RUN_DIR/tensorboard/, RUN_DIR/wandb/   with log.tensorboard / log.wandb: live mirrors of metrics.jsonl
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become strings ("nan", "inf") rather than invalid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: Path, data: Any) -> None:
    """Atomically write JSON (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(_clean(data), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.sinks: list = []  # tracking sinks (`track`): each record logged is forwarded to them

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def create(self) -> "RunDir":
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        return self

    def track(self, cfg) -> None:
        """Attach the tracking sinks that `cfg.log` asks for (none by default)."""
        from .tracking import sinks_for
        self.sinks = sinks_for(cfg, self.path)

    def log(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(_clean(record)) + "\n")
        for sink in self.sinks:
            sink.write(_clean(record))

    def records(self) -> Iterator[dict]:
        if not self.metrics_path.exists():
            return
        with open(self.metrics_path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a kill
                        continue

    def truncate_after(self, step: int) -> None:
        """Drop records logged after `step` (a resumed run re-logs them)."""
        if not self.metrics_path.exists():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        fd, tmp = tempfile.mkstemp(dir=self.path)
        with os.fdopen(fd, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.metrics_path)

    def steps(self) -> list[dict]:
        """The training-step records (runs written before records carried an "event" have none on steps)."""
        return [r for r in self.records() if r.get("event", "step") == "step" and "loss" in r]

    def probes(self) -> list[dict]:
        return [r for r in self.records() if r.get("event") == "probe"]

    def write_summary(self, summary: dict) -> None:
        """The run's last word: also ends its tracking sinks (the summary's probes logged first)."""
        write_json(self.summary_path, summary)
        for sink in self.sinks:
            sink.write({"event": "summary", "step": summary.get("steps", 0), "probe": summary.get("probe", {})})
            sink.close()

    def summary(self) -> dict | None:
        if not self.summary_path.exists():
            return None
        return json.loads(self.summary_path.read_text())
