"""VGG feature extractors (Simonyan & Zisserman 2015), torchvision layer layout, without the classifier.

The paper's VGG11 has no batch-norm; the `_bn` names (or model.norm=batch) add it after every conv.
At 32x32 the last max-pool leaves a 512x1x1 map, flattened to 512 features; an adaptive average pool
makes other sizes work. Max-pools use ceil_mode so that 28x28 inputs (28->14->7->4->2->1) survive all
five; for sides divisible by 32 this is exactly torchvision's floor mode.
`width_mult` scales every conv's channel count (0.25: 16-32-64-64-128-128-128-128, a 128-d embedding),
keeping the depth and the pooling; 1 is the paper's network.
"""
from __future__ import annotations

from torch import nn

from .common import he_init_, norm2d

M = "M"  # 2x2 max-pool
CONFIGS = {
    "vgg11": [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],
    "vgg13": [64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],
    "vgg16": [64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M],
    "vgg19": [64, 64, M, 128, 128, M, 256, 256, 256, 256, M, 512, 512, 512, 512, M, 512, 512, 512, 512, M],
}


class VGG(nn.Module):
    def __init__(self, config: list, in_channels: int = 3, norm: str = "none", width_mult: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in config:
            if v == M:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                v = max(1, round(v * width_mult))
                layers += [nn.Conv2d(c_in, v, 3, padding=1), norm2d(norm, v), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed_dim = c_in
        he_init_(self)

    def forward(self, x):
        return self.pool(self.features(x)).flatten(1)  # (B, 512 * width_mult)
