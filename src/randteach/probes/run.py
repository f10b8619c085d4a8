"""Probe a finished run on any data set: `randteach probe RUN_DIR [--probe.data NAME]` (transfer: Sarnthein et al. 2023, Tab. 2 and 4)."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

from ..config import changeable_after_training, config_from_dict, dotted_to_nested, parse_overrides
from ..data import ImageData
from ..errors import UserError
from ..models import build_model
from ..precision import uses_bf16
from ..runs.checkpoint import load_checkpoint, load_state_dict, load_weights, resolve_model_checkpoint
from ..runs.rundir import ResultsNotSaved, RunDir, check_data_folder, check_encoder_given, python_objects, run_lock, write_json
from ..train.setup import resolve_device
from .embedding import Prober, probe_data_name


def probe_run(run_dir: str | Path, overrides: list[str] | dict | None = None, *, checkpoint: str | None = None,
              progress: bool = True, splits: tuple[ImageData, ImageData] | None = None,
              architecture=None) -> dict:
    """Probe teacher, student and input of a run; result also written to RUN_DIR/probes/<data>.json.

    Python API: `splits` (train, test) replace the configured probe data; `architecture` (an encoder
    factory or module) rebuilds a run whose encoder came from Python rather than model.encoder."""
    with run_lock(run_dir):  # one writer per run folder
        return _probe_run(RunDir(run_dir), overrides, checkpoint, splits, architecture)


def _check_python_objects(run: RunDir, splits, architecture, overrides: dict) -> None:
    """A run trained on a Python encoder or data: config.yaml names neither, so they must come again."""
    check_encoder_given(run.path, architecture)
    given = python_objects(run.path)
    if given.get("train") and splits is None and "probe.data" not in overrides:
        raise UserError(f"{run.path} was trained on data given from Python, which config.yaml cannot name; pass "
                        "the data to probe on (randteach.probe(run, train=..., test=...)) or name a data set "
                        "(--probe.data NAME)")


def _probe_run(run: RunDir, overrides, checkpoint, splits, architecture) -> dict:
    if not run.config_path.exists():
        raise UserError(f"{run.path} is not a randteach run directory (no config.yaml)")
    saved = run.saved_config()
    pairs = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    if pairs.get("model.encoder") == (saved.get("model") or {}).get("encoder"):
        pairs.pop("model.encoder")  # the run's own encoder, repeated to confirm the import
    for key in pairs:
        if not changeable_after_training(key, also=("data.subset_seed",)):  # the probe subsets' draw
            raise UserError(f"--{key}: `randteach probe` takes --probe.*, --data.root, --data.subset_seed and "
                            "--train.device only: the others describe another run than the one probed")
    own = config_from_dict(copy.deepcopy(saved))  # the run's own settings, before the overrides
    nested = dotted_to_nested(pairs)
    for section, values in nested.items():
        saved.setdefault(section, {}).update(values)
    cfg = config_from_dict(saved)
    _check_python_objects(run, splits, architecture, pairs)
    device = resolve_device(cfg.train.device)
    teacher_file = resolve_model_checkpoint(run.path, "teacher")
    teacher_ckpt = load_checkpoint(teacher_file)
    teacher_sd = teacher_ckpt["model"]
    student_sd = load_state_dict(checkpoint or run.path, "student")
    in_channels, size = int(teacher_ckpt["in_channels"]), int(teacher_ckpt["image_size"])
    teacher = build_model(cfg, in_channels, size, seed=0, encoder=architecture)
    student = build_model(cfg, in_channels, size, seed=0, encoder=architecture)
    load_weights(teacher, teacher_sd, teacher_file)
    load_weights(student, student_sd, checkpoint or run.checkpoints / "student.pt")
    if splits is None and probe_data_name(cfg) == "folder":
        check_data_folder(run, cfg, "probing")
    teacher.to(device)
    student.to(device)
    prober = Prober(cfg, in_channels, size, device, bf16=uses_bf16(cfg.train.precision, device), splits=splits)
    result = {}
    if "teacher" in cfg.probe.which:  # the probes run in exact fp32 (no TF32 on CUDA), as inside a run
        result["teacher"] = prober.frozen(teacher.encoder)  # cached by its weights
    if "student" in cfg.probe.which:
        result["student"] = prober.probe(student.encoder)
    if "input" in cfg.probe.which:
        result["input"] = prober.input()
    _save(run, cfg, own, checkpoint, splits, result)
    return result


def _save(run: RunDir, cfg, own, checkpoint: str | None, splits, result: dict) -> None:
    """RUN/probes/<data>.json under the run's own settings and checkpoint, with the roles probed there before;
    under other ones <data>-<hash>.json, so that no result passes for another."""
    name = splits[0].name if splits is not None else cfg.probe.data or cfg.data.name
    record = {"data": name, "checkpoint": str(checkpoint or "student.pt"), "settings": _settings(cfg),
              # data from Python: its name says little, its bytes decide what merges
              "data_digest": [part.digest() for part in splits] if splits is not None else None}
    path = run.path / "probes" / f"{name}.json"
    if record["settings"] != _settings(own) or checkpoint is not None:
        key = hashlib.sha256(json.dumps([record["settings"], record["checkpoint"]], sort_keys=True).encode())
        path = path.with_name(f"{name}-{key.hexdigest()[:8]}.json")
    try:
        write_json(path, {**record, "probe": {**_earlier(path, record), **result}})
    except OSError as e:
        raise ResultsNotSaved(f"the probe results could not be saved to {path}: {e.strerror or e} (read-only folder "
                              "or full disk?); the run itself is untouched", result) from None


def _settings(cfg) -> dict:
    """What a probe result depends on besides the weights and the data's name: the probe's settings (less
    which roles and the batch size), the data keys (subsets, their seed, the image size; not where the data
    lies) and the precision."""
    probe = {k: v for k, v in dataclasses.asdict(cfg.probe).items() if k not in ("which", "data", "batch_size")}
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "root"}
    return {"probe": probe, "data": data, "precision": cfg.train.precision}


def _earlier(path: Path, record: dict) -> dict:
    """The roles probed before into `path` under the same data, checkpoint and settings (kept beside the new)."""
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    same = isinstance(before, dict) and {k: v for k, v in before.items() if k != "probe"} == record
    return before.get("probe", {}) if same and isinstance(before.get("probe"), dict) else {}
