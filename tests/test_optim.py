import math

import pytest
import torch

from randteach.config import OptimConfig
from randteach.optim import build_optimizer, lr_at


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
