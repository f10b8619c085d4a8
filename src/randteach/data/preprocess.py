"""The one conversion from stored uint8 pixels to network inputs.

Images stay uint8 wherever they are kept (a quarter of float32 memory, and a quarter of the bytes
moved to the GPU); each batch is converted here, on its own device: scale to [0, 1], subtract the
per-channel mean, divide by the per-channel std, then bring it to `size` x `size`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .images import ImageData

_FIT_CHUNK = 4096  # images per step when computing the statistics (bounded float64 memory)


class Preprocess:
    """uint8 (N, C, H, W) -> float32 (N, C, size, size), normalized per channel.

    Smaller images are zero-padded in pixel space (black borders, as in the usual 28 -> 32 padding
    of MNIST-like data), centered; larger ones are resized bilinearly (with antialiasing).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: int | None = None, *,
                 native_size: int | None = None):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"need one mean and one std per channel, got {len(self.mean)} and {len(self.std)}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if size is not None and size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.size = size
        self.native_size = native_size
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def fit(cls, data: ImageData, size: int | None = None) -> "Preprocess":
        """Per-channel mean and (population) std of `data`'s pixels, in [0, 1] units."""
        images = data.images
        c = images.shape[1]
        total = torch.zeros(c, dtype=torch.float64)
        squares = torch.zeros(c, dtype=torch.float64)
        for start in range(0, len(images), _FIT_CHUNK):
            x = images[start:start + _FIT_CHUNK].to(torch.float64).div_(255)
            total += x.sum(dim=(0, 2, 3))
            squares += x.square().sum(dim=(0, 2, 3))
        count = images.numel() // c
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
        return cls(mean.tolist(), std.tolist(), size, native_size=images.shape[-1])

    @property
    def channels(self) -> int:
        return len(self.mean)

    @property
    def out_size(self) -> int:
        """Side length of the output: `size`, else the native size of the data it was fitted on."""
        if self.size is not None:
            return self.size
        if self.native_size is None:
            raise ValueError("out_size is unknown: give size=, or build the Preprocess with Preprocess.fit(data)")
        return self.native_size

    def as_dict(self) -> dict:
        """Plain values, e.g. to save next to a checkpoint; `Preprocess(**d)` rebuilds it."""
        return {"mean": list(self.mean), "std": list(self.std), "size": self.size, "native_size": self.native_size}

    def __repr__(self) -> str:
        return f"Preprocess(mean={self.mean}, std={self.std}, size={self.size})"

    def _scale_shift(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._affine:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            # (x / 255 - mean) / std == x * scale + shift
            self._affine[device] = ((1.0 / (255.0 * std)).to(device), (-mean / std).to(device))
        return self._affine[device]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"Preprocess takes uint8 images, got {x.dtype} (noise inputs are already normalized)")
        single = x.dim() == 3
        if single:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected images (N, {self.channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        size = self.size
        if size is not None and h <= size and w <= size and (h, w) != (size, size):
            top, left = (size - h) // 2, (size - w) // 2
            x = F.pad(x, (left, size - w - left, top, size - h - top), value=0)
        scale, shift = self._scale_shift(x.device)
        y = torch.addcmul(shift, x.to(torch.float32), scale)
        if size is not None and (y.shape[-2] > size or y.shape[-1] > size):
            y = F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return y[0] if single else y


class Widen:
    """Inputs stored compactly as floats (Gaussian noise in bfloat16, `noise_like`) -> float32 network inputs."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()

    def as_dict(self) -> dict:
        return {"widen": "float32"}
