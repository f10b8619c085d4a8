"""The float64 start: a student at 1e-10 from its teacher leaves it by the papers' arithmetic, on any machine.

A locality init with alpha = 1e-10 (Sarnthein et al. 2023, Sec. 4.2) or the neighborhood
theta_T + 1e-10 theta_fresh (escaping paper, Sec. 2) differs from the teacher by ~1e-10 of its weights,
far below fp32's relative resolution 2^-23 ~ 1.2e-7. Rounded to fp32, the student is bitwise its teacher
except for a few tiny weights, and whether that residue reaches the output depends on the kernels'
summation order: the escape then starts at a device-dependent step, or never.

Here teacher and student start in float64 (resolution 2^-52 ~ 2.2e-16), where the residue is represented,
so the first loss and gradient are the formula's. Once ||theta_S - theta_T|| / ||theta_T|| exceeds
`train.float64_until_distance` (default 2^-23 * 1e3: fp32 resolves the difference with three decimal
digits to spare), both models, the student's init copy and the optimizer state are cast to fp32 and the
run continues there (and in bf16 later, by `train.bf16_after_distance`, one level up).

A student that starts farther away (an independent init, alpha >= 1e-4) never enters the phase. The
switch is logged to metrics.jsonl as {"event": "precision", ...} and saved in the resume checkpoint, which
holds the float64 weights; the model files written for readers (teacher.pt, student_init.pt, student*.pt)
are fp32 (the teacher is exact in fp32; student_init.pt rounds the residue, as an fp32 init would).
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from .init import parameter_distance, parameter_norm

def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matrix work faster than fp32 (Linux /proc/cpuinfo; False where unreadable)."""
    return fast_bf16(read_cpuinfo())


