"""Teacher and student initialization (Sarnthein et al. 2023, Sec. 4 "Local Initialization"; escaping paper, Sec. 2).

The student starts from the teacher by the *locality* rule of Sarnthein et al. (2023, Sec. 4, "Local
Initialization")::

    theta_S(alpha) = ((1 - alpha) * theta_T + alpha * theta_fresh) / delta,   delta = sqrt(alpha^2 + (1 - alpha)^2)

or by the follow-up paper's neighborhood ``theta_T + eps * theta_fresh``. Only parameters are mixed;
buffers (batch-norm statistics) are copied from the teacher.

Precision: the mix is computed in float64. Rounded to fp32 (`dtype=None` keeps the teacher's dtype), a
student at alpha = 1e-10 is bitwise equal to its teacher except where a teacher weight is itself tiny,
because 1e-10 is far below fp32's relative resolution 2^-23. Kept in float64 (`dtype=torch.float64`,
what the distillation loop does, see precision.py) the whole residue alpha * theta_fresh is represented.
`init_report` says how many weights differ, as held and once rounded to fp32.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def _mixed(teacher: nn.Module, fresh: nn.Module, a: float, b: float | dict[str, torch.Tensor], scale: float,
           dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of `teacher` whose parameters are (a * teacher + b * fresh) / scale, computed in float64 and
    held in `dtype` (None: the teacher's dtype). b: a number, or a float64 factor per weight of each
    parameter (by name)."""
    out = copy.deepcopy(teacher)
    if dtype is not None:
        out.to(dtype)
    fresh_params = dict(fresh.named_parameters())
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name not in fresh_params or fresh_params[name].shape != p.shape:
                raise ValueError(f"teacher and fresh init differ at parameter {name!r}: both must have the same architecture")
            factor = b[name].to(p.device) if isinstance(b, dict) else b
            mix = (a * p.double() + factor * fresh_params[name].double()) / scale
            p.copy_(mix.to(p.dtype))
    return out


def locality_init(teacher: nn.Module, fresh: nn.Module, alpha: float, variance_preserving: bool = True,
                  dtype: torch.dtype | None = None) -> nn.Module:
    """A new module with parameters ((1-alpha) * teacher + alpha * fresh) / delta and the teacher's buffers.

    delta = sqrt(alpha^2 + (1-alpha)^2) keeps the variance of two independent inits constant
    (delta = 1 without variance preservation). alpha = 0 copies the teacher, alpha = 1 gives `fresh`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    delta = math.sqrt(alpha ** 2 + (1 - alpha) ** 2) if variance_preserving else 1.0
    return _mixed(teacher, fresh, 1.0 - alpha, alpha, delta, dtype)


def neighborhood_init(teacher: nn.Module, fresh: nn.Module, epsilon: float, dtype: torch.dtype | None = None,
                      generator: torch.Generator | None = None) -> nn.Module:
    """theta_T + eps * theta_fresh, the escaping paper's theta^(0) (Sec. 2, "initialized in close proximity").
    eps is `epsilon`; or, given a CPU `generator`, a draw per weight from N(0, epsilon^2): the paper's
    eps ~ N(0; sigma_eps I), with its sigma_eps ~ 1e-10 read as the standard deviation (as a variance it would
    put the student 1e5 times farther from the teacher than the 1e-10 scale the paper describes)."""
    if generator is None:
        return _mixed(teacher, fresh, 1.0, epsilon, 1.0, dtype)
    eps = {name: epsilon * torch.randn(p.shape, generator=generator, dtype=torch.float64)
           for name, p in fresh.named_parameters()}
    return _mixed(teacher, fresh, 1.0, eps, 1.0, dtype)


def exact_copy(teacher: nn.Module) -> nn.Module:
    """An independent copy (no shared storage) of the teacher."""
    return copy.deepcopy(teacher)


# fp32 norms at or above this are fp32-accurate: a sum of squares >= 1e-24 loses under 1e-6 of itself to
# elements whose squares underflow fp32 (each < 1.2e-38), even over 1e8 elements.
_FP32_NORM_FLOOR = 1e-12


@torch.no_grad()
def l2_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each tensor, float64, on the tensors' device: accurate to fp32 rounding for any finite
    values (fp32 squares overflow above ~1.8e19 and underflow below ~1e-19) and non-finite exactly where a
    tensor holds a non-finite value.

    On a GPU, one fused foreach kernel accumulating in float64. On a CPU, torch's float64 norm first copies
    every tensor to float64, which cost the demo's step about 10 %: there the fp32 norms are taken, and only
    those outside [_FP32_NORM_FLOOR, inf) are recomputed in float64 (the check reads the norms to the host,
    which costs a CPU nothing: there is no device queue to wait for)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    if tensors[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))
    norms = torch.stack(torch._foreach_norm(tensors, 2)).double()
    suspect = ~(norms >= _FP32_NORM_FLOOR) | norms.isinf()  # NaN fails the comparison
    for i in suspect.nonzero().flatten().tolist():
        norms[i] = torch.linalg.vector_norm(tensors[i], dtype=torch.float64)
    return norms


def l2_total(tensors: list[torch.Tensor]) -> torch.Tensor:
    """||(t_1, ..., t_n)||_2 of all the tensors together, float64 on their device (`l2_norms`)."""
    return l2_norms(tensors).pow(2).sum().sqrt()


@torch.no_grad()
def distance(a: nn.Module, b: nn.Module) -> torch.Tensor:
    """||theta_a - theta_b||_2 over all parameters, float64 on the device (non-finite if either holds a
    non-finite value; `l2_norms`).

    The difference of two fp32 weights is exact when they are close (Sterbenz), so even the 1e-10-scale
    residue of a locality init is measured without loss."""
    return l2_total(torch._foreach_sub([p.detach() for p in a.parameters()], [p.detach() for p in b.parameters()]))


def parameter_distance(a: nn.Module, b: nn.Module) -> float:
    """`distance`, read to the host."""
    return float(distance(a, b))


@torch.no_grad()
def parameter_norm(m: nn.Module) -> float:
    return float(l2_total([p.detach() for p in m.parameters()]))


def total_grad_norm(params) -> torch.Tensor:
    """||grad||_2 over all parameters, float64 on the device (`l2_norms`: non-finite exactly when a gradient
    is; an fp32 norm would overflow for huge finite gradients and call a step diverged that can be taken)."""
    return l2_total([p.grad.detach() for p in params if p.grad is not None])


@torch.no_grad()
def init_report(teacher: nn.Module, student: nn.Module) -> dict:
    """How far the student starts from the teacher: distance, and how many weights differ at all (as held,
    and once rounded to fp32: the weights an fp32 run would see moved)."""
    differ = differ_fp32 = total = 0
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        differ += int((pt != ps).sum())
        differ_fp32 += int((pt.float() != ps.float()).sum())
        total += pt.numel()
    return {"distance": parameter_distance(teacher, student), "weights_differing": differ,
            "weights_differing_fp32": differ_fp32, "weights_total": total}
