import numpy as np
import pytest
import torch

from randteach.losses import Centering, distill_loss


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def st():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 9, generator=g, dtype=torch.float64), torch.randn(6, 9, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("ts, ss", [(1.0, 1.0), (0.04, 0.1)])
def test_ce_and_kl_match_numpy(st, ts, ss):
    s, t = st
    pt, ps = _softmax(t.numpy() / ts), _softmax(s.numpy() / ss)
    ce = -(pt * np.log(ps)).sum(-1).mean()
    kl = (pt * (np.log(pt) - np.log(ps))).sum(-1).mean()
    assert distill_loss("ce", s, t, ts, ss).item() == pytest.approx(ce, rel=1e-5)
    assert distill_loss("kl", s, t, ts, ss).item() == pytest.approx(kl, rel=1e-4, abs=1e-6)


def test_kl_and_ce_have_the_same_gradient(st):
    s, t = st
    g = []
    for name in ("ce", "kl"):
        x = s.clone().float().requires_grad_()
        distill_loss(name, x, t).backward()
        g.append(x.grad)
    assert torch.equal(g[0], g[1])  # the gradient is taken through the same operations: the same updates


@pytest.mark.parametrize("shift", [1e-2, 1e-3, 1e-4])
def test_a_small_kl_keeps_its_digits_in_float32(shift):
    """RT Fig. 17's KLs (1e-7 ... 1e-4) of a head with 4096 outputs: the float32 value against the float64
    sum of p_t (log p_t - log p_s) computed directly."""
    g = torch.Generator().manual_seed(1)
    t = torch.randn(64, 4096, generator=g, dtype=torch.float64) * 0.3
    s = t + shift * torch.randn(64, 4096, generator=g, dtype=torch.float64) + shift
    log_pt, log_ps = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    want = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean().item()
    assert 1e-10 < want < 1e-4
    assert distill_loss("kl", s.float(), t.float()).item() == pytest.approx(want, rel=2e-3)


@pytest.mark.parametrize("s, t, teacher_temp", [([[0.0, 0.0]], [[1.0, -1.0]], 0.01),   # p_t underflows to 0
                                                  ([[200.0, 0.0]], [[0.0, 0.0]], 1.0),    # a gap past float32's exp
                                                  ([[90.0, 0.0, -90.0]], [[0.0, 5.0, 0.0]], 1.0)])
def test_kl_stays_finite_where_the_logits_are_far_apart(s, t, teacher_temp):
    """Large logit gaps (a linear head, small temperatures): the float32 KL is the float64 sum of
    p_t (log p_t - log p_s) over p_t > 0, finite as the cross-entropy and its gradient are."""
    s64, t64 = torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
    log_pt, log_ps = torch.log_softmax(t64 / teacher_temp, -1), torch.log_softmax(s64, -1)
    terms = torch.where(log_pt.exp() > 0, log_pt.exp() * (log_pt - log_ps), 0.0)
    want = terms.sum(-1).mean().item()
    assert distill_loss("kl", s64.float(), t64.float(), teacher_temp).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("low, lift", [(-37.0, 21.0), (-33.0, 21.0), (-30.0, 21.0)])
def test_a_small_kl_from_a_lifted_unlikely_class_keeps_its_digits(low, lift):
    """A class the teacher gives e^-37 that the student lifts by 21 nats: a KL of 1e-9 ... 1e-6, which a
    log-sum-exp in float32 read as 0 (and the float32 expm1 form overflows past 88)."""
    t = torch.zeros(1, 100, dtype=torch.float64)
    t[0, 0] = low
    s = t.clone()
    s[0, 0] = low + lift
    log_pt, log_ps = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    want = (log_pt.exp() * (log_pt - log_ps)).sum().item()
    assert 1e-10 < want < 1e-5
    assert distill_loss("kl", s.float(), t.float()).item() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("offset", [0.0, 10.0, 30.0])
def test_a_constant_offset_between_the_logits_leaves_the_kl(offset):
    # the softmax ignores it; float32's p-weighted mean of d = s - t did not, and read a KL of 5e-7 as 2.2e-6
    g = torch.Generator().manual_seed(2)
    t = torch.randn(4, 4096, generator=g, dtype=torch.float64) * 0.3
    s = t + 1e-3 * torch.randn(4, 4096, generator=g, dtype=torch.float64)
    log_pt, log_ps = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    want = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean().item()
    got = distill_loss("kl", (s + offset).float(), t.float()).item()
    assert got == pytest.approx(want, rel=5e-4)  # 1e-5 ... 1.2e-4 over the CPU kernels (AVX2, AVX-512)


def test_mse_family_matches_numpy(st):
    s, t = st
    S, T = s.numpy(), t.numpy()
    # a mean over the features (and the batch), not a sum: the escaping paper's "mean-squared error"
    assert distill_loss("mse", s, t).item() == pytest.approx(((S - T) ** 2).mean(), rel=1e-5)
    n = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
    want = ((n(S) - n(T)) ** 2).mean()
    assert distill_loss("nmse", s, t).item() == pytest.approx(want, rel=1e-5)
    assert distill_loss("ndmse", s, t).item() == pytest.approx(want, rel=1e-5)


def test_mse_family_equals_torch_mse_loss_with_mean_reduction(st):
    s, t = st
    F = torch.nn.functional
    torch.testing.assert_close(distill_loss("mse", s, t), F.mse_loss(s, t, reduction="mean"))
    unit = lambda a: a / a.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(distill_loss("nmse", s, t), F.mse_loss(unit(s), unit(t), reduction="mean"))
    torch.testing.assert_close(distill_loss("ndmse", s, t), F.mse_loss(unit(s), unit(t), reduction="mean"))
    # and the gradients agree too
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    distill_loss("nmse", x1, t).backward()
    F.mse_loss(unit(x2), unit(t)).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_float64_outputs_keep_float64(st):
    s, t = st
    assert distill_loss("nmse", s, t).dtype == torch.float64
    assert distill_loss("ce", s, t).dtype == torch.float64
    assert distill_loss("ce", s.float(), t.float()).dtype == torch.float32


def test_ndmse_detaches_the_norm(st):
    s, t = st
    x1 = s.clone().float().requires_grad_()
    distill_loss("nmse", x1, t).backward()
    x2 = s.clone().float().requires_grad_()
    distill_loss("ndmse", x2, t).backward()
    # ND-MSE's gradient is the plain one through s/c with c constant: 2 (s/c - t_hat) / c
    c = s.float().norm(dim=-1, keepdim=True)
    t_hat = t.float() / t.float().norm(dim=-1, keepdim=True)
    torch.testing.assert_close(x2.grad, 2 * (s.float() / c - t_hat) / c / s.numel())
    assert not torch.allclose(x1.grad, x2.grad)
    # N-MSE's gradient is orthogonal to s (scale invariance); ND-MSE's is not
    assert torch.allclose((x1.grad * s.float()).sum(-1), torch.zeros(len(s)), atol=1e-6)


def test_teacher_equals_student_gives_zero_loss_and_gradient(st):
    s, _ = st
    for name in ("kl", "mse", "nmse", "ndmse"):
        x = s.clone().float().requires_grad_()
        loss = distill_loss(name, x, s.float())
        loss.backward()
        assert abs(loss.item()) < 1e-6 and x.grad.abs().max() < 1e-5, name


def test_centering_subtracts_running_mean():
    c = Centering(0.5)
    a = torch.ones(4, 3)
    out1 = c.apply(a)
    torch.testing.assert_close(out1, a)              # center starts at 0
    c.update(a.sum(0), len(a))
    torch.testing.assert_close(c.center, 0.5 * torch.ones(3))
    out2 = c.apply(a)
    torch.testing.assert_close(out2, 0.5 * torch.ones(4, 3))


def test_unknown_loss():
    with pytest.raises(ValueError):
        distill_loss("hinge", torch.zeros(1, 2), torch.zeros(1, 2))
