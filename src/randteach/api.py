"""The Python API: the command line's distillation and analyses (probe, signal, landscape, IMP, LMC)
for any encoder and any data; reference in docs/API.md.

    import randteach
    result = randteach.distill(encoder=MyNet, train=(images, labels), preset="cpu",
                               **{"train.epochs": 2, "optim.lr": 1e-3})
    result.summary["probe"]["student"]["linear"]

`encoder`: a factory (a callable returning an nn.Module; it receives in_channels/image_size where its
signature accepts them) or an nn.Module instance (re-initialized for teacher and fresh init by its
submodules' reset_parameters). The embedding size is read from `.embed_dim` or found by one forward pass.
Data: a registered name, an `ImageData`, a pair of tensors (images, labels) or a torch `Dataset`
yielding (image, label). uint8 images are normalized like the built-in data sets; float images are used
as given. Without `probe_train`/`probe_test`, labelled training data is split 80/20 (class-stratified)
for probing.

The analyses (`probe`, `signal_report`, `landscape`, `imp`, `lmc`) take a run directory or RunResult,
as their commands do, or nn.Modules used as they are (their weights are what is measured) and data as above.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, build_config, checked_options, flatten
from .data import ImageData, load_dataset, stratified_subset
from .data.images import class_indices
from .digests import object_key
from .errors import UserError
from .text import counted


def as_image_data(data: Any, name: str = "custom") -> ImageData:
    """ImageData from an ImageData, an (images, labels) pair or a torch Dataset of (image, label)."""
    if isinstance(data, ImageData):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "__array__"):  # tensors, arrays
        images, labels = data
    elif isinstance(data, torch.utils.data.Dataset):
        pairs = [data[i] for i in range(len(data))]
        if not pairs or not isinstance(pairs[0], (tuple, list)) or len(pairs[0]) != 2:
            raise UserError("a Dataset passed to randteach must yield (image, label) pairs")
        images = torch.stack([_image_tensor(x) for x, _ in pairs])
        labels = torch.as_tensor([y.item() if hasattr(y, "item") else y for _, y in pairs])
    else:
        raise UserError(f"cannot use a {type(data).__name__} as data: pass a data set name, an ImageData, "
                        "a pair of tensors or arrays (images, labels) or a torch Dataset of (image, label)")
    images = torch.as_tensor(images)
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise UserError(f"images are {images.dtype}; expected uint8 pixels 0-255 (convert with .to(torch.uint8) or "
                        ".astype(numpy.uint8)) or floats, which are used as given (already normalized)")
    if images.is_floating_point() and images.dtype != torch.float32:
        images = images.float()  # float images are used as given, in the networks' dtype
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise UserError(f"images must have shape (N, C, H, W) or (N, H, W), got {tuple(images.shape)}")
    if images.shape[1] > 4 and images.shape[-1] in (1, 3, 4):
        raise UserError(f"images of shape {tuple(images.shape)} look channels-last (N, H, W, C), as numpy arrays "
                        "and torchvision's .data hold them; pass images.permute(0, 3, 1, 2) (N, C, H, W)")
    if images.shape[-2] != images.shape[-1]:
        raise UserError(f"images are {images.shape[-2]} x {images.shape[-1]} px; the encoders take square images: "
                        "center-crop or pad them to a square first (an image folder, data.name folder, is "
                        "center-cropped so)")
    labels = class_indices(labels, "labels")
    if len(labels) != len(images):
        raise UserError(f"{len(images)} images but {len(labels)} labels")
    if bool((labels < -1).any()):
        i = int((labels < -1).nonzero()[0])
        raise UserError(f"labels: {int(labels[i])} at index {i}; expected class indices 0 ... C-1 (or -1 for an "
                        "unlabelled image): map your labels to them first")
    num_classes = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    return ImageData(images.contiguous(), labels, num_classes, name)


def _image_tensor(x: Any) -> torch.Tensor:
    """One image of a Dataset as a tensor: tensors and arrays as they are ((C, H, W) or (H, W)), a PIL image
    (what torchvision's data sets yield without a transform) as its uint8 pixels, (C, H, W)."""
    if hasattr(x, "getbands"):
        import numpy as np
        pixels = torch.from_numpy(np.array(x))
        return pixels.permute(2, 0, 1) if pixels.ndim == 3 else pixels
    return torch.as_tensor(x)


def _split_for_probing(data: ImageData, seed: int) -> tuple[ImageData, ImageData]:
    unlabelled = int((data.labels < 0).sum())
    if data.num_classes < 2 or unlabelled:
        raise UserError("the training data has no labels to probe with"
                        + (f" ({unlabelled} of its images are labelled -1, unlabelled)" if unlabelled else "")
                        + "; pass probe_train= and probe_test=")
    test_idx = stratified_subset(data.labels, max(1, len(data) // 5), seed=seed)
    mask = torch.ones(len(data), dtype=torch.bool)
    mask[test_idx] = False
    return data.subset(mask.nonzero().flatten()), data.subset(test_idx)


def distill(config: Config | None = None, *, encoder=None, train: Any = None, probe_train: Any = None,
            probe_test: Any = None, preset: str | None = None, resume: bool = False, progress: bool = True,
            **overrides: Any):
    """Distill a student into a random teacher; returns RunResult(path, summary).

    `overrides` are dotted keys (pass them as **{"optim.lr": 1e-3}) or double-underscored
    (optim__lr=1e-3). A run with the same config, encoder and data is not redone; an unfinished one continues
    from its last checkpoint (resume=True: must continue, a run without one is refused)."""
    from .train.loop import distill as run_distillation
    if isinstance(encoder, str):
        raise UserError(f"encoder= takes a factory or an nn.Module; a built-in encoder or an import path is the "
                        f"config key model.encoder: pass **{{'model.encoder': {encoder!r}}}")
    config = _build(config, preset, overrides)
    train_data = as_image_data(train) if train is not None and not isinstance(train, str) else None
    if train_data is not None and config.data.split != "train":
        raise UserError(f"data.split={config.data.split} chooses the splits of data.name to distill on; with "
                        "train= the images given are distilled on: leave data.split at train")
    if isinstance(train, str):
        config = build_config(None, None, {**flatten(config.to_dict()), "data.name": train})
    probe_splits = None
    if probe_train is not None or probe_test is not None:
        if probe_train is None or probe_test is None:
            raise UserError("pass both probe_train= and probe_test=, or neither")
        probe_splits = _subsampled((as_image_data(probe_train), as_image_data(probe_test)), config)
    elif train_data is not None and config.probe.which:
        probe_splits = _subsampled(_split_for_probing(train_data, config.data.subset_seed), config)
    if encoder is not None or train_data is not None or probe_splits is not None:
        if not config.out:
            extra = object_key(encoder, train_data, *(probe_splits or ()))
            config.out = str(config.address(Path("runs"), key=f"-{extra}"))
    return run_distillation(config, resume=resume, progress=progress, train_data=train_data, encoder=encoder,
                            probe_splits=probe_splits)


def _dotted(overrides: dict) -> dict:
    return {k.replace("__", "."): v for k, v in overrides.items()}


def _build(config: Config | None, preset: str | None, overrides: dict) -> Config:
    """`config`, or the preset's, with dotted / double-underscored keyword overrides on top."""
    dotted = _dotted(overrides)
    if config is None:
        return build_config(preset, None, dotted)
    if not isinstance(config, Config):
        raise UserError(f"config= takes a Config, got a {type(config).__name__}: build one with "
                        "randteach.config.build_config(preset, file, overrides) or config_from_dict(nested dict)")
    if preset is not None:
        raise UserError(f"pass config= or preset={preset!r}, not both: a Config holds the values of the preset it "
                        f"was built from already (build_config({preset!r}, None, overrides) builds one from yours)")
    if dotted:
        return build_config(None, None, {**flatten(config.to_dict()), **dotted})
    return copy.deepcopy(config)  # the run's own: distill sets its `out`, the caller's stays as it was


# ------------------------------------------------------------------------------------------- analyses
# Each mirrors a command (`randteach probe | signal | landscape | imp | lmc`) and calls the same code;
# where the command takes a run directory these take a run directory, a RunResult, or Python objects.

def _run_dir(obj: Any) -> Path | None:
    """The run directory `obj` names (a RunResult, or a path holding config.yaml); else None."""
    from .train.loop import RunResult
    if isinstance(obj, RunResult):
        return Path(obj.path)
    if isinstance(obj, (str, os.PathLike)):
        if not (Path(obj) / "config.yaml").is_file():
            raise UserError(f"{obj} is not a randteach run directory (no config.yaml); pass the directory "
                            "`randteach distill` wrote, a RunResult, or an nn.Module")
        return Path(obj)
    return None


def _run_overrides(overrides: dict, device: str | None) -> dict[str, str]:
    pairs = {k: str(v) for k, v in _dotted(overrides).items()}
    if device is not None:
        pairs["train.device"] = device
    return pairs


def _with_run_overrides(run, overrides: dict):
    """A RunInfo with --probe.* / --data.root overrides, as the commands apply them."""
    from .train.supervised import with_overrides
    return with_overrides(run, {k: str(v) for k, v in _dotted(overrides).items()})


def _run_config(run: Path, overrides: dict, architecture) -> Config:
    """The run's saved config with the probe.* / data.root overrides (to read named data sets)."""
    from .train.supervised import run_info
    return _with_run_overrides(run_info(run, architecture), {k: v for k, v in overrides.items()
                                               if not k.replace("__", ".").startswith("train.")}).cfg


def _data(obj: Any, cfg: Config, split: str) -> ImageData:
    """A registered name (read from the config's data root; 'folder' from data.path) or a data object."""
    if isinstance(obj, str):
        return load_dataset(obj, split, root=cfg.data.root, path=cfg.data.path,
                            test_fraction=cfg.data.test_fraction)
    return as_image_data(obj)


def _splits(train: Any, test: Any, cfg: Config) -> tuple[ImageData, ImageData] | None:
    """(train, test): both given; a name alone: its train and test splits; data alone: split 80/20
    (class-stratified); neither: None. probe.n_train / probe.n_test subsample them."""
    if train is None and test is None:
        return None
    if train is None:
        raise UserError("pass the data to fit on (train=) as well as test=")
    if test is None and not isinstance(train, str):
        splits = _split_for_probing(as_image_data(train), cfg.data.subset_seed)
    else:
        splits = (_data(train, cfg, "train"), _data(train if test is None else test, cfg, "test"))
    fit, score = (d.images.shape[1] for d in splits)
    if fit != score:
        raise UserError(f"the data to fit on has images of {counted(fit, 'channel')}, the data to score on of "
                        f"{counted(score, 'channel')}: pass both with the same channels")
    return _subsampled(splits, cfg)


def _subsampled(splits: tuple[ImageData, ImageData], cfg: Config) -> tuple[ImageData, ImageData]:
    """The probe splits cut to class-stratified subsets of probe.n_train / probe.n_test images, as the
    command line's probes are."""
    return tuple(d.subset(stratified_subset(d.labels, n, seed=cfg.data.subset_seed)) if n and n < len(d) else d
                 for d, n in zip(splits, (cfg.probe.n_train, cfg.probe.n_test)))


def _module(obj: Any, what: str) -> nn.Module:
    if not isinstance(obj, nn.Module):
        raise UserError(f"{what} must be an nn.Module (or a run directory / RunResult), got {type(obj).__name__}")
    return obj


def _on(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` on `device`: itself if it is there already, else a copy (the user's module is not moved)."""
    ref = next(module.parameters(), None)
    if ref is None or _same_device(ref.device, device):
        return module
    return copy.deepcopy(module).to(device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two device names name one device: "cuda" is the current GPU, "cpu" and "cpu:0" the same
    (torch.device compares the names, so "cuda" != "cuda:0")."""
    def index(d: torch.device) -> int:
        if d.index is not None:
            return d.index
        return torch.cuda.current_device() if d.type == "cuda" else 0
    return a.type == b.type and index(a) == index(b)


def _side(data: ImageData, cfg: Config) -> int:
    return data.side(cfg.data.image_size)


def probe(encoder: Any, train: Any = None, test: Any = None, *, architecture=None, checkpoint: str | None = None,
          config: Config | None = None, preset: str | None = None, device: str | None = None,
          **overrides: Any) -> dict:
    """Linear and k-NN probe accuracy (`randteach probe`).

    encoder: an nn.Module, probed as it is (its current weights, eval mode; feature maps flattened) ->
    {"linear": acc, "knn": acc};
    or a run directory / RunResult -> {"teacher"|"student"|"input": {...}}, also written to
    RUN/probes/<data>.json (<data>-<hash>.json under other probe settings). train / test: data to fit / score on (test None: a class-stratified 80/20
    split of train; a name alone: its train and test splits; a run without data: its probe data).
    overrides: probe.* keys (e.g. probe__knn_k=20), data.root, data.image_size."""
    from .probes.embedding import Prober
    from .probes.run import probe_run
    from .train.setup import resolve_device
    run = _run_dir(encoder)
    if run is not None:
        cfg = _run_config(run, overrides, architecture)
        return probe_run(run, _run_overrides(overrides, device), checkpoint=checkpoint, progress=False,
                         splits=_splits(train, test, cfg), architecture=architecture)
    encoder = _module(encoder, "encoder")
    cfg = _build(config, preset, overrides)
    splits = _splits(train, test, cfg)
    if splits is None:
        raise UserError("pass the data to probe on: train= (and test=, else train is split 80/20)")
    dev = resolve_device(device or cfg.train.device)
    prober = Prober(cfg, splits[0].images.shape[1], _side(splits[0], cfg), dev, splits=splits)
    return prober.probe(_on(encoder, dev))


def signal_report(encoders: Any, data: Any = None, test: Any = None, *, architecture=None,
                  n_samples: int | None = None, n_test: int | None = None, spatial: str = "flatten",
                  center: bool = False, standardize: bool = False, rank_eps: float = 0.0,
                  threshold: float = 0.999, probe: bool = True, collapse: str | None = None,
                  out: str | os.PathLike | None = None, config: Config | None = None, preset: str | None = None,
                  device: str | None = None, progress: bool = False, **overrides: Any) -> dict:
    """Per-layer effective rank, dead neurons, condition number, Fisher metrics and probes (`randteach signal`).

    encoders: a run directory / RunResult (its teacher, collapse point and student; writes OUT, default
    RUN/signal), an nn.Module, or a dict {name: nn.Module} of one architecture (e.g. {"teacher": t,
    "student": s}; writes OUT only if `out` is given). data: the images the metrics are computed on (a
    class-stratified subset of `n_samples`); test: the per-layer probes' test data (None: data is split
    80/20). Returns the content of signal.json (`randteach.analysis.signal_layers`)."""
    from .analysis.signal_layers import analyze_signal, layer_signals, write_signal
    from .probes.embedding import fit_preprocess
    from .train.setup import resolve_device
    run = _run_dir(encoders)
    if run is not None:
        cfg = _run_config(run, overrides, architecture)
        return analyze_signal(run, n_samples=n_samples, n_test=n_test, spatial=spatial, center=center,
                              standardize=standardize, threshold=threshold, rank_eps=rank_eps, probe=probe,
                              collapse=collapse, out=out,
                              overrides=_run_overrides(overrides, device), progress=progress,
                              splits=_splits(data, test, cfg), architecture=architecture)
    named = {"encoder": encoders} if isinstance(encoders, nn.Module) else dict(encoders)
    for name, module in named.items():
        _module(module, f"encoders[{name!r}]")
    cfg = _build(config, preset, overrides)
    if data is None:
        raise UserError("pass the data the layers are measured on: data= (and test= for the probes)")
    train, test_data = _splits(data, test, cfg) if probe else (_data(data, cfg, "train"), None)
    preprocess = fit_preprocess(train, _side(train, cfg))
    num_classes = max(train.num_classes, test_data.num_classes if test_data is not None else 0)
    picked = [d.subset(stratified_subset(d.labels, n, seed=cfg.data.subset_seed)) if n and n < len(d) else d
              for d, n in ((train, n_samples), (test_data, n_test)) if d is not None]
    dev = resolve_device(device or cfg.train.device)
    result = {"encoders": list(named), "data": train.name,
              "metrics_on": "a class-stratified subset of `data`; probes fit on it and score on `test`",
              **layer_signals({k: _on(m, dev) for k, m in named.items()}, (picked[0].images, picked[0].labels),
                              (picked[1].images, picked[1].labels) if probe else None, preprocess, cfg.probe,
                              num_classes, device=dev, channels=train.images.shape[1], spatial=spatial,
                              center=center, standardize=standardize, threshold=threshold, rank_eps=rank_eps,
                              progress=progress, seed=cfg.data.subset_seed)}
    return write_signal(result, out) if out is not None else result


def _as_model(module: nn.Module, in_channels: int, image_size: int) -> nn.Module:
    """A copy of `module` as a model with .encoder and .head: as it is if it has both, else the module
    as the encoder under an identity head (the loss then compares embeddings)."""
    from .models import DistillModel, IdentityHead, call_encoder_factory
    if isinstance(getattr(module, "encoder", None), nn.Module) and isinstance(getattr(module, "head", None), nn.Module):
        return copy.deepcopy(module)
    encoder = call_encoder_factory(lambda: copy.deepcopy(module), type(module).__name__, in_channels, image_size)
    return DistillModel(encoder, IdentityHead(encoder.embed_dim))


def _state(obj: Any, template: nn.Module | None, in_channels: int, image_size: int) -> dict:
    """A model state dict from a module or a state dict (an encoder's keys get the 'encoder.' prefix)."""
    if isinstance(obj, nn.Module):
        obj = _as_model(obj, in_channels, image_size).state_dict()
    state = {k: v.detach().cpu() for k, v in obj.items()}
    if template is not None:
        keys = set(template.state_dict())
        if not set(state) & keys and {f"encoder.{k}" for k in state} <= keys:
            state = {f"encoder.{k}": v for k, v in state.items()}
    return state


def landscape(anchors: Any = None, *, view: str | None = None, runs: Any = (), run: Any = None, architecture=None,
              data: Any = None, probe_train: Any = None, probe_test: Any = None, teacher: Any = None,
              grid: int | tuple[int, int] = 21, extent=None, projection: str = "affine", unit: str = "longer",
              n_loss: int = 512, probe: bool = True, max_points: int | None = None,
              out: str | os.PathLike | None = None,
              config: Config | None = None, preset: str | None = None, device: str | None = None,
              progress: bool = False, **overrides: Any) -> dict:
    """Loss / probe / embedding-KL landscape on the plane through three parameter vectors (`randteach landscape`).

    anchors: three of "RUN_DIR[:teacher|student_init|student]" or checkpoint files (as --anchors), nn.Modules
    (a model with .encoder and .head, or an encoder, which gets an identity head) or state dicts; origin
    first. Or view="non-local" / "shared" with runs=[run directories]. run: the run giving architecture,
    loss, data and probe (default: the first run / the origin's run); without one the config comes from
    `config` / `preset` / overrides and the architecture from the module anchors (or `architecture`).
    data: the distillation inputs of the loss; probe_train / probe_test: the probe's data (both None with
    data given: data split 80/20). teacher: the loss's teacher (default: the run's, else the origin).
    extent: (lo, hi) or (x_lo, x_hi, y_lo, y_hi); default the paper's [0, 1]^2 for the affine projection
    (Fig. 5), (-0.5, 1.5) for the orthogonal one.
    unit: orthogonal extents in units of max(|v1|, |v2|) ("longer") or |v1| ("first": with view="shared",
    extent=(-0.5, 1.5, -1, 1) is the zoom on the teacher of Fig. 14/16).
    out: default RUN/landscape-<view>-<projection>; required without a run. Returns compute_landscape's
    result (axes and metric grids; "complete" False after max_points: call again to continue)."""
    from .analysis.landscape import compute_landscape
    from .train.loop import RunResult
    from .train.setup import resolve_device
    from .train.supervised import RunInfo, run_info
    dev = resolve_device(device or "auto")  # a device that is not there is refused before anything loads
    paths = [str(a.path) if isinstance(a, RunResult) else a for a in (anchors or ())]
    found, ref = _landscape_plane(anchors, paths, view, [str(r.path) if isinstance(r, RunResult) else str(r)
                                                         for r in runs], run)
    if ref is not None:
        modules = [a for a in paths if isinstance(a, nn.Module)]  # a module anchor is the architecture too
        info = _with_run_overrides(run_info(ref, architecture if architecture is not None or not modules
                                            else modules[0]), overrides)
        cfg = info.cfg
    else:
        cfg = _build(config, preset, overrides)
    train = _data(data, cfg, "train") if data is not None else None
    splits = _splits(probe_train, probe_test, cfg) or (_split_for_probing(train, cfg.data.subset_seed)
                                                       if train is not None and probe and ref is None else None)
    if ref is None:
        if train is None:
            raise UserError("without a run directory, pass the data the loss is measured on (data=)")
        info = RunInfo(None, cfg, train.images.shape[1], _side(train, cfg), architecture)
    template = _landscape_template(paths, architecture, ref, cfg, info)
    if found is None:
        found = _given_anchors(paths, template, info)
    if out is None:
        if ref is None:
            raise UserError("pass out=DIR: the landscape writes its grid there (and resumes from it)")
        out = ref / f"landscape-{view or 'anchors'}-{projection}"
    return compute_landscape(found, info, out, teacher=_landscape_teacher(teacher, ref, template, info), grid=grid,
                             extent=extent, projection=projection, unit=unit, n_loss=n_loss, probe=probe,
                             limit=max_points, device=dev, progress=progress,
                             template=template, data=train, probe_splits=splits)


def _landscape_plane(anchors, paths: list, view: str | None, runs: list[str], run) -> tuple[list | None, Path | None]:
    """The anchors a view names (None: the three given ones, resolved later) and the run giving the config."""
    from .analysis.landscape import run_of, view_anchors
    if view is not None:
        if anchors is not None:
            raise UserError("give either view= with runs=, or three anchors, not both")
        return view_anchors(view, runs), _run_dir(run) if run is not None else Path(runs[0])
    if len(paths) == 3:
        named = [a for a in paths if isinstance(a, (str, os.PathLike))]
        return None, _run_dir(run) if run is not None else (run_of(named[0]) if named else None)
    raise UserError("which plane? anchors=[origin, a1, a2] (run directories, checkpoints, modules or state "
                    "dicts), or view='non-local' / 'shared' with runs=[...]")


def _landscape_template(paths: list, architecture, ref: Path | None, cfg: Config, info) -> nn.Module | None:
    """The model the anchors' vectors are laid into: the first module anchor's, else the architecture's, else
    (None) the run's own."""
    modules = [a for a in paths if isinstance(a, nn.Module)]
    if modules:
        return _as_model(modules[0], info.in_channels, info.image_size)
    if architecture is None and ref is not None:
        return None
    if architecture is None:
        raise UserError("the anchors are state dicts: pass architecture= (the encoder factory or module they "
                        "belong to), or a run directory as run=")
    from .models import build_model
    return build_model(cfg, info.in_channels, info.image_size, seed=0, encoder=architecture)


def _given_anchors(paths: list, template: nn.Module | None, info) -> list:
    """Three anchors given as run directories or checkpoints (resolved to a role), modules or state dicts."""
    from .analysis.landscape import Anchor, resolve_anchor
    found = []
    for i, (a, role) in enumerate(zip(paths, ("teacher", "student", "student"))):
        if isinstance(a, (str, os.PathLike)):
            found.append(resolve_anchor(a, default_role=role))
        else:
            state = _state(a, template, info.in_channels, info.image_size)
            found.append(Anchor(("origin", "anchor 1", "anchor 2")[i], state, type(a).__name__))
    return found


def _landscape_teacher(teacher, ref: Path | None, template: nn.Module | None, info) -> dict | None:
    """The loss's teacher weights: the run's by default (None without a run: the origin)."""
    from .analysis.landscape import resolve_anchor
    from .runs.checkpoint import load_state_dict
    from .train.loop import RunResult
    if teacher is None:
        return load_state_dict(ref, "teacher") if ref is not None else None
    if isinstance(teacher, (nn.Module, dict)):
        return _state(teacher, template, info.in_channels, info.image_size)
    return resolve_anchor(teacher.path if isinstance(teacher, RunResult) else teacher, default_role="teacher").state


def _supervised(encoder: Any, train: Any, test: Any, architecture, n_train, n_test, config, preset, device, out,
                kind: str, kwargs: dict):
    """(RunInfo, Recipe, SupervisedData, device, out folder, default starts) for imp / lmc. `kwargs`:
    Recipe fields (epochs=, lr=, ...) and dotted / double-underscored config overrides."""
    from dataclasses import fields
    from .cli.analysis import DataOptions
    from .train.setup import resolve_device
    from .train.supervised import Recipe, RunInfo, load_supervised_data, run_info
    names = {f.name for f in fields(Recipe)}
    recipe_kw = {k: v for k, v in kwargs.items() if k in names}
    overrides = {k: v for k, v in kwargs.items() if k not in names}
    unknown = [k for k in overrides if "." not in k.replace("__", ".")]
    if unknown:
        raise UserError(f"unknown argument(s) {', '.join(unknown)}; the recipe takes {', '.join(sorted(names))}, "
                        "and config keys are dotted (**{'probe.max_iter': 200}) or double-underscored")
    recipe = checked_options(Recipe, recipe_kw)  # the command line's ranges (epochs > 0, lr > 0, ...)
    checked_options(DataOptions, {"n_train": n_train, "n_test": n_test})
    ref = _run_dir(encoder)
    if ref is not None:
        info = _with_run_overrides(run_info(ref, architecture), overrides)
        splits = None if train is None or (isinstance(train, str) and test is None) else _splits(train, test, info.cfg)
        data = load_supervised_data(info.cfg, info.image_size, name=train if isinstance(train, str) else None,
                                    n_train=n_train, n_test=n_test, splits=splits)
        starts = {"imp": ["student@0", "random@0"], "lmc": ["teacher", "student"]}[kind]
        out = Path(out) if out is not None else ref / kind
    else:
        encoder = _module(encoder, "encoder")
        cfg = _build(config, preset, overrides)
        splits = _splits(train, test, cfg)
        if splits is None:
            raise UserError("pass the supervised data: train= (and test=, else train is split 80/20)")
        info = RunInfo(None, cfg, splits[0].images.shape[1], _side(splits[0], cfg), encoder)
        data = load_supervised_data(cfg, info.image_size, n_train=n_train, n_test=n_test, splits=splits)
        starts = {"imp": ["encoder@0", "random@0"], "lmc": ["random", "encoder"]}[kind]
        if out is None:
            raise UserError(f"pass out=DIR: {kind} writes its results and its resume state there")
        out = Path(out)
    return info, recipe, data, resolve_device(device or "auto"), out, starts


def imp(encoder: Any, train: Any = None, test: Any = None, *, starts: list[str] | None = None, architecture=None,
        rounds: int | None = None, fraction: float = 0.2, prune_classifier: bool = False, n_train: int | None = None,
        n_test: int | None = None, out: str | os.PathLike | None = None, config: Config | None = None,
        preset: str | None = None, device: str | None = None, progress: bool = False, **recipe: Any) -> dict:
    """Iterative magnitude pruning with rewinding (`randteach imp`): lottery tickets.

    encoder: a run directory / RunResult (starts default student@0 random@0; out default RUN/imp) or an
    nn.Module (starts: 'encoder' = the module's weights as they are, 'random' = a fresh init of its
    architecture, each with an optional '@L' rewinding epoch; default encoder@0 random@0; out required).
    train / test: the supervised data (a name, or objects; test None: train split 80/20; None with a run:
    the run's data set). rounds: pruning rounds after the dense one (None: PAPER_ROUNDS, RT Fig. 8's 24).
    recipe: Recipe fields (epochs=, lr=, milestones=, ...; default the paper's CIFAR-10 recipe). Returns the
    content of OUT/imp.json."""
    from .analysis.imp import PAPER_ROUNDS, run_imp
    from .cli.analysis import ImpOptions
    rounds = PAPER_ROUNDS if rounds is None else rounds
    checked_options(ImpOptions, {"rounds": rounds, "fraction": fraction})  # the command's ranges
    run, rec, data, dev, out, default = _supervised(encoder, train, test, architecture, n_train, n_test, config,
                                                    preset, device, out, "imp", recipe)
    return run_imp(run, list(starts or default), data, rec, dev, rounds=rounds, out=out, fraction=fraction,
                   prune_classifier=prune_classifier, progress=progress)


def lmc(encoder: Any, train: Any = None, test: Any = None, *, starts: list[str] | None = None, architecture=None,
        runs: int = 5, resolution: int = 11, bn_batches: int = 8, n_train: int | None = None,
        n_test: int | None = None, out: str | os.PathLike | None = None, config: Config | None = None,
        preset: str | None = None, device: str | None = None, progress: bool = False, **recipe: Any) -> dict:
    """Linear mode connectivity of supervised runs from one start (`randteach lmc`).

    encoder, train, test, recipe, out: as for `imp`; starts default teacher student (a run) or random
    encoder (a module). Returns the content of OUT/lmc.json (barrier heights per start)."""
    from .analysis.lmc import run_lmc
    from .cli.analysis import LmcOptions
    checked_options(LmcOptions, {"runs": runs, "resolution": resolution, "bn_batches": bn_batches})
    run, rec, data, dev, out, default = _supervised(encoder, train, test, architecture, n_train, n_test, config,
                                                    preset, device, out, "lmc", recipe)
    return run_lmc(run, list(starts or default), data, rec, dev, out=out, runs=runs, resolution=resolution,
                   bn_batches=bn_batches, progress=progress)
