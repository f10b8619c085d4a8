"""The fast paths do not change the science (bf16, channels-last, the teacher cache, compile).

tests/test_escape.py and tests/test_float64_start.py already show that the escape at eps = 1e-10 happens
under fp32 and under the bf16 fast path, and that bf16 waits for the float64 start to end. Here: the bf16 switch
follows its documented rule step by step; the escape survives the teacher cache (whose targets come from
other batches than the student's); channels-last, torch.compile and bf16 itself reproduce the plain
path's losses within their rounding.
"""
import functools

import pytest
import torch

from randteach.init import parameter_norm
from randteach.runs.rundir import RunDir
from randteach.train.loop import distill
from randteach.train.setup import build_teacher_and_student, load_training_inputs

from tiny import tiny_config

# the escaping paper's setting, tiny: conv net + one linear layer, SGD at 1e4, N-MSE, student at
# theta_T + 1e-10 theta_fresh (as in tests/test_escape.py)
# The 1e-10 residue is held in float64 until the student has left (the float64 start, precision.py), so the
# escape follows the formula on any CPU. Pinned to the CPU to keep the suite's device fixed (CUDA: tests/test_gpu.py).
ESCAPE = dict(head__kind="linear", head__out_dim=64, init__mode="neighborhood", init__epsilon=1e-10, train__device="cpu",
              loss__name="nmse", optim__name="sgd", optim__lr=1e4, optim__momentum=0, data__n_samples=256,
              train__max_steps=8, probe__which="[]", train__probe_every=0, train__checkpoint_every=0)
