"""Projector heads: the DINO-style MLP with an L2 bottleneck (random-teacher paper, App. A and E.1),
one linear layer (escaping paper), or none.

Every head exposes `bottleneck(x)` (the features a cache may store) and `last(z)` (the rest), with
`head(x) == head.last(head.bottleneck(x))`, and `.out_dim`.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, HeadConfig


def unit_row_linear(x, weight, bias=None):
    """F.linear with weight normalization at gain 1 (every output unit's weight vector, a row of torch's
    (out, in) weight and a column of the paper's V~, scaled to unit L2 norm), computed as
    F.linear(x, weight) / ||row||: scaling a row of the weight scales that output unit, so no normalized
    copy of the largest matrix of the model (2^16 x 256 in the paper) and its backward pass are needed.
    The norm is clamped at F.normalize's eps."""
    norms = weight.norm(dim=1).clamp_min(_NORMALIZE_EPS)
    y = F.linear(x, weight) / norms
    return y + bias if bias is not None else y


_NORMALIZE_EPS = 1e-12  # F.normalize's default


class DINOHead(nn.Module):
    """x -> MLP (Linear + GELU per hidden width) -> L2-bottleneck:
        z = W^T x + b          lin1 (wn1: unit-norm columns of W)
        z~ = z / ||z||_2       fn1
        y = V~^T z~            lin2, no bias (wn2: ||V~[:, i]||_2 = 1)
        y / ||y||_2            fn2
    Default (lin1, fn1, wn2, lin2): f(x) = V~^T (W^T x + b) / ||W^T x + b||_2, eq. of App. A.
    Unlike the authors' code, the normalized weights are the ones used in the forward pass."""

    def __init__(self, in_dim: int, hidden_dims: list[int], bottleneck_dim: int, out_dim: int,
                 wn1: bool = False, lin1: bool = True, fn1: bool = True,
                 wn2: bool = True, lin2: bool = True, fn2: bool = False):
        super().__init__()
        if wn1 and not lin1:
            raise ConfigError("head.wn1=true normalizes the weight of lin1, but head.lin1=false removes it; "
                              "set head.wn1=false (or head.lin1=true)")
        if wn2 and not lin2:
            raise ConfigError("head.wn2=true normalizes the weight of lin2, but head.lin2=false removes it; "
                              "set head.wn2=false (or head.lin2=true)")
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden_dims:
            layers += [nn.Linear(d, h), nn.GELU()]
            d = h
        self.mlp = nn.Sequential(*layers)
        self.lin1 = nn.Linear(d, bottleneck_dim) if lin1 else None
        self.bottleneck_dim = bottleneck_dim if lin1 else d            # lin1 off: the MLP output is the bottleneck
        self.lin2 = nn.Linear(self.bottleneck_dim, out_dim, bias=False) if lin2 else None
        self.out_dim = out_dim if lin2 else self.bottleneck_dim        # lin2 off: the bottleneck is the output
        self.wn1, self.fn1, self.wn2, self.fn2 = wn1, fn1, wn2, fn2
        for m in self.modules():  # App. E.1: trunc normal sigma 0.02 (cut at +-2, as DINO's), biases 0
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def bottleneck(self, x):
        """(B, in_dim) -> (B, bottleneck_dim): MLP, lin1, fn1."""
        z = self.mlp(x)
        if self.lin1 is not None:
            linear = unit_row_linear if self.wn1 else F.linear
            z = linear(z, self.lin1.weight, self.lin1.bias)
        return F.normalize(z, dim=-1) if self.fn1 else z

    def last(self, z):
        """(B, bottleneck_dim) -> (B, out_dim): lin2, fn2."""
        if self.lin2 is not None:
            z = unit_row_linear(z, self.lin2.weight) if self.wn2 else F.linear(z, self.lin2.weight)
        return F.normalize(z, dim=-1) if self.fn2 else z

    def forward(self, x):
        return self.last(self.bottleneck(x))


class LinearHead(nn.Module):
    """One linear layer, He-initialized (escaping paper: VGG11 features 512 -> 512)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        nn.init.kaiming_normal_(self.linear.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.linear.bias)
        self.out_dim = out_dim
        self.bottleneck_dim = in_dim

    def bottleneck(self, x):
        return x

    def last(self, z):
        return self.linear(z)

    def forward(self, x):
        return self.linear(x)


class IdentityHead(nn.Module):
    """No projector: the loss acts on the encoder's features."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.out_dim = self.bottleneck_dim = in_dim

    def bottleneck(self, x):
        return x

    def last(self, z):
        return z

    def forward(self, x):
        return x


def build_head(head_cfg: HeadConfig, in_dim: int) -> nn.Module:
    c = head_cfg
    if c.kind == "dino":
        return DINOHead(in_dim, list(c.hidden_dims), c.bottleneck_dim, c.out_dim,
                        wn1=c.wn1, lin1=c.lin1, fn1=c.fn1, wn2=c.wn2, lin2=c.lin2, fn2=c.fn2)
    if c.kind == "linear":
        return LinearHead(in_dim, c.out_dim)
    if c.kind == "none":
        return IdentityHead(in_dim)
    raise ConfigError(f"head.kind: {c.kind!r} is not one of dino, linear, none")
