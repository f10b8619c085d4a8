import math

import numpy as np
import pytest
import torch
from torch import nn

from randteach.init import exact_copy, init_report, locality_init, neighborhood_init, parameter_distance


def _net(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    m[1].running_mean.fill_(float(seed))  # a buffer that must come from the teacher
    return m


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("vp", [True, False])
def test_locality_matches_numpy(alpha, vp):
    t, f = _net(0), _net(1)
    s = locality_init(t, f, alpha, variance_preserving=vp)
    delta = math.sqrt(alpha ** 2 + (1 - alpha) ** 2) if vp else 1.0
    for (name, ps), pt, pf in zip(s.named_parameters(), t.parameters(), f.parameters()):
        want = ((1 - alpha) * pt.detach().double().numpy() + alpha * pf.detach().double().numpy()) / delta
        np.testing.assert_allclose(ps.detach().numpy(), want.astype(np.float32), rtol=0, atol=0, err_msg=name)
    assert torch.equal(s[1].running_mean, t[1].running_mean)  # buffers from the teacher
    assert s[0].weight.data_ptr() != t[0].weight.data_ptr()   # no shared storage


def test_variance_preservation_keeps_the_std():
    torch.manual_seed(0)
    t, f = nn.Linear(1000, 1000), nn.Linear(1000, 1000)
    mixed = locality_init(t, f, 0.5, variance_preserving=True)
    plain = locality_init(t, f, 0.5, variance_preserving=False)
    assert abs(mixed.weight.std() / t.weight.std() - 1) < 0.01
    assert abs(plain.weight.std() / t.weight.std() - 1 / math.sqrt(2)) < 0.01


def test_tiny_alpha_is_below_fp32_resolution_except_for_tiny_weights():
    t, f = nn.Linear(256, 256), nn.Linear(256, 256)
    with torch.no_grad():
        t.weight[0, 0] = 1e-30  # a tiny teacher weight moves
    s = locality_init(t, f, 1e-10)
    rep = init_report(t, s)
    assert rep["weights_differing"] >= 1
    assert rep["weights_differing"] < 0.01 * rep["weights_total"]
    assert s.weight[0, 0] != t.weight[0, 0]


def test_neighborhood_and_copy():
    t, f = _net(0), _net(1)
    s = neighborhood_init(t, f, 0.25)
    for ps, pt, pf in zip(s.parameters(), t.parameters(), f.parameters()):
        torch.testing.assert_close(ps, pt + 0.25 * pf)
    c = exact_copy(t)
    assert parameter_distance(c, t) == 0.0
    with torch.no_grad():
        c[0].weight.add_(1.0)
    assert parameter_distance(c, t) == pytest.approx(math.sqrt(35), rel=1e-6)


def test_a_drawn_epsilon_scales_each_weight_by_its_own_normal_draw():
    # ESC Sec. 2: eps ~ N(0; sigma_eps I), one draw per weight, sigma_eps the standard deviation
    torch.manual_seed(0)
    t, f = nn.Sequential(nn.Linear(200, 100)), nn.Sequential(nn.Linear(200, 100))
    s = neighborhood_init(t, f, 0.25, generator=torch.Generator().manual_seed(7))
    again = neighborhood_init(t, f, 0.25, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    for (name, ps), pt, pf, pa in zip(s.named_parameters(), t.parameters(), f.parameters(), again.parameters()):
        eps = 0.25 * torch.randn(pf.shape, generator=g, dtype=torch.float64)  # the same draws, in order
        torch.testing.assert_close(ps.double(), pt.double() + eps * pf.double())
        assert torch.equal(ps, pa)
    ratio = (s[0].weight.double() - t[0].weight.double()) / f[0].weight.double()
    assert abs(ratio.std().item() - 0.25) < 0.01 and abs(ratio.mean().item()) < 0.01  # 20,000 draws


def test_alpha_out_of_range():
    with pytest.raises(ValueError):
        locality_init(_net(0), _net(1), 1.5)


def test_norms_do_not_overflow_for_finite_values():
    from randteach.init import parameter_norm
    m = nn.Linear(1000, 1)
    with torch.no_grad():
        m.weight.fill_(1e20)
        m.bias.zero_()
    assert math.isfinite(parameter_norm(m))
    assert parameter_norm(m) == pytest.approx(1e20 * math.sqrt(1000), rel=1e-6)


def test_l2_norms_are_float64_accurate_at_every_magnitude_and_non_finite_exactly_where_a_tensor_is():
    from randteach.init import l2_norms, l2_total
    g = torch.Generator().manual_seed(0)
    finite = [torch.randn(300, 7, generator=g),
              1e20 * torch.randn(500, generator=g),   # fp32 squares overflow
              1e-25 * torch.randn(500, generator=g),  # fp32 squares underflow to zero
              torch.zeros(4), torch.randn(9, dtype=torch.float64, generator=g)]
    bad = [torch.tensor([1.0, math.inf]), torch.tensor([math.nan, 1.0])]
    norms = l2_norms(finite + bad)
    assert norms.dtype == torch.float64
    expected = torch.stack([torch.linalg.vector_norm(t.double()) for t in finite])
    assert torch.allclose(norms[:5], expected, rtol=1e-6, atol=0)
    assert norms[1] > 1e21 and norms[2] > 0
    assert math.isinf(norms[5]) and math.isnan(norms[6])
    assert float(l2_total(finite)) == pytest.approx(float(expected.square().sum().sqrt()), rel=1e-6)
    assert float(l2_total([])) == 0.0


def test_l2_norms_of_ordinary_fp32_tensors_take_no_float64_norm():
    # On a CPU a float64 norm copies its whole input to float64 first; ordinary magnitudes need no such copy.
    from torch.utils._python_dispatch import TorchDispatchMode
    from randteach.init import l2_norms

    class Float64Norms(TorchDispatchMode):
        seen = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if "norm" in func.__name__ and (kwargs.get("dtype") == torch.float64 or torch.float64 in args[1:]):
                Float64Norms.seen += 1
            return func(*args, **kwargs)

    tensors = [torch.randn(64, 32), torch.randn(1000)]
    with Float64Norms():
        l2_norms(tensors)
    assert Float64Norms.seen == 0
    with Float64Norms():
        l2_norms([1e-25 * t for t in tensors])  # these do need float64
    assert Float64Norms.seen == 2


def test_a_fresh_init_with_the_teachers_seed_is_refused(tmp_path):
    # train.seed 0 derives the fresh seed 2: a teacher seed of 2 made theta~ the teacher, the student sqrt(2) theta_T
    from randteach.errors import UserError
    from randteach.train.loop import distill
    from tiny import tiny_config
    cfg = tiny_config(tmp_path, init__teacher_seed=2, init__alpha=0.5, train__max_steps=1, probe__which="[]")
    with pytest.raises(UserError, match="the fresh init theta~ would be the teacher itself"):
        distill(cfg, progress=False)
    distill(tiny_config(tmp_path, init__teacher_seed=2, init__mode="copy", train__max_steps=1, probe__which="[]"),
            progress=False)  # a copy has no fresh init: its seeds may be anything
