"""Images as one uint8 tensor: `ImageData`, class-stratified subsets and Gaussian-noise inputs.

Every reader returns an `ImageData`; everything downstream slices it. Keeping the pixels as uint8
(N, C, H, W) costs a quarter of float32 memory, and the conversion to float happens per batch,
on the device, in `Preprocess`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError


class FormatError(ValueError):
    """A file that exists but does not hold what its format promises (wrong magic, size, structure)."""

    def __init__(self, path, why: str):
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


def class_indices(labels, name: str) -> torch.Tensor:
    """Labels as int64 class indices, (N,). Float labels are taken where they are whole numbers (2.0); others
    are refused, not truncated (0.7 would have become class 0)."""
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{name}: labels must be class indices 0, 1, ..., num_classes - 1 ({e}); map your labels "
                        "to indices first, e.g. numpy.unique(labels, return_inverse=True)[1]") from None
    if labels.dim() == 2 and labels.shape[1] > 1:
        raise UserError(f"{name}: labels of shape {tuple(labels.shape)}; expected (N,) class indices: one-hot or "
                        "score rows give them with labels.argmax(1)")
    labels = labels.reshape(-1)
    if labels.is_floating_point() and not bool(torch.equal(labels, labels.round())):
        bad = labels[labels != labels.round()][0].item()
        raise UserError(f"{name}: labels must be class indices 0, 1, ..., num_classes - 1; got {bad!r}. Map your "
                        "labels to indices first (whole numbers stored as floats are taken as they are)")
    return labels.to(torch.int64)


@dataclass
class ImageData:
    """A labelled image data set held in memory."""

    images: torch.Tensor   # uint8, (N, C, H, W), contiguous; float only from the Python API (used as given)
    labels: torch.Tensor   # int64, (N,); -1 where unlabelled (STL-10's unlabeled split)
    num_classes: int       # number of classes of the data set, not of this subset
    name: str
    classes: tuple[str, ...] | None = None   # class names, when the data set ships them

    def __post_init__(self):
        if not (self.images.dtype == torch.uint8 or self.images.is_floating_point()) or self.images.dim() != 4:
            raise ValueError(f"{self.name}: images must be uint8 or float (N, C, H, W), "
                             f"got {self.images.dtype} {tuple(self.images.shape)}")
        self.images = self.images.contiguous()
        self.labels = class_indices(self.labels, self.name)
        if len(self.labels) != len(self.images):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        if self.classes is not None:
            self.classes = tuple(self.classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def side(self, requested: int | None) -> int:
        """The side the networks see: `requested` (data.image_size) or the images' own. uint8 images are
        padded or resized to it (Preprocess); float images (the Python API) are used as given."""
        native = self.images.shape[-1]
        if requested and requested != native and self.images.is_floating_point():
            raise UserError(f"data.image_size={requested} pads or resizes uint8 images; float images (here "
                            f"{native} px) are used as given: resize them yourself, or pass uint8 images")
        return requested or native

    def digest(self) -> str:
        """16 hex digits of a hash of the images' shape, type and bytes and of the labels."""
        h = hashlib.sha256(str((tuple(self.images.shape), self.images.dtype)).encode())
        h.update(self.images.cpu().contiguous().numpy().tobytes())
        h.update(self.labels.cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def subset(self, index) -> "ImageData":
        """The images at `index` (indices, a boolean mask or a slice), same classes and name."""
        if isinstance(index, (list, tuple, np.ndarray)):
            index = torch.as_tensor(index)
        return ImageData(self.images[index].contiguous(), self.labels[index].clone(), self.num_classes,
                         self.name, self.classes)


def joined(parts: list[ImageData]) -> ImageData:
    """The images of `parts` one after another, as one data set (splits of one data set: same classes)."""
    first = parts[0]
    return ImageData(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                     first.num_classes, first.name, first.classes)


def from_numpy(images: np.ndarray, labels, num_classes: int, name: str, classes=None, *,
               unlabelled: bool = False, source=None) -> ImageData:
    """Wrap (N, C, H, W) uint8 numpy images and integer labels, checking labels lie in [0, num_classes);
    `unlabelled`: a split without labels (STL-10's), whose labels are -1; `source`: the file (or folder) the
    labels came from, which an error names."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise FormatError(name, f"expected uint8 images (N, C, H, W), got {images.dtype} {images.shape}")
    labels = np.require(np.asarray(labels).reshape(-1), np.int64, ["C", "W"])
    labelled = labels[labels != -1] if unlabelled else labels
    if labelled.size and (labelled.min() < 0 or labelled.max() >= num_classes):
        raise FormatError(source or name, f"labels range over [{labelled.min()}, {labelled.max()}], "
                                f"expected [0, {num_classes - 1}]")
    return ImageData(torch.from_numpy(np.require(images, np.uint8, ["C", "W"])), torch.from_numpy(labels),
                     num_classes, name, classes)


def stratified_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """`n` indices, sorted, drawn without replacement so that each class keeps its share of the data.

    Class c gets floor(n * N_c / N) images; the remaining few go to the classes with the largest
    fractional parts (ties: the smaller label). The draw is a pure function of (labels, n, seed).
    `n >= len(labels)` returns every index.
    """
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    total = len(labels)
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    if n >= total:
        return torch.arange(total)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * n / total
    take = exact.floor().long()
    by_fraction = torch.argsort(exact - take, descending=True, stable=True)
    take[by_fraction[: n - int(take.sum())]] += 1
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    shuffled = labels[perm]
    chosen = [perm[shuffled == c][:k] for c, k in zip(classes.tolist(), take.tolist())]
    return torch.cat(chosen).sort().values


NOISE_DTYPE = torch.bfloat16  # 2 bytes a value: RT Fig. 4's 5e6 noise images of 3 x 32 x 32 take 31 GB, not 61
_NOISE_CHUNK = 1 << 24        # values drawn in fp32 at a time before rounding (64 MiB)


def noise_like(data: ImageData, std: float = 1.0, seed: int = 0, *, size: int | None = None) -> torch.Tensor:
    """Gaussian inputs N(0, std^2) shaped like `data.images` (or size x size), in normalized units, stored
    rounded to bfloat16 (`NOISE_DTYPE`; widen them per batch with `Widen`).

    They stand in for preprocessed images, so they bypass `Preprocess`. Drawn in fp32 chunks, so memory
    peaks at the bf16 tensor plus one chunk."""
    n, c, h, w = data.images.shape
    if size is not None:
        h = w = size
    return gaussian((n, c, h, w), std, seed)


def gaussian(shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """N(0, std^2) values of `shape` from the generator seeded `seed`, drawn in fp32 chunks of _NOISE_CHUNK
    values and stored as NOISE_DTYPE."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(shape, dtype=NOISE_DTYPE).view(-1)
    for start in range(0, out.numel(), _NOISE_CHUNK):
        chunk = out[start:start + _NOISE_CHUNK]
        chunk.copy_(torch.randn(chunk.numel(), generator=g, dtype=torch.float32).mul_(std))
    return out.view(shape)
