import copy

import pytest
import torch

from randteach.config import OptimConfig
from randteach.optim import build_optimizer, load_optimizer_state, lr_at


def test_exponential_schedule_is_the_geometric_sequence():
    cfg = OptimConfig(lr=1e-6, lr_end=1e6, schedule="exponential")
    lrs = [lr_at(cfg, s, 13) for s in range(13)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e6)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert all(r == pytest.approx(10.0) for r in ratios)


def test_warmup_cosine_constant():
    cfg = OptimConfig(lr=1.0, schedule="warmup", warmup_steps=4)
    assert [lr_at(cfg, s, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cfg = OptimConfig(lr=1.0, min_lr=0.0, schedule="cosine", warmup_steps=0)
    assert lr_at(cfg, 0, 11) == pytest.approx(1.0)
    assert lr_at(cfg, 5, 11) == pytest.approx(0.5)
    assert lr_at(cfg, 10, 11) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(OptimConfig(lr=0.3), 99, 100) == 0.3


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                       ("sgd", torch.optim.SGD)])
def test_optimizers(name, cls):
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer(OptimConfig(name=name, lr=0.1, momentum=0.9, weight_decay=0.01), [p])
    assert isinstance(opt, cls)
    g = opt.param_groups[0]
    assert g["lr"] == 0.1 and g["weight_decay"] == 0.01
    if name == "sgd":
        assert g["momentum"] == 0.9


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_cpu_optimizers_are_fused_and_make_the_default_implementations_update(name):
    torch.manual_seed(0)
    cfg = OptimConfig(name=name, lr=0.1, momentum=0.9, weight_decay=0.01)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    starts = [p.detach().clone() for p in params]
    fused = build_optimizer(cfg, params)
    assert fused.defaults["fused"] is True
    plain = type(fused)(twins, lr=0.1, weight_decay=0.01, **({"momentum": 0.9} if name == "sgd" else {}))
    for _ in range(5):
        grads = [torch.randn(5, 3) for _ in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step(), plain.step()
    for p, q, p0 in zip(params, twins, starts):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
        assert (p - p0).abs().min() > 1e-3  # every entry moved: the comparison is not of two idle optimizers


def test_loaded_moments_take_their_parameters_memory_layout():
    # fused kernels read parameter and moments as flat memory: a checkpoint written from an NCHW student and
    # loaded into a channels-last one must be re-laid out, else the update pairs the wrong elements.
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    nchw = torch.nn.Parameter(w.clone())
    saved = build_optimizer(OptimConfig(name="adamw", lr=0.1), [nchw])
    nchw.grad = torch.randn_like(w)
    saved.step()
    updated = []
    for layout in (torch.contiguous_format, torch.channels_last):
        p = torch.nn.Parameter(nchw.detach().clone().contiguous(memory_format=layout))
        opt = build_optimizer(OptimConfig(name="adamw", lr=0.1), [p])
        load_optimizer_state(opt, copy.deepcopy(saved.state_dict()))  # load_state_dict may share tensors
        assert opt.state[p]["exp_avg"].stride() == p.stride()
        p.grad = torch.zeros_like(p)
        opt.step()
        updated.append(p.detach())
    assert torch.allclose(updated[0], updated[1], atol=1e-6)
