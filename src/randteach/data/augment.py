"""Opt-in augmentation on the device, as tensor operations (no torchvision), deterministic per seed.

The random teacher papers distill without augmentation (`data.augment none`, the default); the options
place a result between that and DINO's recipe:

- `flip-crop`: the CIFAR recipe: zero-pad 4 px, crop back to the image size at a random offset, flip
  horizontally with probability 1/2.
- `dino`: DINO's global view (Caron et al. 2021, Sec. 3 and App. "Data augmentation", following BYOL):
  random resized crop (area scale 0.4-1, aspect 3/4-4/3), flip, colour jitter with p 0.8 (brightness 0.4,
  contrast 0.4, saturation 0.2, hue 0.1; in that fixed order, where torchvision draws one), greyscale with p 0.2, Gaussian blur. The second
  global view blurs with p 0.1 and solarizes with p 0.2; local views crop 5-40 % of the area at
  96/224 of the side and blur with p 0.5. Blur radii (DINO: sigma 0.1-2 px at 224 px) scale with the
  image side. `Augment.views` gives DINO's multi-crop (`data.local_crops N`): the teacher sees the 2
  global views, the student all of them, scored by `multicrop_loss`.

Every random number is a pure function of (seed, step, sample index, draw): a counter-based hash
(splitmix64 on int64 tensors, exact on any device), so a batch is augmented the same way on every
machine and whatever its split into micro-batches or data-parallel shards. All operations work in
pixel units [0, 1]: normalized inputs are mapped back with the run's mean and std and forward again.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .preprocess import Preprocess

KINDS = ("none", "flip-crop", "dino")
PAD = 4                               # flip-crop: pixels of zero padding
GLOBAL_SCALE = (0.4, 1.0)             # DINO: area fraction of a global crop
LOCAL_SCALE = (0.05, 0.4)             # DINO: area fraction of a local crop
LOCAL_SIDE = 96 / 224                 # DINO: local crops are 96 px for 224 px global crops
RATIO = (3 / 4, 4 / 3)                # aspect ratio range of the random resized crop
JITTER = dict(p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
GREY_P = 0.2
SIGMA = (0.1, 2.0)                    # DINO's blur sigma in pixels at 224 px
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's convert("L")


# ------------------------------------------------------------------ counter-based random numbers

def _lsr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    # splitmix64's finalizer (Steele et al. 2014) in two's-complement int64; multiplication wraps
    z = (z ^ _lsr(z, 30)) * -4658895280553007687   # 0xbf58476d1ce4e5b9
    z = (z ^ _lsr(z, 27)) * -7723592293110705685   # 0x94d049bb133111eb
    return z ^ _lsr(z, 31)


_GAMMA = -7046029254386353131  # 0x9e3779b97f4a7c15, splitmix64's increment


def _int64(v: int) -> int:
    return (v + 2 ** 63) % 2 ** 64 - 2 ** 63


def uniform(seed: int, step: int, index: torch.Tensor, draw: int) -> torch.Tensor:
    """U[0, 1) float32 per sample index (24 random bits): a pure function of (seed, step, index, draw)."""
    z = torch.zeros(index.shape, dtype=torch.int64, device=index.device)
    for part in (seed, step, draw):
        z = _mix(z + _int64((part + 1) * _GAMMA))
    z = _mix(z + index.to(torch.int64) * _GAMMA)
    return (_lsr(z, 40).to(torch.float32) * 2.0 ** -24)


# ------------------------------------------------------------------ the operations (pixel units, (B, C, H, W))

@functools.lru_cache(maxsize=None)
def channel_constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a (1, C, 1, 1) tensor, made once per dtype and device: on a GPU, a constant made from a
    Python list is a blocking host-to-device copy, which would drain the GPU's queue at every view of every
    step. (Read only: it is shared.)"""
    return torch.tensor(values, dtype=dtype).view(1, -1, 1, 1).to(device)


