"""Teacher-student losses on the head outputs (Sarnthein et al. 2023, Sec. 3; escaping paper Sec. 2 and App. A).

Every loss is a mean over the batch of a per-sample value (RT Eq. (1) writes a sum over the data; the mean
is the authors' code's), computed in float32 (float64 inputs stay
float64) whatever the autocast precision of the forward passes; m is the number of output features:
- ce:    -sum_k softmax(t/tau_T)_k log softmax(s/tau_S)_k                  (the paper's default, tau = 1)
- kl:    KL(softmax(t/tau_T) || softmax(s/tau_S)) = ce - H(teacher)        (same gradient as ce; its
         value computed without the cancellation of ce and H, see `_kl_value`)
- mse:   (1/m) ||s - t||_2^2                                               (mean over features)
- nmse:  (1/m) ||s/||s|| - t/||t|| ||_2^2                                  (bounded loss and gradient)
- ndmse: as nmse, with ||s|| detached from back-propagation (as BatchNorm/LayerNorm do)
The MSE family is the escaping paper's "mean-squared error" (its Sec. 2): a mean over the m features,
so its step sizes (eta = 32 ... 1e5, Fig. 1c) apply as written. CE and KL sum over the m classes.
The teacher side never carries a gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "kl", "mse", "nmse", "ndmse")
_EPS = 1e-12  # guards the norm of an all-zero output


class Centering:
    """DINO's running center of the teacher outputs (Caron et al. 2021, Eq. 4): t <- t - c, and once per
    optimizer step c <- m c + (1-m) mean(t) over the whole global batch (every micro-batch and every process:
    DINO all-reduces the batch sum), so that micro-batching and data parallelism leave the run unchanged."""

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.center: torch.Tensor | None = None

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        if self.center is None:
            self.center = torch.zeros(t.shape[1:], dtype=torch.float32, device=t.device)
        return t - self.center

    def update(self, batch_sum: torch.Tensor, rows: int) -> None:
        """The step's update from the sum of its teacher outputs over `rows` rows (all of the global batch)."""
        self.center = self.momentum * self.center + (1 - self.momentum) * (batch_sum / rows)


def distill_loss(name: str, student: torch.Tensor, teacher: torch.Tensor,
                 teacher_temp: float = 1.0, student_temp: float = 1.0) -> torch.Tensor:
    """The batch-mean teacher-student loss `name` between outputs of shape (B, m)."""
    # float64 outputs (the escape's float64 phase, see precision.py) keep their precision
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    s = student.to(dtype)
    t = teacher.detach().to(dtype)
    if name in ("ce", "kl"):
        log_ps = F.log_softmax(s / student_temp, dim=-1)
        log_pt = F.log_softmax(t / teacher_temp, dim=-1)
        pt = log_pt.exp()
        ce = -(pt * log_ps).sum(-1).mean()
        if name == "ce":
            return ce
        # The KL's value, and exactly the cross-entropy's gradient (ce - ce is exactly 0): the same updates as ce.
        kl = _kl_value(s.detach() / student_temp - t / teacher_temp, log_pt).mean()
        return kl + (ce - ce.detach())
    if name == "mse":
        return (s - t).pow(2).mean(-1).mean()
    if name in ("nmse", "ndmse"):
        s_norm = s.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        if name == "ndmse":
            s_norm = s_norm.detach()
        t_unit = t / t.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        return (s / s_norm - t_unit).pow(2).mean(-1).mean()
    raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")


def _kl_value(d: torch.Tensor, log_pt: torch.Tensor) -> torch.Tensor:
    """Per row, KL(p_t || p_s) from d = s/tau_S - t/tau_T and log p_t = log_softmax(t/tau_T):
    KL = sum_k p_k (d̄ - d_k) + log sum_k p_k exp(d_k) = log sum_k p_k exp(d_k - d̄),  d̄ = sum_k p_k d_k,
    evaluated as log1p(sum_k p_k expm1(d_k - d̄)) (p normalized by its float sum). ce - H subtracts two numbers
    near ln m (11.1 for m = 2^16), so in float32 a KL of 5e-7 came out 10 % high and one of 5e-8 2.3x high
    (the papers plot KLs of 1e-7 ... 1e-4, RT Fig. 5, 17); here each term is small. d is first taken relative
    to its value at the teacher's likeliest class (the softmax ignores a constant): a constant offset between
    the logits made float32's d̄ miss sum_k p_k (d_k - d̄) = 0 by more than a KL of 5e-7. Where d_k - d̄ is past
    _EXPM1_SAFE (logits far apart: a linear head, small temperatures) the term is exp(log p_k + d_k - d̄) - p_k:
    a p_k that underflowed to 0 can still weigh. A row whose sum overflows (a KL past ~88 nats in float32) takes the
    log-sum-exp of log p_k + d_k - d̄. Within 2e-4 relative of float64 sums from 1e-9 up (tests/test_losses.py)."""
    pt = log_pt.exp()
    d = d - d.gather(-1, pt.argmax(-1, keepdim=True))
    total = pt.sum(-1, keepdim=True)
    e = d - (pt * d).sum(-1, keepdim=True) / total
    terms = torch.where(e > _EXPM1_SAFE, torch.exp(log_pt + e) - pt, pt * torch.expm1(e.clamp(max=_EXPM1_SAFE)))
    small = torch.log1p(terms.sum(-1) / total.squeeze(-1))
    large = torch.logsumexp(log_pt + e, -1) - total.squeeze(-1).log()
    return torch.where(torch.isfinite(small), small, large)


_EXPM1_SAFE = 20.0  # past exp(20) = 4.9e8 the - p_k of exp(log p_k + e_k) - p_k is below the float's rounding
