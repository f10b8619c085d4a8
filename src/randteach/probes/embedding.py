"""Embed a data set with a frozen encoder and probe it: the one evaluation path of the project."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import linear_knn
from ..config import Config
from ..data import ImageData, Preprocess, load_configured, resolve_root, stratified_subset
from ..digests import code_modules, digest_code, digest_module, digest_tensor
from ..errors import UserError
from ..files import written_whole
from ..models.common import fp32_channels_last
from ..precision import autocast, exact_fp32, fp32_module

PROBE_CACHE_VERSION = "3"  # the cache entries' format; the code that computes them is keyed by `digest_code`
# the code every cached probe result depends on, besides an encoder's own
_PROBE_CODE = frozenset({__name__, linear_knn.__name__, Preprocess.__module__})


def adapt_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey -> colour by repetition, colour -> grey by the channel mean (for transfer between data sets)."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1:
        return x.mean(1, keepdim=True)
    raise ValueError(f"cannot map {x.shape[1]} input channels to {channels}")


def _dtype_of(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


@torch.inference_mode()
def embed(encoder: nn.Module, images: torch.Tensor, preprocess: Preprocess | None, *, device: torch.device,
          batch_size: int = 512, bf16: bool = False, channels: int | None = None) -> torch.Tensor:
    """Encoder outputs (N, D) in float32 on the CPU, computed in eval mode (the mode is restored after).

    `images` are uint8 (converted by `preprocess`) or already-float inputs (used as given)."""
    encoder = _cpu_layout(encoder, device)
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device)
            x = preprocess(x) if preprocess is not None else x.float()
            x = x.to(_dtype_of(encoder))  # a float64 encoder (the float64 start, precision.py) gets float64
            if channels is not None:
                x = adapt_channels(x, channels)
            with autocast(device, bf16):
                out.append(_first_batch_checked(encoder, x) if i == 0 else encoder(x).float().cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out).flatten(1)


def _first_batch_checked(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The first batch's features; an encoder that cannot take the images at all (wrong channels or size)
    is a UserError naming both, not a traceback from inside its first layer."""
    try:
        return encoder(x).float().cpu()
    except RuntimeError as e:
        if "shape" not in str(e) and "size" not in str(e) and "channels" not in str(e):
            raise
        first = str(e).strip().splitlines()[0]
        raise UserError(f"the encoder ({type(encoder).__name__}) cannot take these images, a batch of shape "
                        f"{tuple(x.shape)} (N, C, H, W): {first}. Pass data with the channels and size it was "
                        "built for.") from None


def _cpu_layout(encoder: nn.Module, device: torch.device) -> nn.Module:
    """The encoder in channels-last memory format where that is faster, as training does (a narrow conv
    encoder on a CPU: `fp32_cpu_channels_last`; the 10 000 Fashion-MNIST test images through the demo's
    convnet about 1.8x faster, benchmarks/cpu_step_parts.py): a copy, so the caller's module keeps its
    layout; unchanged if it is channels-last already or another encoder."""
    if not fp32_channels_last(encoder, device):
        return encoder
    if all(p.dim() != 4 or p.is_contiguous(memory_format=torch.channels_last) for p in encoder.parameters()):
        return encoder
    return copy.deepcopy(encoder).to(memory_format=torch.channels_last)


INVALID = "invalid"  # key of a probe result naming the probes that could not measure the features, and why


def accuracies(result: dict) -> dict[str, float]:
    """The accuracies of a probe result, without its INVALID note."""
    return {k: v for k, v in result.items() if k != INVALID}


@exact_fp32()  # fp32 that is fp32 on a GPU (no TF32), as in the training loop
def score(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
          cfg, num_classes: int, device: torch.device | None = None) -> dict:
    """Linear and k-NN test accuracy of features, as configured by a ProbeConfig."""
    result = {}
    refused = linear_knn.unmeasurable(train_x, test_x)  # never a silent chance-level number
    if cfg.linear != "none" and "linear" not in refused:
        result["linear"] = linear_knn.linear_probe(train_x, train_y, test_x, test_y, method=cfg.linear, l2=cfg.l2,
                                               max_iter=cfg.max_iter, num_classes=num_classes, device=device)
    if cfg.knn_k > 0 and "knn" not in refused:
        result["knn"] = linear_knn.knn_probe(train_x, train_y, test_x, test_y, k=cfg.knn_k,
                                         weighting=cfg.knn_weighting, temperature=cfg.knn_temperature,
                                         num_classes=num_classes, device=device)
    if refused:
        result[INVALID] = "; ".join(f"{kind} probe not measured: {why}" for kind, why in refused.items())
    return result


def probe_data_name(cfg: Config) -> str:
    name = cfg.probe.data or cfg.data.name
    # CIFAR-5M has no test split: it is CIFAR-10-like data, probed on CIFAR-10 (as the paper does).
    return "cifar10" if name == "cifar5m" else name


@dataclass
class ProbeSplits:
    train: ImageData
    test: ImageData


def load_probe_splits(cfg: Config) -> ProbeSplits:
    name = probe_data_name(cfg)
    train = load_configured(cfg.data, "train", name)
    test = load_configured(cfg.data, "test", name)
    if cfg.probe.n_train:
        train = train.subset(stratified_subset(train.labels, cfg.probe.n_train, seed=cfg.data.subset_seed))
    if cfg.probe.n_test:
        test = test.subset(stratified_subset(test.labels, cfg.probe.n_test, seed=cfg.data.subset_seed))
    return ProbeSplits(train, test)