def resized_crop(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
                 flip: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Per sample, the box of width w and height h (fractions of the side) centred at (cx, cy) (in [-1, 1]
    coordinates), mirrored where `flip`, resampled to size x size; outside the image is 0."""
    sign = torch.where(flip, -1.0, 1.0).to(x.dtype)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w * sign, zero, cx], -1), torch.stack([zero, h, cy], -1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, (x.shape[0], x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def grey(x: torch.Tensor) -> torch.Tensor:
    """Luma (B, 1, H, W) of RGB, the image itself if it has one channel."""
    if x.shape[1] == 1:
        return x
    return (x * channel_constant(GREY_WEIGHTS, x.dtype, x.device)).sum(1, keepdim=True)


def jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
           hue: torch.Tensor | None = None) -> torch.Tensor:
    """Brightness (scale), contrast (blend with the mean luma), saturation (blend with the luma) by
    per-sample factors, clamped to [0, 1] after each, as torchvision's ColorJitter does, then a hue shift
    of `hue` turns (None: none)."""
    f = lambda t: t.view(-1, 1, 1, 1).to(x.dtype)  # noqa: E731
    x = (x * f(brightness)).clamp(0, 1)
    mean = grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * f(contrast) + mean).clamp(0, 1)
    g = grey(x)
    x = ((x - g) * f(saturation) + g).clamp(0, 1)
    return x if hue is None else hue_shift(x, hue)


def hue_shift(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate each sample's hue by `turns` (a fraction of the colour circle) at constant HSV saturation and
    value; one channel: unchanged. RGB -> HSV by the hexcone's definition, back by the closed form
    c_n = V - C clamp(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6 with n = 5, 3, 1 for R, G, B."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    value, chroma = x.amax(1), x.amax(1) - x.amin(1)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))  # grey pixels: any hue, chroma 0 keeps them
    sixths = torch.where(value == r, (g - b) / safe,
                         torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = (sixths / 6 + turns.to(x.dtype).view(-1, 1, 1)) % 1.0
    n = channel_constant((5.0, 3.0, 1.0), x.dtype, x.device)
    k = (n + 6 * hue[:, None]) % 6
    return value[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def blur(x: torch.Tensor, sigma: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (pixels), kernel radius ceil(3 sigma_max), reflect padding.
    `sigma_max` bounds `sigma` from above and is given, not read from `sigma`: on a GPU that read would be a
    host round trip per view and step."""
    radius = max(1, math.ceil(3 * sigma_max))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (offsets[None] / sigma.to(x.dtype)[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)                                   # (B, K)
    b, c, hgt, wid = x.shape
    kernel = k.repeat_interleave(c, 0)[:, None]                      # (B*C, 1, K)
    y = F.pad(x.reshape(1, b * c, hgt, wid), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel[:, :, None, :], groups=b * c)             # along width
    y = F.conv2d(y, kernel[:, :, :, None], groups=b * c)             # along height
    return y.reshape(b, c, hgt, wid)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """Invert the pixels at or above 1/2 (PIL's ImageOps.solarize with threshold 128)."""
    return torch.where(x >= 0.5, 1.0 - x, x)


# ------------------------------------------------------------------ recipes

class Augment:
    """`augment(x, step, index)` -> the augmented batch (normalized as x was); `views(...)` for multi-crop.

    x: normalized float images (B, C, H, W) on any device; index: the samples' indices in the data set."""

    def __init__(self, kind: str, seed: int, mean: Sequence[float], std: Sequence[float], local_crops: int = 0,
                 local_size: int | None = None):
        if kind not in KINDS:
            raise ValueError(f"augmentation {kind!r} is not one of {', '.join(KINDS)}")
        self.kind, self.seed, self.local_crops, self.local_size = kind, seed, local_crops, local_size
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))

    def __call__(self, x: torch.Tensor, step: int, index: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return x
        if self.kind == "flip-crop":
            return self._pixels(x, lambda p, u: self._flip_crop(p, u), step, index)
        return self._pixels(x, lambda p, u: self._dino(p, u, view=0), step, index)

    def views(self, x: torch.Tensor, step: int, index: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """DINO multi-crop: (teacher views = the 2 global crops, student views = global + local crops)."""
        views = [self._pixels(x, lambda p, u, v=v: self._dino(p, u, view=v, local_size=self.local_size), step, index)
                 for v in range(2 + self.local_crops)]
        return views[:2], views

    # -- helpers
    def _pixels(self, x, op, step, index):
        mean, std = channel_constant(self.mean, x.dtype, x.device), channel_constant(self.std, x.dtype, x.device)
        index = index.to(x.device, non_blocking=True)  # rows on the host (train.data_on_device false): no wait

        def u(draw: int) -> torch.Tensor:
            return uniform(self.seed, step, index, draw)
        return (op(x * std + mean, u) - mean) / std

    @staticmethod
    def _flip_crop(p, u):
        side = p.shape[-1]
        dx = (u(0) * (2 * PAD + 1)).floor() - PAD
        dy = (u(1) * (2 * PAD + 1)).floor() - PAD
        one = torch.ones_like(dx)
        return resized_crop(p, one, one, 2 * dx / side, 2 * dy / side, u(2) < 0.5, side, mode="nearest")

    @staticmethod
    def _dino(p, u, view: int, local_size: int | None = None):
        side = p.shape[-1]
        local = view >= 2
        lo, hi = LOCAL_SCALE if local else GLOBAL_SCALE
        size = (local_size or local_side(side)) if local else side
        draw = 16 * view  # each view its own draws
        area = lo + (hi - lo) * u(draw)
        ratio = torch.exp(math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * u(draw + 1))
        w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
        cx, cy = (1 - w) * (2 * u(draw + 2) - 1), (1 - h) * (2 * u(draw + 3) - 1)
        p = resized_crop(p, w, h, cx, cy, u(draw + 4) < 0.5, size)
        on = u(draw + 5) < JITTER["p"]
        spread = lambda a, d: torch.where(on, 1 - a + 2 * a * u(d), torch.ones_like(area))  # noqa: E731
        hue = torch.where(on, JITTER["hue"] * (2 * u(draw + 13) - 1), torch.zeros_like(area))
        p = jitter(p, spread(JITTER["brightness"], draw + 6), spread(JITTER["contrast"], draw + 7),
                   spread(JITTER["saturation"], draw + 8), hue)
        p = torch.where((u(draw + 9) < GREY_P).view(-1, 1, 1, 1), grey(p).expand_as(p), p)
        blur_p = (1.0, 0.1)[view] if view < 2 else 0.5
        sigma = (SIGMA[0] + (SIGMA[1] - SIGMA[0]) * u(draw + 10)) * side / 224
        p = torch.where((u(draw + 11) < blur_p).view(-1, 1, 1, 1), blur(p, sigma, SIGMA[1] * side / 224), p)
        if view == 1:
            p = torch.where((u(draw + 12) < 0.2).view(-1, 1, 1, 1), solarize(p), p)
        return p


def local_side(side: int) -> int:
    """DINO's local-crop side for global views of `side` px: 96/224 of it (Caron et al. 2021, Sec. 3)."""
    return max(1, round(side * LOCAL_SIDE))


def augmenter(kind: str, preprocess, seed: int, channels: int, local_crops: int = 0,
              local_size: int | None = None) -> Augment:
    """The run's augmentation; float inputs without a Preprocess (the API's images, noise) are taken as pixel
    units."""
    normalized = isinstance(preprocess, Preprocess)
    mean, std = (preprocess.mean, preprocess.std) if normalized else ((0.0,) * channels, (1.0,) * channels)
    return Augment(kind, seed, mean, std, local_crops, local_size)


def multicrop_loss(teacher_out: list[torch.Tensor], student_out: list[torch.Tensor], loss) -> torch.Tensor:
    """DINO's multi-crop objective (Caron et al. 2021, Eq. 3 / Algorithm 1): `loss(student_j, teacher_i)`
    averaged over every pair of a teacher view i (the global crops) and a student view j != i (the same
    global crop is not its own target); student_out lists the global views first, as `Augment.views`."""
    terms = [loss(s, t) for i, t in enumerate(teacher_out) for j, s in enumerate(student_out) if j != i]
    return torch.stack(terms).mean()
