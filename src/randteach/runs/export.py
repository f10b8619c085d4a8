"""Encoders that leave the run: weights + a spec to rebuild them (`encoder_spec`), `load_encoder`, and embeddings as .npz.

    randteach export RUN_DIR [--which student|teacher] [--format safetensors|pt] [--out DIR]
        -> DIR/<which>-encoder.{safetensors,pt} and DIR/<which>-encoder.json
    randteach.load_encoder(RUN_DIR | .json | weights file, which="student") -> nn.Module in eval mode
    randteach embed RUN_DIR [--data.name NAME] [--out FILE.npz]
        -> {teacher,student}_{train,test} (float32), {train,test}_labels (int64)

The JSON holds what `build_encoder` needs (encoder name, its arguments, norm, width, input channels and
side length) and the run's input normalization (per-channel mean and std of its training split), so the
encoder can be rebuilt without the run folder. Weights are the encoder's state dict only: the projector
head is training machinery, the encoder is what the papers probe.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import Config, config_from_dict, load_yaml
from ..data.preprocess import Preprocess
from ..errors import UserError
from ..files import written_whole
from .checkpoint import load_checkpoint, load_state_dict

FORMAT = "randteach-encoder-v1"
FORMATS = ("safetensors", "pt")
EXPORTABLE = ("student", "teacher")  # the networks an encoder file can hold


def _run_config(run: Path, architecture=None) -> Config:
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a randteach run directory (no config.yaml)")
    from .rundir import check_encoder_given
    check_encoder_given(run, architecture)
    return config_from_dict(load_yaml(run / "config.yaml"))


def _check_role(which: str) -> None:
    if which not in EXPORTABLE:
        raise UserError(f"--which {which!r}: expected one of {', '.join(EXPORTABLE)}")


def encoder_state(run: Path, which: str) -> dict[str, torch.Tensor]:
    """The encoder part of the run's `which` checkpoint, keys without the 'encoder.' prefix."""
    _check_role(which)
    state = load_state_dict(run, which)
    return {k.removeprefix("encoder."): v.contiguous() for k, v in state.items() if k.startswith("encoder.")}


def encoder_spec(run: Path, which: str, architecture=None) -> dict:
    """Plain values that say how to rebuild `which`'s encoder of the run at `run` and feed it."""
    cfg = _run_config(run, architecture)
    teacher = load_checkpoint(run / "checkpoints" / "teacher.pt")
    return {"format": FORMAT, "role": which, "run": str(run.resolve()), "data": cfg.data.name,
            "encoder": cfg.model.encoder, "encoder_args": cfg.model.encoder_args, "norm": cfg.model.norm,
            "width": cfg.model.width, "in_channels": int(teacher["in_channels"]),
            "image_size": int(teacher["image_size"]), "preprocess": _normalization(cfg, teacher)}


def _normalization(cfg, teacher: dict) -> dict | None:
    """The training inputs' normalization as the run recorded it in teacher.pt; refitted on the data set for
    a run recorded before teacher.pt held it (None: noise inputs or the Python API's float images)."""
    if "preprocess" in teacher:
        return teacher["preprocess"]
    from ..train.setup import load_training_inputs
    _, preprocess, _, _ = load_training_inputs(cfg)
    return preprocess.as_dict() if isinstance(preprocess, Preprocess) else None


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError("--format safetensors needs the safetensors package: `pip install safetensors` "
                        "(or `pip install 'randteach[export]'`), or export with --format pt") from None
    return safetensors.torch


def export_encoder(run_dir: str | Path, which: str = "student", fmt: str = "safetensors",
                   out: str | Path | None = None) -> Path:
    """Write `which`'s encoder weights and its spec (`encoder_spec`); returns the JSON's path.

    Default folder: RUN_DIR/export/."""
    run = Path(run_dir)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    state = encoder_state(run, which)
    info = encoder_spec(run, which)
    folder = Path(out) if out else run / "export"
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{which}-encoder.{fmt}"
    with written_whole(weights, "wb") as f:  # whole, and readable as the umask allows (safetensors wrote 0600)
        if fmt == "safetensors":
            f.write(_safetensors().save(state, metadata={"format": FORMAT}))
        else:
            torch.save(state, f)
    info["weights"] = weights.name
    meta = folder / f"{which}-encoder.json"
    with written_whole(meta) as f:
        f.write(json.dumps(info, indent=2) + "\n")
    return meta


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return _safetensors().load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _build(info: dict) -> nn.Module:
    from ..models import build_encoder
    return build_encoder(info["encoder"], info["in_channels"], info["image_size"], info["norm"], info["width"],
                         **info.get("encoder_args", {}))


