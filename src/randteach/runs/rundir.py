"""The run directory: one format for every run.

    RUN_DIR/config.yaml     the resolved config
    RUN_DIR/metrics.jsonl   one JSON object per line, each with an "event": training steps
                            ({"event": "step", "step", "loss", ...}, every train.log_every steps) and
                            probes ({"event": "probe", "epoch", "teacher": {...}, ...})
    RUN_DIR/checkpoints/    teacher.pt, student_init.pt, student_step<N>.pt, student.pt, last.pt (resume state)
                            (+ teacher_final.pt where teacher.mode moves the teacher: the end's teacher)
    RUN_DIR/summary.json    status, final probes, steps, wall time
    RUN_DIR/tensorboard/, RUN_DIR/wandb/   with log.tensorboard / log.wandb: live mirrors of metrics.jsonl
    RUN_DIR/.lock           advisory lock of the one process writing into the run (its PID)
    RUN_DIR/data_folder.json   with data.name=folder: what the image folder held when the run began
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import platform
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import launcher
from ..errors import RandteachWarning, UserError
from ..data.folder import configured_contents
from ..files import written_whole
from ..text import counted

LOCK_FILE = ".lock"  # flock'ed by the one process writing into the run; holds its PID
PYTHON_OBJECTS = "python_objects.json"  # marks a run whose encoder or data came from the Python API
DATA_FOLDER = "data_folder.json"  # what the image folder of a data.name=folder run held when the run began
OPENING_FILES = {"config.yaml", LOCK_FILE, PYTHON_OBJECTS, DATA_FOLDER, "checkpoints"}  # what opening a new run writes
_held: set[str] = set()  # run folders this process has locked (a nested run_lock of one of them passes)


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become strings ("nan", "inf") rather than invalid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def python_objects(run: str | Path) -> dict:
    """What of a run came from Python objects that config.yaml cannot name ({"encoder": bool, "train": bool,
    ...}; empty for a run made from its config alone)."""
    marker = Path(run) / PYTHON_OBJECTS
    return json.loads(marker.read_text()) if marker.is_file() else {}


def check_encoder_given(run: str | Path, architecture) -> None:
    """Refuse to rebuild a run whose encoder came from a Python object when it is not given again: config.yaml
    cannot name it, and the model it does name would not take the checkpoints' weights."""
    if architecture is None and python_objects(run).get("encoder"):
        raise UserError(f"{run}: its encoder came from a Python object, which config.yaml cannot name, so the "
                        "command line cannot rebuild it; from Python, give the encoder again as "
                        "architecture=YourEncoder (randteach.load_encoder, probe, signal_report, landscape, imp, "
                        "lmc)")


def open_data_folder(run: RunDir, cfg) -> None:
    """A run on an image folder (data.name=folder) records what the folder holds as it trains from its first
    step (a new run, or one started again after a failure), and is compared with that record as it resumes
    from its last.pt (`check_data_folder`). An explicit --out keeps the run's address when the folder
    changes, so nothing else would tell."""
    if (run.checkpoints / "last.pt").is_file():
        check_data_folder(run, cfg, "resuming")
        return
    contents = configured_contents(cfg.data)
    if contents is not None:
        write_json(run.path / DATA_FOLDER, {"path": cfg.data.path, "contents": contents[0], "files": contents[1]})


def check_data_folder(run: RunDir, cfg, doing: str) -> None:
    """Warn where `doing` a later step of a run (resuming it, probing it) reads an image folder changed since
    the run began: the images read are not those it trained on."""
    try:
        then = json.loads((run.path / DATA_FOLDER).read_text())
    except (OSError, ValueError):
        return  # no image folder, a run from before the record, or a damaged one: nothing to compare with
    contents = configured_contents(cfg.data)
    if contents is not None and isinstance(then, dict) and then.get("contents") != contents[0]:
        warnings.warn(f"{doing} {run.path}: its image folder {cfg.data.path} has changed since the run began "
                      f"({then.get('files')} image files then, {contents[1]} now; or files rewritten, or their "
                      "modification times changed): the images read now are not those the run began on. Restore "
                      "the folder, or start a new run", RandteachWarning, stacklevel=3)


