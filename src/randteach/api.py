"""The Python API: the command line's distillation and probing for any encoder and any data.

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
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, build_config
from .data import ImageData, stratified_subset
from .errors import UserError


def as_image_data(data: Any, name: str = "custom") -> ImageData:
    """ImageData from an ImageData, an (images, labels) pair or a torch Dataset of (image, label)."""
    if isinstance(data, ImageData):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        images, labels = data
    elif isinstance(data, torch.utils.data.Dataset):
        pairs = [data[i] for i in range(len(data))]
        if not pairs or not isinstance(pairs[0], (tuple, list)) or len(pairs[0]) != 2:
            raise UserError("a Dataset passed to randteach must yield (image, label) pairs")
        images = torch.stack([torch.as_tensor(x) for x, _ in pairs])
        labels = torch.as_tensor([int(y) for _, y in pairs])
    else:
        raise UserError(f"cannot use a {type(data).__name__} as data: pass a data set name, an ImageData, "
                        "a pair of tensors (images, labels) or a torch Dataset of (image, label)")
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise UserError(f"images must have shape (N, C, H, W) or (N, H, W), got {tuple(images.shape)}")
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if len(labels) != len(images):
        raise UserError(f"{len(images)} images but {len(labels)} labels")
    num_classes = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    return ImageData(images.contiguous(), labels, num_classes, name)


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, ImageData):
            h.update(str((p.images.shape, p.images.dtype)).encode())
            h.update(p.images.contiguous().numpy().tobytes() if p.images.device.type == "cpu" else b"")
            h.update(p.labels.numpy().tobytes())
        elif isinstance(p, nn.Module):
            h.update(repr(p).encode())
        elif callable(p):
            h.update(f"{getattr(p, '__module__', '')}:{getattr(p, '__qualname__', repr(p))}".encode())
    return h.hexdigest()[:8]


def _split_for_probing(data: ImageData, seed: int) -> tuple[ImageData, ImageData]:
    if data.num_classes < 2 or bool((data.labels < 0).any()):
        raise UserError("the training data has no labels to probe with; pass probe_train= and probe_test=")
    test_idx = stratified_subset(data.labels, max(1, len(data) // 5), seed=seed)
    mask = torch.ones(len(data), dtype=torch.bool)
    mask[test_idx] = False
    return data.subset(mask.nonzero().flatten()), data.subset(test_idx)


def distill(config: Config | None = None, *, encoder=None, train: Any = None, probe_train: Any = None,
            probe_test: Any = None, preset: str | None = None, resume: bool = False, progress: bool = True,
            **overrides: Any):
    """Distill a student into a random teacher; returns RunResult(path, summary).

    `overrides` are dotted keys (pass them as **{"optim.lr": 1e-3}) or double-underscored
    (optim__lr=1e-3). A run with the same config, encoder and data is not redone."""
    from .distill import distill as run_distillation
    dotted = {k.replace("__", "."): v for k, v in overrides.items()}
    if config is None:
        config = build_config(preset, None, dotted)
    elif dotted:
        config = build_config(None, None, {**_flatten(config.to_dict()), **dotted})
    train_data = as_image_data(train) if train is not None and not isinstance(train, str) else None
    if isinstance(train, str):
        config = build_config(None, None, {**_flatten(config.to_dict()), "data.name": train})
    probe_splits = None
    if probe_train is not None or probe_test is not None:
        if probe_train is None or probe_test is None:
            raise UserError("pass both probe_train= and probe_test=, or neither")
        probe_splits = (as_image_data(probe_train), as_image_data(probe_test))
    elif train_data is not None and config.probe.which:
        probe_splits = _split_for_probing(train_data, config.data.subset_seed)
    if encoder is not None or train_data is not None or probe_splits is not None:
        if not config.out:
            extra = _fingerprint(encoder, train_data, *(probe_splits or ()))
            config.out = str(Path("runs") / f"{config.name}-{config.digest()}-{extra}")
    return run_distillation(config, resume=resume, progress=progress, train_data=train_data, encoder=encoder,
                            probe_splits=probe_splits)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