def load_encoder(path: str | Path, which: str = "student", architecture=None) -> nn.Module:
    """The trained encoder as an nn.Module in eval mode, on the CPU.

    `path`: a run directory (its `which` checkpoint), an exported <which>-encoder.json, or the weights
    file next to it. The module carries `.embed_dim` and `.randteach` (the encoder spec, with the input
    normalization under "preprocess": uint8 pixels / 255, minus mean, over std, padded to image_size).
    `architecture`: for a run distilled from Python with your own encoder, the factory or module it was
    built from (config.yaml cannot name it); the checkpoint's weights are loaded into a new one."""
    p = Path(path)
    if p.is_dir():
        info = {**encoder_spec(p, which, architecture), "weights": None}
        _check_role(which)
        state = encoder_state(p, which)
    else:
        meta = p if p.suffix == ".json" else p.with_suffix(".json")
        if not meta.is_file():
            raise UserError(f"{p}: expected a run directory or an exported encoder (<role>-encoder.json next to "
                            f"its weights); {meta} does not exist. Export one with `randteach export RUN_DIR`")
        info = json.loads(meta.read_text())
        if info.get("format") != FORMAT:
            raise UserError(f"{meta} is not a randteach encoder description (expected format {FORMAT!r})")
        state = _read_weights(meta.parent / info["weights"])
    encoder = _build(info) if architecture is None else _given(architecture, info)
    encoder.load_state_dict(state)
    encoder.randteach = info
    return encoder.eval()


def _given(architecture, info: dict) -> nn.Module:
    """A new encoder of `architecture` (a factory or a module) for the run that `info` describes."""
    from ..models import given_encoder
    with torch.random.fork_rng(devices=[]):  # its init is overwritten: the caller's random stream stays as it was
        encoder = given_encoder(architecture, info["in_channels"], info["image_size"])
    info["encoder"] = f"{type(encoder).__name__} (a Python object, given as architecture)"
    return encoder


def embed_run(run_dir: str | Path, out: str | Path, data: str | None = None, root: str | None = None,
              progress: bool = True) -> Path:
    """Features of the teacher and the student encoders on the train and test splits of `data` (default:
    the run's probe data), computed as the run's probes compute them; written to `out` (.npz)."""
    from ..precision import uses_bf16
    from ..probes.embedding import Prober, load_probe_splits
    from ..train.setup import resolve_device
    run = Path(run_dir)
    cfg = _run_config(run)
    if data:
        cfg.probe.data = data
    if root:
        cfg.data.root = root
    # normalized as the run's probes normalize: by the statistics of their train subset (probe.n_train)
    normalized_by = load_probe_splits(cfg).train if cfg.probe.n_train else None
    cfg.probe.n_train = cfg.probe.n_test = None  # every image of both splits
    info = encoder_spec(run, "teacher")
    device = resolve_device(cfg.train.device)
    prober = Prober(cfg, info["in_channels"], info["image_size"], device,
                    bf16=uses_bf16(cfg.train.precision, device), normalized_by=normalized_by)
    arrays = {"train_labels": prober.splits.train.labels.numpy(), "test_labels": prober.splits.test.labels.numpy()}
    for which in EXPORTABLE:
        encoder = _build(info)
        encoder.load_state_dict(encoder_state(run, which))
        train_x, test_x = prober.features(encoder.to(device))
        arrays[f"{which}_train"], arrays[f"{which}_test"] = train_x.numpy(), test_x.numpy()
        if progress:
            print(f"{which}: train {tuple(train_x.shape)}, test {tuple(test_x.shape)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(out, "wb") as f:
        np.savez(f, **arrays)
    return out
