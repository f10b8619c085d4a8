"""Projector heads: the DINO-style MLP with an L2 bottleneck (random-teacher paper, App. A and E.1),
one linear layer (escaping paper), or none.

Every head exposes `bottleneck(x)` (the features a cache may store) and `last(z)` (the rest), with
`head(x) == head.last(head.bottleneck(x))`, and `.out_dim`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, HeadConfig


def unit_row_linear(x, weight, bias=None):
    """F.linear with weight normalization at gain 1 (every output unit's weight vector, a row of torch's
    (out, in) weight and a column of the paper's V~, scaled to unit L2 norm):
        y = x W~^T + b,  W~_j = W_j / ||W_j||,
    computed as y_j = (x W^T)_j / ||W_j|| (scaling a row of the weight scales that output unit), so no
    normalized copy of the largest matrix of the model (2^16 x 256 in the paper) is made. Its gradient is
    written out (`_UnitRowLinear.backward`): autograd's route through the norm takes five passes over the
    weight, this one."""
    y = _UnitRowLinear.apply(x, weight)
    return y + bias if bias is not None else y


_NORMALIZE_EPS = 1e-12  # F.normalize's default: the norm is clamped there


class _UnitRowLinear(torch.autograd.Function):
    """y = (x W^T) / n with n_j = max(||W_j||, eps). With y_bj = z_bj / n_j, z = x W^T and dn_j/dW_j = W_j / n_j
    (zero where the clamp holds):
        dL/dx = (g / n) W
        dL/dW = (g / n)^T x - c_j W_j,  c_j = sum_b g_bj y_bj / n_j^2   (c = 0 where the clamp holds)."""

    generate_vmap_rule = True  # stacked runs vmap the head (train/stacked.py)

    @staticmethod
    def forward(x, weight):
        norms = torch.linalg.vector_norm(weight, dim=1).clamp_min(_NORMALIZE_EPS)
        return F.linear(x, weight) / norms

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight = inputs
        ctx.save_for_backward(x, weight, output)

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        # Under autocast the forward's matmul ran in bf16 and its inputs may be bf16: the gradient is computed
        # in the widest of the dtypes involved (autograd casts each result to its input's dtype).
        dtype = functools.reduce(torch.promote_types, (grad.dtype, weight.dtype, x.dtype, y.dtype))
        x, weight, y, grad = (t.to(dtype) for t in (x, weight, y, grad))
        raw = torch.linalg.vector_norm(weight, dim=1)
        norms = raw.clamp_min(_NORMALIZE_EPS)
        scaled = grad / norms                                                       # g / n, (..., out)
        grad_x = scaled @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            rows = (grad * y).reshape(-1, y.shape[-1]).sum(0)                        # sum_b g_bj y_bj
            c = torch.where(raw > _NORMALIZE_EPS, rows / norms.square(), 0.0)
            grad_w = torch.addmm(weight * -c.unsqueeze(1), scaled.reshape(-1, y.shape[-1]).t(),
                                 x.reshape(-1, x.shape[-1]))
        return grad_x, grad_w


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