def write_json(path: Path, data: Any) -> None:
    """Atomically write JSON (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as f:
        json.dump(_clean(data), f, indent=2)
        f.write("\n")


def changed_settings(saved: dict, now: dict) -> str:
    """What differs between the settings an analysis folder was made with and those given now, e.g.
    "recipe.epochs 2 there, 3 now", for the message that refuses to continue it."""
    from ..config import flatten
    a, b = flatten(json.loads(json.dumps(saved))), flatten(json.loads(json.dumps(now)))

    def shown(value) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return ", ".join(f"{k} {shown(a.get(k))} there, {shown(b.get(k))} now"
                     for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _well_formed_probe(record: dict) -> bool:
    numbers = all(isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool)
                  for k in ("step", "epoch"))
    return numbers and all(isinstance(record[role], dict) for role in ("teacher", "student", "input") if role in record)


class CorruptSummary(UserError, ValueError):
    """summary.json is not readable JSON (a ValueError, like the JSONDecodeError it replaces)."""


class ResultsNotSaved(UserError):
    """Results computed but not written (disk full, read-only folder); `.result` holds them."""

    def __init__(self, message: str, result: Any):
        super().__init__(message)
        self.result = result


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
        """The records of metrics.jsonl, less damaged lines. A kill can cut short only the last line, which is
        skipped quietly; a damaged line before it (a hand edit, a damaged disk) is skipped with a warning."""
        if not self.metrics_path.exists():
            return
        damaged = []
        with open(self.metrics_path, errors="replace") as f:  # damaged bytes spoil their line only
            for last, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if isinstance(record, dict):  # every record is an object: anything else is damage
                    yield record
                else:
                    damaged.append(last)
        if damaged and damaged != [last]:
            lines = ", ".join(map(str, damaged[:10])) + (" ..." if len(damaged) > 10 else "")
            warnings.warn(f"{self.metrics_path}: {counted(len(damaged), 'damaged line')} skipped (line {lines}); the step and "
                          "probe records on them are missing from figures and reports", RandteachWarning,
                          stacklevel=2)

    def truncate_after(self, step: int) -> None:
        """Drop records logged after `step` (a resumed run re-logs them)."""
        if not self.metrics_path.exists():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        with written_whole(self.metrics_path) as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")

    def steps(self) -> list[dict]:
        """The training-step records (runs written before records carried an "event" have none on steps)."""
        return [r for r in self.records() if r.get("event", "step") == "step" and "loss" in r]

    def probes(self) -> list[dict]:
        """The probe records, less damaged ones (a hand edit: a step or epoch that is no number, a role's result
        that is no mapping), which the readers would fail on."""
        return [r for r in self.records() if r.get("event") == "probe" and _well_formed_probe(r)]

    def write_summary(self, summary: dict) -> None:
        """The run's last word: also ends its tracking sinks (the summary's probes logged first)."""
        write_json(self.summary_path, summary)
        for sink in self.sinks:
            sink.write({"event": "summary", "step": summary.get("steps", 0), "probe": summary.get("probe", {})})
            sink.close()

    def summary(self) -> dict | None:
        if not self.summary_path.exists():
            return None
        try:
            summary = json.loads(self.summary_path.read_text())
            if not isinstance(summary, dict):
                raise ValueError(f"a JSON {type(summary).__name__} where an object belongs")
            return summary
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise CorruptSummary(f"{self.summary_path} is corrupt ({e}); nothing was changed. If the run has a "
                                 f"checkpoints/last.pt, delete summary.json and resume: `randteach distill --resume "
                                 f"{self.path}`; otherwise start it again with --out elsewhere") from None

    def started(self) -> bool:
        """Has training begun (a resumable checkpoint, or the summary of a run that trained)? A folder holding
        only config.yaml, or the "failed" summary of a sweep's run that failed before its first checkpoint,
        is a start that failed before training: it does not bind the folder to that config (the fix of a
        setting that stopped it runs there)."""
        if (self.checkpoints / "last.pt").exists():
            return True
        try:
            summary = self.summary()
        except CorruptSummary:
            return True  # unreadable: taken as a run that trained, which nothing may replace unasked
        return summary is not None and summary.get("status") != "failed"

    def holds_another_config(self, cfg) -> bool:
        """Whether the folder holds a run that has begun (`started`) of a config other than `cfg`."""
        if not (self.config_path.exists() and self.started()):
            return False
        from ..config import config_from_dict
        return config_from_dict(self.saved_config()).digest() != cfg.digest()

    def saved_config(self) -> dict:
        """config.yaml as a mapping; a damaged file is a clear error, not a parser's traceback."""
        from ..config import ConfigError, load_yaml
        saved = load_yaml(self.config_path, "the run's config")
        if not saved:
            raise ConfigError(f"{self.config_path} is empty; a run's config.yaml holds its whole config: restore it")
        return saved

    def refuse_another_config(self, cfg) -> None:
        """A run directory of another config is not this run's (a start that failed before training,
        config.yaml alone, binds nothing)."""
        if self.holds_another_config(cfg):
            raise UserError(f"{self.path} holds a run with a different config (other options, or an earlier "
                            f"randteach's defaults); choose another --out, or continue that run as it was "
                            f"configured with `randteach distill --resume {self.path}`")

    def remove_if_unstarted(self) -> None:
        """Remove the folder if it holds nothing but what opening a run writes (`OPENING_FILES`, with
        checkpoints/ empty): a new run that failed before it wrote anything else leaves no folder behind."""
        if not _writes() or not self.path.is_dir():
            return
        if {p.name for p in self.path.iterdir()} <= OPENING_FILES and not any(self.checkpoints.glob("*")):
            shutil.rmtree(self.path, ignore_errors=True)

    def remove_stale_temporaries(self) -> None:
        """Temporary files of writes cut short by a kill (the lock guarantees no writer is running)."""
        if not _writes():
            return
        for folder in (self.path, self.checkpoints):
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
                tmp.unlink(missing_ok=True)