def fit_preprocess(data: ImageData, size: int | None) -> Preprocess | None:
    """uint8 images are normalized with the train split's statistics; float images are used as given."""
    return None if data.images.is_floating_point() else Preprocess.fit(data, size=size)


class Prober:
    """Probes encoders on one data set with one protocol. Results that cannot change between runs (the raw
    input, a frozen teacher) are kept on disk under `cache_dir` (default: <data root>/probe-cache) and read
    back by any later run with the same data, probe config and weights (see `cache_key`)."""

    def __init__(self, cfg: Config, in_channels: int, image_size: int, device: torch.device, bf16: bool = False,
                 splits: tuple[ImageData, ImageData] | None = None, cache_dir: Path | None = None,
                 normalized_by: ImageData | None = None):
        """`normalized_by`: the images whose statistics normalize the inputs (default: the probe train split;
        `randteach embed` gives the run's probe subset while it embeds every image)."""
        self.cfg = cfg
        self.splits = ProbeSplits(*splits) if splits is not None else load_probe_splits(cfg)
        self.in_channels = in_channels
        self.device = device
        self.bf16 = bf16
        self.preprocess = fit_preprocess(self.splits.train if normalized_by is None else normalized_by, image_size)
        self.num_classes = max(self.splits.train.num_classes, self.splits.test.num_classes)
        self.cache_dir = cache_dir if cache_dir is not None else resolve_root(cfg.data.root) / "probe-cache"
        self.origin: dict[str, str] = {}  # "input" / "frozen" -> where the last result came from
        self._input: dict | None = None

    @exact_fp32()  # fp32 that is fp32 on a GPU (no TF32), as in the training loop
    def features(self, encoder: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        kw = dict(device=self.device, batch_size=self.cfg.probe.batch_size, bf16=self.bf16, channels=self.in_channels)
        encoder = _cpu_layout(encoder, self.device)  # once for both splits (embed then finds it channels-last)
        return (embed(encoder, self.splits.train.images, self.preprocess, **kw),
                embed(encoder, self.splits.test.images, self.preprocess, **kw))

    def probe(self, encoder: nn.Module) -> dict:
        train_x, test_x = self.features(fp32_module(encoder))
        return score(train_x, self.splits.train.labels, test_x, self.splits.test.labels,
                     self.cfg.probe, self.num_classes, self.device)

    def frozen(self, encoder: nn.Module) -> dict:
        """`probe(encoder)` for an encoder whose weights never change (a frozen teacher), cached on disk."""
        encoder = fp32_module(encoder)  # a teacher in the float64 start probes as the same fp32 teacher
        key = self.cache_key("encoder", encoder)
        return self._cached("frozen", key, lambda: self.probe(encoder))

    def input(self) -> dict:
        """The raw-pixel baseline: standardized flattened images at the resolution the encoders see (as in the
        random-teacher authors' code: 32 px for CIFAR-trained encoders probed on STL10 or TinyImageNet), cached
        on disk."""
        if self._input is None:
            self._input = self._cached("input", self.cache_key("input"), self._probe_input)
        return self._input

    def _probe_input(self) -> dict:
        pre = self.preprocess
        train_x = (pre(self.splits.train.images) if pre else self.splits.train.images).flatten(1)
        test_x = (pre(self.splits.test.images) if pre else self.splits.test.images).flatten(1)
        return score(train_x, self.splits.train.labels, test_x, self.splits.test.labels,
                     self.cfg.probe, self.num_classes, self.device)

    def cache_key(self, kind: str, encoder: nn.Module | None = None) -> str:
        """Hash of everything a probe result depends on: both splits' images and labels, the probe config
        (all but `which`), the probes' code, and for an encoder its architecture, code, weights, input
        conversion and precision."""
        probe_cfg = {k: v for k, v in dataclasses.asdict(self.cfg.probe).items() if k != "which"}
        h = hashlib.sha256(f"probe-v{PROBE_CACHE_VERSION}-{kind}-{sorted(probe_cfg.items())}".encode())
        digest_code(h, _PROBE_CODE | (code_modules(encoder) if encoder is not None else set()))
        for data in (self.splits.train, self.splits.test):
            digest_tensor(h, data.images)
            digest_tensor(h, data.labels)
        conversion = sorted(self.preprocess.as_dict().items()) if self.preprocess is not None else None
        h.update(f"{conversion}".encode())  # the input baseline is probed at the encoders' resolution too
        if encoder is not None:
            digest_module(h, encoder)
            h.update(f"bf16={self.bf16}-channels={self.in_channels}".encode())
        return h.hexdigest()[:24]

    def _cached(self, what: str, key: str, compute) -> dict:
        path = self.cache_dir / f"{key}.json"
        try:
            payload = json.loads(path.read_text())
            if payload.get("key") == key:
                self.origin[what] = f"loaded {path}"
                return payload["result"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # missing or unreadable: computed and (re)written below
        result = compute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with written_whole(path) as f:  # runs side by side may write the same entry
                f.write(json.dumps({"key": key, "result": result}))
            self.origin[what] = f"computed and saved to {path}"
        except OSError:
            self.origin[what] = "computed (cache folder not writable)"
        return result
