"""Vision Transformer (Dosovitskiy et al. 2021) in the DeiT sizes, for small images.

Pre-norm blocks (LayerNorm -> multi-head self-attention -> residual, LayerNorm -> MLP 4x GELU ->
residual), a cls token and a learned position embedding; the representation is the final
LayerNorm of the cls token. Every block is its own object: the authors' code repeated one block
object `depth` times, so all layers shared one set of weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError

SIZES = {  # name: (width, depth, heads), as DeiT/timm tiny, small, medium, base
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_medium": (512, 12, 8),
    "vit_base": (768, 12, 12),
}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3x(B, h, L, D/h)
        x = F.scaled_dot_product_attention(q, k, v)                                              # (B, h, L, D/h)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, in_channels: int, image_size: int, patch_size: int, dim: int, depth: int, heads: int):
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"ViT: image side {image_size} is not a multiple of the patch size {patch_size}; "
                              "pass patch_size=P with P dividing the side, or resize the images")
        self.image_size, self.patch_size = image_size, patch_size
        n_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])  # distinct objects
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.embed_dim = dim
        self.reset_parameters()

    def reset_parameters(self):
        # timm/DeiT: trunc normal sigma 0.02 for linear weights, cls token and position embedding,
        # biases 0, LayerNorm 1/0. Like timm's, torch's trunc_normal_ cuts at +-2 absolute (100 sigma):
        # in effect N(0, 0.02^2). The patch embedding (a linear map of each patch) gets the same
        # trunc normal here; timm leaves it at PyTorch's default.
        for p in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"ViT built for {self.image_size}x{self.image_size} inputs, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)                  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)    # (B, N+1, D)
        x = self.blocks(x + self.pos_embed)
        return self.norm(x[:, 0])                                           # (B, D)


def default_patch_size(image_size: int) -> int:
    """8 (the paper's choice at 32x32) where it divides the side, else a quarter of the side (7 at 28)."""
    if image_size % 8 == 0:
        return 8
    if image_size % 4 == 0:
        return image_size // 4
    raise ConfigError(f"ViT: no default patch size for {image_size}x{image_size} images; pass patch_size=P "
                      "with P dividing the side")


def build_vit(name: str, in_channels: int, image_size: int, patch_size: int | None = None) -> VisionTransformer:
    dim, depth, heads = SIZES[name]
    return VisionTransformer(in_channels, image_size, patch_size or default_patch_size(image_size), dim, depth, heads)
