"""Parameter vectors: flatten a model's parameters, span planes through three of them, and evaluate a
module at any parameter point with `torch.func.functional_call` (no model is rebuilt or overwritten).

Plane (random-teacher paper, Sec. 5 and App. C.3), through an origin theta_0 (the teacher) and two
anchors theta_1, theta_2 with v1 = theta_1 - theta_0, v2 = theta_2 - theta_0:
- affine:     theta(l1, l2) = theta_0 + l1 v1 + l2 v2; the anchors sit at (0, 0), (1, 0), (0, 1);
- orthogonal: theta(x, y)   = theta_0 + x e1 + y e2 with Gram-Schmidt e1 = v1 / |v1|,
              e2 = u / |u|, u = v2 - <v2, e1> e1; (x, y) are distances, so the distances and angles
              between the three anchors are those of the parameter space.
Vectors are held in float64 and rounded once to the parameters' dtype when a point is built.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call


class ParamSpace:
    """The parameters (names, shapes, dtypes) of a template module, in `named_parameters()` order."""

    def __init__(self, module: nn.Module):
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [p.shape for _, p in module.named_parameters()]
        self.dtypes = [p.dtype for _, p in module.named_parameters()]
        self.numels = [p.numel() for _, p in module.named_parameters()]
        self.buffer_names = [n for n, _ in module.named_buffers()]
        self.size = sum(self.numels)

    def flatten(self, state: dict[str, torch.Tensor] | nn.Module) -> torch.Tensor:
        """One float64 vector (on the CPU) of the parameters in `state` (a state dict or a module)."""
        if isinstance(state, nn.Module):
            state = dict(state.named_parameters())
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"state has no parameter(s) {', '.join(missing[:5])}: not the same architecture")
        reshaped = [f"{n} {tuple(state[n].shape)} (expected {tuple(s)})" for n, s in zip(self.names, self.shapes)
                    if state[n].shape != s]
        if reshaped:
            raise KeyError(f"state's parameter(s) {', '.join(reshaped[:3])} have other shapes: not the same "
                           "architecture")
        return torch.cat([state[n].detach().reshape(-1).to("cpu", torch.float64) for n in self.names])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> tensor of the parameter's shape and dtype (rounded once from `vec`)."""
        if vec.numel() != self.size:
            raise ValueError(f"vector has {vec.numel()} entries, the parameters {self.size}")
        out = {}
        for name, shape, dtype, chunk in zip(self.names, self.shapes, self.dtypes, vec.split(self.numels)):
            out[name] = chunk.to(dtype).reshape(shape)
        return out

    def buffers(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: state[n] for n in self.buffer_names if n in state}