def read_cpuinfo() -> str:
    """The text of Linux's /proc/cpuinfo; empty where there is none (other systems)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def fast_bf16(cpuinfo: str) -> bool:
    """From /proc/cpuinfo's text: AMX bf16 tiles (flag amx_bf16), or an AMD CPU with AVX-512 bf16 (flag
    avx512_bf16). Measured with a 2048^2 matmul (benchmarks/run.py's yardstick), bf16 against fp32: 5.9x on an
    Intel Xeon VM with AMX, 2.3-2.6x and 4.0-4.1x on two AMD EPYC VMs (benchmarks/RESULTS-amd.md,
    RESULTS-amd-bf16.md; on the second, VGG11's distillation step under bf16 autocast and channels-last ran 1.69x
    the same loop in fp32), but 0.52x on an Intel Xeon VM whose AMX was hidden and whose only bf16 path was
    avx512_bf16 (docs/PERFORMANCE.md)."""
    flags = set(cpuinfo_field(cpuinfo, "flags"))
    return "amx_bf16" in flags or (cpuinfo_field(cpuinfo, "vendor_id") == ["AuthenticAMD"] and "avx512_bf16" in flags)


def cpuinfo_field(cpuinfo: str, key: str) -> list[str]:
    """The words of the first `key: ...` line of /proc/cpuinfo's text (empty if there is none)."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.split()
    return []


def uses_bf16(precision: str, device: torch.device) -> bool:
    """`train.precision` resolved for `device`: "auto" means bf16 where it is fast (a CUDA device with bf16
    tensor cores, compute capability 8.0 or above: Ampere and later; or a CPU where `fast_bf16`) and fp32
    elsewhere. (torch.cuda.is_bf16_supported() is also true on older GPUs, which emulate bf16 slowly.)"""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and cpu_has_fast_bf16()


@contextlib.contextmanager
def exact_fp32():
    """fp32 that is fp32 on CUDA. cuDNN runs fp32 convolutions in TF32 by default (10 mantissa bits), which
    truncates the 1e-10 perturbations of a locality or neighborhood init out of every product, so that a
    student can only leave its teacher through the other layers. Speed comes from bf16, which keeps fp32
    until the student has left. The default dtype is float32 too: a caller's torch.set_default_dtype(float64)
    would build other models (other random draws) under the same run address. Restores the previous settings
    on exit."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.get_default_dtype()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
        torch.set_default_dtype(saved[2])


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CPU (AMX) or CUDA; a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def relative_distance(student: nn.Module, teacher: nn.Module) -> float:
    """||theta_S - theta_T|| / ||theta_T|| over all parameters."""
    return parameter_distance(student, teacher) / max(parameter_norm(teacher), 1e-30)


def fp32_state(module: nn.Module) -> dict:
    """The module's state dict with float64 tensors rounded to fp32: model files (teacher.pt, student*.pt)
    are fp32 for every reader; only the resume checkpoint (last.pt) keeps the float64 phase."""
    return {k: v.float() if v.dtype == torch.float64 else v for k, v in module.state_dict().items()}


def fp32_module(module: nn.Module) -> nn.Module:
    """The module itself, or an fp32 copy of it when it is held in float64 (the float64 start). For readers
    of a model's outputs — teacher targets, probes — that fp32 represents to its resolution: they match an
    fp32 run's, share its caches, and skip float64 convolutions (10x and more slower on CPUs)."""
    if any(p.dtype == torch.float64 for p in module.parameters()):
        return copy.deepcopy(module).float()
    return module


def _cast_optimizer_state(optimizer: torch.optim.Optimizer, dtype: torch.dtype) -> None:
    """Momentum buffers and moments follow their parameters' new dtype (the step counters are left as they are)."""
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and v.dtype == torch.float64 and k != "step":
                state[k] = v.to(dtype)


def may_start_in_float64(cfg) -> bool:
    """Whether a run of this config can enter the float64 start, decided from the config alone (the run
    itself decides from the built models). A locality student sits ~alpha * sqrt(2) of its teacher's norm
    away (alpha for the variance-preserving form), a neighborhood student ~epsilon; a scale ten times the
    threshold is therefore surely outside the phase, and anything closer is counted as inside."""
    until = cfg.train.float64_until_distance
    if until <= 0 or cfg.init.mode not in ("locality", "neighborhood"):
        return False
    scale = cfg.init.alpha if cfg.init.mode == "locality" else cfg.init.epsilon
    return scale < 10 * until


class Float64Start:
    """Holds the models in float64 while the student sits within fp32 resolution of its teacher.

    Used by the distillation loop: models are built in `init_dtype`, inputs and head inputs go through
    `cast`, `after_step` ends the phase (returning the metrics record of the switch), and the phase is
    saved and restored with `state_dict` / `load_state_dict`."""

    def __init__(self, until_distance: float):
        self.until_distance = until_distance
        self.active = until_distance > 0  # decided for good by `start` or `load_state_dict`
        self.switch: dict | None = None   # the logged switch record, once it happened

    @property
    def init_dtype(self) -> torch.dtype | None:
        """The dtype in which to build a locality / neighborhood student (None: the model's own)."""
        return torch.float64 if self.active else None

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64 if self.active else torch.float32

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        """Float inputs in the phase's dtype (bf16 autocast outputs come back to fp32 after the phase)."""
        return x.to(self.dtype) if x.is_floating_point() else x

    def start(self, teacher: nn.Module, student: nn.Module) -> float:
        """Enter the phase only for a float64 student within `until_distance` of its teacher; cast to fp32
        otherwise. Returns the relative distance."""
        rel = relative_distance(student, teacher)
        in_float64 = next(student.parameters()).dtype == torch.float64
        if not (self.active and in_float64 and rel <= self.until_distance):
            self.active = False
            teacher.float()
            student.float()
        return rel

    def after_step(self, step: int, teacher: nn.Module, student: nn.Module, others: list[nn.Module],
                   optimizer: torch.optim.Optimizer) -> dict | None:
        """End the phase once the student has left the teacher by `until_distance`; returns the event record."""
        if not self.active:
            return None
        rel = relative_distance(student, teacher)
        if not rel > self.until_distance:  # also stays on while non-finite: the loop reports divergence
            return None
        self._to_float32([teacher, student, *others], optimizer)
        self.switch = {"event": "precision", "step": step, "from": "float64", "to": "float32",
                       "rel_distance": rel, "until_distance": self.until_distance}
        return self.switch

    def _to_float32(self, modules: list[nn.Module], optimizer: torch.optim.Optimizer) -> None:
        self.active = False
        for m in modules:
            m.float()  # keeps the Parameter objects, so the optimizer still holds them
        _cast_optimizer_state(optimizer, torch.float32)

    def state_dict(self) -> dict:
        return {"active": self.active, "switch": self.switch}

    def load_state_dict(self, state: dict | None, modules: list[nn.Module], optimizer: torch.optim.Optimizer) -> None:
        """Restore the phase of a checkpoint (call before loading the models' and optimizer's states).
        A checkpoint without one predates the float64 start and was written in fp32."""
        state = state or {"active": False, "switch": None}
        self.switch = state["switch"]
        if self.active and not state["active"]:
            self._to_float32(modules, optimizer)
        self.active = bool(state["active"])
