"""ResNets: torchvision-style ResNet18/34/50 (He et al. 2016, ImageNet layout, without the fc layer)
and the CIFAR ResNet20/56 of the same paper (Sec. 4.2: 16-32-64 channels, 6n+2 layers).

Small inputs (side <= 64) get the CIFAR stem of the random-teacher paper (App. E.1): a 3x3 stride-1
conv and no max-pool; larger ones torchvision's 7x7 stride-2 conv + 3x3 max-pool.
"""
from __future__ import annotations

from torch import nn

from .common import he_init_, norm2d


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


def shortcut(c_in: int, c_out: int, stride: int, norm: str) -> nn.Module:
    """Identity, or a strided 1x1 projection + norm where the shape changes (option B of He et al.)."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(conv1x1(c_in, c_out, stride), norm2d(norm, c_out))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int, norm: str):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(c_in, planes, stride), norm2d(norm, planes)
        self.conv2, self.bn2 = conv3x3(planes, planes), norm2d(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(c_in, planes, stride, norm)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, torchvision's "v1.5"), 1x1 expand by 4."""
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, norm: str):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1, self.bn1 = conv1x1(c_in, planes), norm2d(norm, planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), norm2d(norm, planes)
        self.conv3, self.bn3 = conv1x1(planes, c_out), norm2d(norm, c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(c_in, c_out, stride, norm)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, stages of residual blocks (the first block of every stage but the first halves the
    side), global average pool -> (B, widths[-1] * expansion)."""

    def __init__(self, block: type, blocks: list[int], widths: list[int], in_channels: int = 3,
                 small_stem: bool = True, norm: str = "batch"):
        super().__init__()
        c = widths[0]
        if small_stem:
            stem = [conv3x3(in_channels, c), norm2d(norm, c), nn.ReLU(inplace=True)]
        else:
            stem = [nn.Conv2d(in_channels, c, 7, stride=2, padding=3, bias=False), norm2d(norm, c),
                    nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
        self.stem = nn.Sequential(*stem)
        stages = []
        for i, (n, planes) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                layers.append(block(c, planes, 2 if (i > 0 and j == 0) else 1, norm))
                c = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed_dim = c
        # channels-last in fp32 on a CPU (train.channels_last) pays for the narrow CIFAR ResNets (ResNet20 step
        # 1.16-1.24x, benchmarks/cpu_step_parts.py), not for the ImageNet widths (ResNet18: equal within noise)
        self.fp32_cpu_channels_last = widths == CIFAR_WIDTHS
        he_init_(self)

    def forward(self, x):
        return self.pool(self.stages(self.stem(x))).flatten(1)


IMAGENET_WIDTHS = [64, 128, 256, 512]
CIFAR_WIDTHS = [16, 32, 64]
SPECS = {  # name: (block, blocks per stage, widths)
    "resnet18": (BasicBlock, [2, 2, 2, 2], IMAGENET_WIDTHS),
    "resnet34": (BasicBlock, [3, 4, 6, 3], IMAGENET_WIDTHS),
    "resnet50": (Bottleneck, [3, 4, 6, 3], IMAGENET_WIDTHS),
    # He et al. 2016 used the parameter-free option A (zero-padded identity) for CIFAR; the paper's
    # Table 5 counts (271,824 and 855,120) are those of option B, the 1x1 projection used here.
    "resnet20": (BasicBlock, [3, 3, 3], CIFAR_WIDTHS),
    "resnet56": (BasicBlock, [9, 9, 9], CIFAR_WIDTHS),
}


def build_resnet(name: str, in_channels: int, image_size: int, norm: str) -> ResNet:
    block, blocks, widths = SPECS[name]
    small_stem = image_size <= 64 or widths is CIFAR_WIDTHS
    return ResNet(block, blocks, widths, in_channels, small_stem=small_stem, norm=norm)
