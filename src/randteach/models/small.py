"""Small encoders: raw pixels (`flatten`, the probing baseline), an MLP and a 4-layer conv net."""
from __future__ import annotations

from torch import nn

from .common import group_norm8, he_init_, norm2d, resolve_norm


class Flatten(nn.Module):
    """Raw pixels as the representation: (B, C, H, W) -> (B, C*H*W); no parameters."""

    def __init__(self, in_channels: int, image_size: int):
        super().__init__()
        self.embed_dim = in_channels * image_size * image_size

    def forward(self, x):
        return x.flatten(1)


class MLP(nn.Module):
    """Two hidden layers of `hidden` units (Linear [+ norm] + ReLU each) on the flattened image."""

    def __init__(self, in_channels: int, image_size: int, hidden: int, norm: str = "none"):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten(1)]
        d = in_channels * image_size * image_size
        for _ in range(2):
            layers += [nn.Linear(d, hidden), _norm1d(norm, hidden), nn.ReLU(inplace=True)]
            d = hidden
        self.layers = nn.Sequential(*layers)
        self.embed_dim = hidden
        he_init_(self)

    def forward(self, x):
        return self.layers(x)


def _norm1d(kind: str, features: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(features)
    if kind == "layer":
        return nn.LayerNorm(features)
    if kind == "group":
        return group_norm8(features, "the MLP")
    return nn.Identity()


class ConvNet(nn.Module):
    """Four 3x3 conv layers (channels w, 2w, 4w, 4w; w = 32 by default) each [+ norm] + ReLU,
    2x2 max-pool after the first three, global average pool -> 4w features (128 at w = 32)."""

    # Faster in channels-last memory format in fp32 on a CPU too (train.channels_last): the NCHW max-pool
    # kernel is several times slower than the NHWC one. One training step at batch 64 on one core of the Xeon
    # development VM, widths 16 and 32: 1.1-1.4x (benchmarks/cpu_step_parts.py, docs/PERFORMANCE.md).
    fp32_cpu_channels_last = True

    def __init__(self, in_channels: int, width: int = 32, norm: str = "none"):
        super().__init__()
        channels = [width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), norm2d(norm, c), nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed_dim = channels[-1]
        he_init_(self)

    def forward(self, x):
        return self.pool(self.features(x)).flatten(1)


def build_small(name: str, in_channels: int, image_size: int, norm: str, width: int):
    if name == "flatten":
        resolve_norm(norm, name, allowed=("default", "none"))
        return Flatten(in_channels, image_size)
    if name == "mlp":
        # hidden width 16*width: 512 at the default width 32, the authors' 2-layer, 512-unit MLP
        kind = resolve_norm(norm, name, allowed=("default", "none", "batch", "layer", "group"))
        return MLP(in_channels, image_size, 16 * width, kind)
    if name == "convnet":
        return ConvNet(in_channels, width, resolve_norm(norm, name))
    raise ValueError(name)
