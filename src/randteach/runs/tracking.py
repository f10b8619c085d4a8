"""Tracking sinks: metrics.jsonl's records mirrored to TensorBoard and Weights & Biases, live.

Off by default and optional (`pip install 'randteach[track]'`). `RunDir.log` forwards every record it
writes to the run's sinks and `RunDir.write_summary` closes them, so the training loop only attaches
them (`run.sinks = sinks_for(cfg, run.path)`). What a sink receives is exactly a metrics.jsonl record:
numbers are logged under their key, nested dicts under slash-joined keys (a probe record's
{"teacher": {"linear": 0.8}} becomes "probe/teacher/linear"), at the record's "step". The resolved
config goes in once, as hyperparameters.
"""
from __future__ import annotations

import atexit
import json
import math
from pathlib import Path

from ..config import Config
from ..errors import UserError


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a record under `prefix` (nested dicts flattened with '/', "nan"/"inf" strings as
    floats); the step and the event name are the record's address, not values."""
    return _numbers({k: v for k, v in record.items() if k not in ("step", "event")}, prefix)


def _numbers(d: dict, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_numbers(value, name + "/"))
        elif isinstance(value, (int, float)):  # bool is an int: logged as 0 / 1
            out[name] = float(value)
        elif isinstance(value, str) and value in ("nan", "inf", "-inf"):
            out[name] = float(value)
    return out


def _tag_prefix(record: dict) -> str:
    event = record.get("event")
    return f"{event}/" if isinstance(event, str) and event != "step" else "train/"  # steps: "train/loss"


def hyperparameters(cfg: Config) -> dict[str, int | float | str | bool]:
    """The config flattened to dotted keys; lists, mappings and None as their JSON text."""
    flat: dict = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and k != "encoder_args":
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    walk(cfg.to_dict(), "")
    return flat


class TensorBoardSink:
    """Event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR`)."""

    def __init__(self, cfg: Config, run_path: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError:
            raise UserError("log.tensorboard=true needs the tensorboard package: `pip install tensorboard` "
                            "(or `pip install 'randteach[track]'`), or set --log.tensorboard false") from None
        self.writer = SummaryWriter(log_dir=str(run_path / "tensorboard"))
        for summary in hparams(hyperparameters(cfg), {}):  # the hparams plugin's three records
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + cfg.to_yaml() + "```")

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for tag, value in scalars(record, _tag_prefix(record)).items():
            self.writer.add_scalar(tag, value, step)
        if record.get("event", "step") != "step":
            self.writer.flush()  # probes and other events are rare and worth seeing at once

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run in project log.wandb; its local files under RUN_DIR/wandb (offline: sync later)."""

    def __init__(self, cfg: Config, run_path: Path):
        try:
            import wandb
        except ImportError:
            raise UserError("log.wandb needs the wandb package: `pip install wandb` "
                            "(or `pip install 'randteach[track]'`), or leave --log.wandb unset") from None
        mode = None if cfg.log.wandb_mode == "default" else cfg.log.wandb_mode
        try:
            self.run = wandb.init(project=cfg.log.wandb, dir=str(run_path), name=run_path.name, mode=mode,
                                  config=hyperparameters(cfg), reinit="create_new")
        except (wandb.errors.UsageError, wandb.errors.CommError) as e:  # no login, no server
            raise UserError(f"W&B could not start a run in project {cfg.log.wandb!r} ({str(e).strip()}); log in "
                            "with `wandb login`, or log locally with --log.wandb_mode offline and upload later "
                            "with `wandb sync`") from None
        self._last_step = -1

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        values = {k: v for k, v in scalars(record, _tag_prefix(record)).items() if math.isfinite(v)}
        if step < self._last_step:  # W&B drops steps that go back (a resumed run re-logs them)
            return
        self._last_step = step
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def sinks_for(cfg: Config, run_path: Path) -> list:
    """The sinks `cfg.log` asks for; each is closed once, at the latest when the process exits."""
    sinks = []
    if cfg.log.tensorboard:
        sinks.append(TensorBoardSink(cfg, run_path))
    if cfg.log.wandb:
        sinks.append(WandbSink(cfg, run_path))
    sinks = [_Once(s) for s in sinks]
    for sink in sinks:
        atexit.register(sink.close)
    return sinks


class _Once:
    """A sink whose close() runs at most once (the summary closes it; atexit catches crashed runs)."""

    def __init__(self, sink):
        self.sink = sink
        self.closed = False

    def write(self, record: dict) -> None:
        if not self.closed:
            self.sink.write(record)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sink.close()