@dataclass
class Plane:
    """The plane through origin + span(v1, v2), with both coordinate systems (see the module docstring)."""

    origin: torch.Tensor   # float64 (P,)
    v1: torch.Tensor
    v2: torch.Tensor

    @classmethod
    def through(cls, origin: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor) -> "Plane":
        return cls(origin.double(), (a1.double() - origin.double()), (a2.double() - origin.double()))

    def __post_init__(self):
        n1 = float(self.v1.norm())
        if n1 == 0:
            raise ValueError("the first anchor equals the origin: the plane is undefined")
        self.e1 = self.v1 / n1
        self.v2_e1 = float(self.v2 @ self.e1)
        u = self.v2 - self.v2_e1 * self.e1
        nu = float(u.norm())
        if nu <= 1e-12 * max(n1, float(self.v2.norm())):
            raise ValueError("the three anchors are collinear: they span no plane")
        self.e2 = u / nu
        self.norm_v1, self.norm_u = n1, nu

    # ---------------------------------------------------------------- points
    def affine_point(self, l1: float, l2: float) -> torch.Tensor:
        """theta_0 + l1 v1 + l2 v2 (float64)."""
        return self.origin + l1 * self.v1 + l2 * self.v2

    def orthogonal_point(self, x: float, y: float) -> torch.Tensor:
        """theta_0 + x e1 + y e2 (float64)."""
        return self.origin + x * self.e1 + y * self.e2

    # ----------------------------------------------------------- coordinates
    def to_affine(self, x: float, y: float) -> tuple[float, float]:
        """Orthogonal (x, y) -> the affine (l1, l2) of the same point: x e1 + y e2 = l1 v1 + l2 v2."""
        l2 = y / self.norm_u
        return (x - l2 * self.v2_e1) / self.norm_v1, l2

    def to_orthogonal(self, l1: float, l2: float) -> tuple[float, float]:
        return l1 * self.norm_v1 + l2 * self.v2_e1, l2 * self.norm_u

    def project(self, theta: torch.Tensor) -> tuple[float, float]:
        """Orthogonal coordinates of the projection of `theta` onto the plane."""
        d = theta.double() - self.origin
        return float(d @ self.e1), float(d @ self.e2)

    def anchor_coordinates(self, projection: str) -> list[tuple[float, float]]:
        """Coordinates of origin, anchor 1 and anchor 2 in the `projection` ('affine' or 'orthogonal')."""
        if projection == "affine":
            return [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)]
        return [(0.0, 0.0), (self.norm_v1, 0.0), (self.v2_e1, self.norm_u)]

    @property
    def scale(self) -> float:
        """max(|v1|, |v2|): the unit of the orthogonal grid's extent."""
        return max(self.norm_v1, float(self.v2.norm()))


def interpolate_buffers(origin: dict, b1: dict, b2: dict, l1: float, l2: float) -> dict[str, torch.Tensor]:
    """Buffers at affine (l1, l2), treated like parameters: b0 + l1 (b1 - b0) + l2 (b2 - b0).

    Batch-norm running variances are clamped at 0 (an extrapolation can make them negative); integer
    buffers (num_batches_tracked) are the origin's. At the anchors this returns their own buffers."""
    out = {}
    for name, b0 in origin.items():
        if not b0.is_floating_point():
            out[name] = b0
            continue
        v = b0.double() + l1 * (b1[name].double() - b0.double()) + l2 * (b2[name].double() - b0.double())
        if name.endswith("running_var"):
            v = v.clamp_min(0.0)
        out[name] = v.to(b0.dtype)
    return out


def interpolate_states(a: dict, b: dict, gamma: float) -> dict[str, torch.Tensor]:
    """gamma * a + (1 - gamma) * b for every floating tensor (float64, rounded once); integer tensors from a.

    Written as two products (not a + gamma (b - a)) so gamma = 1 gives `a` and gamma = 0 gives `b` exactly."""
    out = {}
    for name, ta in a.items():
        if not ta.is_floating_point():
            out[name] = ta
            continue
        out[name] = (gamma * ta.double() + (1.0 - gamma) * b[name].double()).to(ta.dtype)
    return out


def distances(*vectors: torch.Tensor) -> list[list[float]]:
    """Pairwise L2 distances (float64)."""
    return [[float((a.double() - b.double()).norm()) for b in vectors] for a in vectors]


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix` ('encoder.'), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


class AtPoint(nn.Module):
    """`module` evaluated with the given parameters and buffers by `functional_call`; the module's own
    tensors are neither used nor changed (only non-persistent buffers, which no state dict holds, are the
    module's). Train/eval mode is the module's (`.eval()` passes through)."""

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor]):
        super().__init__()
        missing = set(module.state_dict()) - set(tensors)
        if missing:
            raise ValueError(f"no value given for {', '.join(sorted(missing)[:5])}")
        self.module = module
        self.tensors = tensors
        for attr in ("embed_dim", "out_dim"):
            if hasattr(module, attr):
                setattr(self, attr, getattr(module, attr))

    def forward(self, *args):
        return functional_call(self.module, self.tensors, args, tie_weights=False, strict=False)