# an ordinary run away from the teacher: the fast paths must give the same losses as the plain one
PLAIN = dict(init__mode="independent", train__max_steps=4, data__n_samples=256, probe__which="[]",
             train__probe_every=0, train__checkpoint_every=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _steps(tmp_path, name, **overrides):
    cfg = tiny_config(tmp_path, out=str(tmp_path / name), **overrides)
    distill(cfg, progress=False)
    return cfg, [r for r in RunDir(cfg.run_dir()).records() if "loss" in r]


def _teacher_norm(cfg) -> float:
    inputs, _, data, size = load_training_inputs(cfg)
    teacher, _ = build_teacher_and_student(cfg, data.images.shape[1], size)
    return parameter_norm(teacher)


def test_bf16_switches_on_by_its_rule_and_stays_on(tmp_path):
    # Rule (train.bf16_after_distance): step k runs in bf16 once ||theta_S - theta_T|| before it (the
    # distance logged at step k-1) exceeds after * ||theta_T||, and stays in bf16 from then on. (The float64
    # start ends at 1.2e-4 < after, so it is over by then.)
    after = 1e-3
    cfg, steps = _steps(tmp_path, "rule", **ESCAPE, train__precision="bf16", train__bf16_after_distance=after)
    norm = _teacher_norm(cfg)
    flags = [s["bf16"] for s in steps]
    assert not flags[0] and flags[-1]
    for prev, cur in zip(steps, steps[1:]):
        assert cur["bf16"] == (prev["bf16"] or prev["dist_teacher"] > after * norm), (prev, cur)
    on = flags.index(True)
    assert all(flags[on:])
    # after the switch the student keeps training in bf16: finite, non-zero losses, and it keeps moving
    assert all(0 < s["loss"] < float("inf") for s in steps[on:])
    assert steps[-1]["dist_teacher"] > steps[on - 1]["dist_teacher"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_escape_with_the_teacher_cache(tmp_path, precision):
    # The teacher runs live while the float64 start lasts and from its cached fp32 targets after it: the
    # student starts at ~0 loss with a non-zero gradient and leaves.
    cfg, steps = _steps(tmp_path, precision, **ESCAPE, train__precision=precision, train__teacher_cache=True,
                        data__root=str(tmp_path / "root"))
    norm = _teacher_norm(cfg)
    assert steps[0]["loss"] < 1e-10 and steps[0]["dist_teacher"] < 1e-6 * norm
    assert steps[0]["grad_norm"] > 0
    assert max(s["loss"] for s in steps) > 1e-2
    assert steps[-1]["dist_teacher"] > 1e-2 * norm
    if precision == "bf16":
        assert not steps[0]["bf16"] and steps[-1]["bf16"]


def _losses(steps):
    return [s["loss"] for s in steps]


def _student_layout(tmp_path, **overrides) -> bool:
    """Whether a run's student starts in channels-last memory format (its last conv weight: the first one,
    with one input channel, is both layouts at once)."""
    from randteach.train.distributed import Dist
    from randteach.train.state import TrainState
    cfg = tiny_config(tmp_path, out=str(tmp_path / "layout"), **{**PLAIN, **overrides})
    run = RunDir(cfg.run_dir()).create()
    state = TrainState.create_or_resume(cfg, run, Dist(), torch.device("cpu"))
    conv = [m for m in state.student.encoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert state.conv_like == conv.weight.is_contiguous(memory_format=torch.channels_last)
    return state.conv_like


def test_channels_last_in_fp32_on_the_cpu_for_the_narrow_encoders_only(tmp_path):
    assert _student_layout(tmp_path, train__precision="fp32")                                # convnet
    assert not _student_layout(tmp_path, train__precision="fp32", train__channels_last=False)
    assert not _student_layout(tmp_path, train__precision="fp32", model__encoder="vgg11", data__n_samples=8)
    assert _student_layout(tmp_path, train__precision="bf16", model__encoder="vgg11", data__n_samples=8)


def test_channels_last_gives_the_same_losses(tmp_path):
    _, nhwc = _steps(tmp_path, "nhwc", **PLAIN, train__precision="bf16", train__channels_last=True)
    _, nchw = _steps(tmp_path, "nchw", **PLAIN, train__precision="bf16", train__channels_last=False)
    assert all(s["bf16"] for s in nhwc + nchw)
    assert _losses(nhwc) == pytest.approx(_losses(nchw), rel=1e-2)
    # and in fp32 on the CPU (the convnet): the same losses to fp32 rounding
    _, nhwc = _steps(tmp_path, "nhwc32", **PLAIN, train__channels_last=True)
    _, nchw = _steps(tmp_path, "nchw32", **PLAIN, train__channels_last=False)
    assert _losses(nhwc) == pytest.approx(_losses(nchw), rel=1e-5)


def test_bf16_losses_follow_fp32(tmp_path):
    # bf16 autocast changes the forward passes by bf16 rounding (8 bits of mantissa), not the run.
    _, bf16 = _steps(tmp_path, "bf16", **PLAIN, train__precision="bf16")
    _, fp32 = _steps(tmp_path, "fp32", **PLAIN, train__precision="fp32")
    assert all(s["bf16"] for s in bf16) and not any(s["bf16"] for s in fp32)
    # the KL (the default loss) is small: bf16 rounding moves it 1e-3 of itself (measured), 4e-5 absolute
    assert _losses(bf16) == pytest.approx(_losses(fp32), rel=1e-2)
    assert _losses(bf16) != _losses(fp32)  # bf16 really was used


def test_compile_gives_the_same_losses(tmp_path, monkeypatch):
    # What train.compile changes in the loop: the forward passes go through torch.compile's wrappers
    # (dynamo graph capture, AOTAutograd backward) while the optimizer, checkpoints and distances use the
    # original modules. The aot_eager backend exercises all of that without inductor's C++ build, which
    # takes minutes on this CPU; inductor's kernels are torch's to test.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    _, compiled = _steps(tmp_path, "compiled", **PLAIN, train__compile=True)
    _, eager = _steps(tmp_path, "eager", **PLAIN, train__compile=False)
    torch._dynamo.reset()
    assert _losses(compiled) == pytest.approx(_losses(eager), rel=1e-4)
    assert compiled[-1]["dist_init"] == pytest.approx(eager[-1]["dist_init"], rel=1e-4)


def test_exact_fp32_turns_tf32_off_and_restores_it():
    import torch
    from randteach.precision import exact_fp32
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with exact_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_probes_and_supervised_training_run_without_tf32(tmp_path):
    # on a GPU fp32 convolutions and matmuls default to TF32 (10 mantissa bits); every model evaluation
    # outside the loop (probes, analyses, supervised training) turns it off as the loop does. The flags
    # exist on a CPU build too: a module records what it saw.
    import torch.nn as nn
    from randteach.data import Preprocess, load_dataset
    from randteach.probes.embedding import Prober
    from randteach.train.supervised import accuracy
    from tiny import tiny_config
    seen = []

    class Recording(nn.Flatten):
        def forward(self, x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return super().forward(x)

    data = load_dataset("digits", "train")
    cfg = tiny_config(tmp_path, **{"probe.max_iter": 5})
    splits = (data.subset(torch.arange(100)), data.subset(torch.arange(100, 150)))
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # torch's GPU default
    try:
        Prober(cfg, 1, 8, torch.device("cpu"), splits=splits).probe(Recording())
        accuracy(Recording(), splits[1], Preprocess.fit(splits[0]), torch.device("cpu"))
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32   # restored after
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert seen and all(flags == (False, False) for flags in seen)