def probe_warnings(probes: list[dict]) -> dict:
    """{"warnings": [...]} naming every probe that could not measure its features (see probe.unmeasurable)."""
    notes = [f"epoch {r.get('epoch', 0):g} {role}: {r[role]['invalid']}" for r in probes
             for role in ("teacher", "student", "input") if "invalid" in r.get(role, {})]
    return {"warnings": notes} if notes else {}


def run_summary(run: RunDir, *, status: str, steps: int, epochs: float, wall: float, init: dict, digest: str,
                device, precision: str, **extra) -> dict:
    """summary.json of a distillation run: its status and its last probe (the same shape for every status,
    for a run trained alone or in a stack)."""
    probes = run.probes()
    final = probes[-1] if probes else {}
    return {"status": status, "steps": steps, "epochs": epochs, "wall_time_s": wall,
            "probe": {k: final[k] for k in ("teacher", "student", "input") if k in final},
            "probe_epoch": final.get("epoch"),  # after a stop, the last probe may be epoch 0
            "init": init, "config_digest": digest, "device": str(device), **_gpu(device), "precision": precision,
            # the torch threads of the run's last stretch: on a CPU its arithmetic depends on them
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "host": platform.node(),
            **probe_warnings(probes), **extra}


def _gpu(device) -> dict:
    """Which GPU a CUDA run used: its model, and the physical GPU(s) CUDA_VISIBLE_DEVICES gave the process (a
    sweep worker sees only its own); nothing for a run on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    return {"gpu": {"name": torch.cuda.get_device_name(device),
                    "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "all")}}


def check_config_digest(recorded: str | None, cfg, run_path: Path) -> None:
    """Refuse to continue a run whose config.yaml no longer matches the config it was started with."""
    if recorded and not cfg.matches(recorded):
        raise UserError(f"{run_path}/config.yaml was changed after the run started (digest {cfg.digest()}, the run "
                        f"has {recorded}); a run continues only as it was configured. Restore the file, or start "
                        "the changed config as a new run with --out elsewhere")


def _writes() -> bool:
    """Whether this process writes into run folders: always, except the ranks > 0 of a torchrun job."""
    return launcher.rank() == 0


class RunInUse(UserError):
    """Another process holds the run folder's lock."""

    def summary(self) -> dict:
        """What a stack reports for such a run, which it leaves untouched (its caller waits for it)."""
        return {"status": "failed", "error": f"{type(self).__name__}: {self}", "in_use": True}


def wait_until_free(path: str | Path, holder: int | None = None) -> None:
    """Block until no process holds the run folder's lock (at once if none does, or if there is no lock).
    holder: wait only while that process holds it, not for another process."""
    try:
        fd = os.open(Path(path) / LOCK_FILE, os.O_RDWR)
    except OSError:
        return
    try:
        if holder is None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: returns when the holder closes its descriptor
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
        # polled: a process that takes the lock writes its PID just after, so the file may still name `holder`
        # for a moment while another process holds it
        while _holder(fd) == str(holder):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(0.05)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    """The PID written into a lock file by its last holder."""
    return os.pread(fd, 64, 0).decode(errors="replace").strip()


@contextmanager
def run_lock(path: str | Path, create: bool = False):
    """Hold the run folder's advisory lock: one writer per run. A second process is refused with the holder's
    PID. Under torchrun only rank 0 (the rank that writes) takes it; a folder nobody can write is not locked,
    nor one that does not exist unless `create` (a new run)."""
    path = Path(path)
    if not _writes() or not (create or path.is_dir()):
        yield
        return
    key = str(path.resolve())
    if key in _held:  # this process holds it already (e.g. the Python API probing inside a distill)
        yield
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        yield  # read-only: no process can write here, so there is nothing to guard
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd) or "unknown"
        os.close(fd)
        raise RunInUse(f"{path} is in use by another randteach process (PID {holder}); one process writes into "
                        "a run at a time: wait for it to finish" + (", or use --out elsewhere" if create else ""))\
            from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held.add(key)
        yield
    finally:
        _held.discard(key)
        os.close(fd)  # closing the descriptor releases the lock
