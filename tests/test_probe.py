"""Linear and k-NN probes against direct computations (numpy brute force, scikit-learn)."""
import numpy as np
import pytest
import torch
from torch import nn

from randteach.errors import UserError
from randteach.probes.linear_knn import (fit_adamw, fit_logistic_regression, knn_predict, knn_probe, linear_probe,
                                         logistic_objective, logistic_objective_and_grad, standardize)


def _blobs(n_per_class, n_classes, dim, spread, seed):
    rng = np.random.default_rng(seed)
    centers = spread * rng.standard_normal((n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    return centers[y] + rng.standard_normal((len(y), dim)), y


def _split(x, y, n_test, seed=0):
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    return _split(x[:1200].astype(np.float64), y[:1200].astype(np.int64), 400)


# ----------------------------------------------------------------------------------------------------
# standardize


def test_standardize_matches_numpy():
    rng = np.random.default_rng(0)
    train, test = rng.standard_normal((50, 4)) * [1, 10, 0.1, 1] + [0, 5, -2, 0], rng.standard_normal((7, 4))
    train[:, 3] = 0.3  # constant on train, varies on test: centered, divided by 1
    train_z, test_z = standardize(train, test)
    mean, std = train.mean(0), train.std(0)  # population std
    std[3] = 1.0
    np.testing.assert_allclose(train_z.numpy(), (train - mean) / std, atol=1e-12)
    np.testing.assert_allclose(test_z.numpy(), (test - mean) / std, atol=1e-12)
    assert train_z.dtype == torch.float64
    train32, _ = standardize(torch.from_numpy(train).float(), torch.from_numpy(test).float())
    assert train32.dtype == torch.float32
    np.testing.assert_allclose(train32.numpy(), (train - mean) / std, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# k-NN


def _knn_brute_force(train_x, train_y, test_x, k, weighting, temperature, num_classes):
    if weighting == "cosine":
        tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
        te = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
        sims = te @ tr.T
        idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        weights = np.exp(np.take_along_axis(sims, idx, 1) / temperature)
    else:
        dist = ((test_x[:, None, :] - train_x[None, :, :]) ** 2).sum(-1)
        idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
        weights = np.ones(idx.shape)
    scores = np.zeros((len(test_x), num_classes))
    for row in range(len(test_x)):
        np.add.at(scores[row], train_y[idx[row]], weights[row])
    return scores.argmax(1)  # first maximum: ties -> smallest class index


@pytest.mark.parametrize("weighting", ["cosine", "majority"])
def test_knn_matches_brute_force(weighting):
    rng = np.random.default_rng(1)
    train_x, test_x = rng.standard_normal((300, 8)), rng.standard_normal((90, 8))
    train_y, test_y = rng.integers(0, 5, 300), rng.integers(0, 5, 90)
    for k in (1, 4, 20):
        expected = _knn_brute_force(train_x, train_y, test_x, k, weighting, 0.07, 5)
        for chunk_size in (7, 1024):  # chunking does not change the answer
            pred = knn_predict(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x), 5,
                               k=k, weighting=weighting, chunk_size=chunk_size)
            np.testing.assert_array_equal(pred.numpy(), expected)
            acc = knn_probe(train_x, train_y, test_x, test_y, k=k, weighting=weighting, chunk_size=chunk_size)
            assert acc == pytest.approx((expected == test_y).mean())


def test_majority_knn_keeps_its_neighbours_under_a_large_common_offset():
    """float32 features all near one point far from the origin (e.g. a collapsed embedding of large norm):
    the nearest neighbours are those of the exact distances, not of what the float32 expansion cancels."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((390, 8)) + 1e4).astype(np.float32)
    y = rng.integers(0, 5, 390)
    expected = _knn_brute_force(x[:300].astype(np.float64), y[:300], x[300:].astype(np.float64), 20, "majority", 0.07, 5)
    pred = knn_predict(torch.from_numpy(x[:300]), torch.from_numpy(y[:300]), torch.from_numpy(x[300:]), 5, k=20,
                       weighting="majority").numpy()
    assert (pred == expected).mean() >= 0.97  # rounding may swap neighbours at near-equal distances only


@pytest.mark.parametrize("weighting", ["cosine", "majority"])
def test_knn_does_not_depend_on_the_features_scale(weighting):
    """Cosine and L2 neighbours do not change with the scale of the features: float32 features at 1e-30 or
    1e30 vote as at 1 (F.normalize left rows of norm below 1e-12 unnormalized, squared distances underflowed
    to 0 or overflowed: 0.28 instead of 0.87 at 1e-30)."""
    rng = np.random.default_rng(3)
    train_x, test_x = rng.standard_normal((300, 8)), rng.standard_normal((90, 8))
    train_y = rng.integers(0, 5, 300)
    expected = _knn_brute_force(train_x, train_y, test_x, 20, weighting, 0.07, 5)
    for scale in (1e-30, 1e-14, 1e30, 3e37):  # 3e37: a float32 mean of such features overflows
        pred = knn_predict(torch.from_numpy(train_x * scale).float(), torch.from_numpy(train_y),
                           torch.from_numpy(test_x * scale).float(), 5, k=20, weighting=weighting)
        assert (pred.numpy() == expected).mean() >= 0.97, scale  # float32 rounding swaps near-ties only


def test_knn_vote_ties_go_to_the_smallest_class():
    # k = n_train, so which neighbours vote is fixed; the vote is 1:1
    test_x = np.array([[0.0, 0.0]])
    for labels, winner in [([0, 1], 0), ([1, 0], 0), ([2, 1], 1)]:
        train_x = np.array([[1.0, 0.0], [-1.0, 0.0]])
        pred = knn_predict(torch.from_numpy(train_x), torch.tensor(labels), torch.from_numpy(test_x), 3, k=2,
                           weighting="majority")
        assert pred.tolist() == [winner]
    # majority among the k nearest: two of class 2 beat one closer of class 1
    train_x = np.array([[0.1, 0.0], [0.2, 0.0], [0.0, 0.25], [5.0, 5.0]])
    train_y = np.array([1, 2, 2, 0])
    assert knn_probe(train_x, train_y, test_x, np.array([2]), k=3, weighting="majority") == 1.0


def test_knn_temperature_weights_the_vote():
    # one very similar neighbour of class 0 against two less similar of class 1
    train_x = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    train_y = np.array([0, 1, 1])
    test_x, test_y = np.array([[1.0, 0.01]]), np.array([0])
    assert knn_probe(train_x, train_y, test_x, test_y, k=3, temperature=0.07) == 1.0  # exp weights: class 0
    assert knn_probe(train_x, train_y, test_x, test_y, k=3, temperature=100.0) == 0.0  # ~equal weights: class 1
    # a tiny temperature is 1-NN, without overflowing exp(sim / T)
    rng = np.random.default_rng(9)
    train_x, test_x = rng.standard_normal((100, 4)), rng.standard_normal((40, 4))
    train_y, test_y = rng.integers(0, 3, 100), rng.integers(0, 3, 40)
    assert knn_probe(train_x, train_y, test_x, test_y, temperature=1e-4) == knn_probe(train_x, train_y, test_x,
                                                                                      test_y, k=1)


def test_score_reads_every_probe_setting(digits):
    """`score` is what runs and sweeps call: each ProbeConfig key must reach the probe it names."""
    from dataclasses import replace

    from randteach.config import ProbeConfig
    from randteach.probes.embedding import score
    near = (torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]]), torch.tensor([0, 1, 1]),
            torch.tensor([[1.0, 0.01]]), torch.tensor([0]))  # as in test_knn_temperature_weights_the_vote
    base = ProbeConfig(linear="none", knn_k=3, knn_weighting="cosine", knn_temperature=0.07)
    knn = lambda **change: score(*near, replace(base, **change), 2)["knn"]
    assert knn() == 1.0
    assert knn(knn_temperature=100.0) == 0.0  # flat weights: the two class-1 neighbours win
    assert knn(knn_weighting="majority") == 0.0
    assert knn(knn_temperature=100.0, knn_k=1) == 1.0
    assert set(score(*near, replace(base, knn_k=0), 2)) == set()
    tensors = [torch.from_numpy(a) for a in digits]
    logreg = replace(base, knn_k=0, linear="logreg", l2=1e-4, max_iter=500)
    linear = lambda **change: score(*tensors, replace(logreg, **change), 10)["linear"]
    for change, direct in (({"l2": 10.0}, {"l2": 10.0, "max_iter": 500}), ({"max_iter": 2}, {"l2": 1e-4, "max_iter": 2}),
                           ({"linear": "adamw"}, {"method": "adamw", "l2": 1e-4})):
        assert linear(**change) == linear_probe(*tensors, num_classes=10, **direct) != linear(), change


# ----------------------------------------------------------------------------------------------------
# logistic regression


def test_logreg_matches_sklearn(digits):
    from sklearn.linear_model import LogisticRegression
    train_x, train_y, test_x, test_y = digits
    l2 = 1e-2
    train_z, test_z = standardize(train_x, test_x)  # float64
    fit = fit_logistic_regression(train_z, torch.from_numpy(train_y), 10, l2=l2, tol=1e-6, max_iter=2000)
    sk = LogisticRegression(C=1.0 / (l2 * len(train_y)), tol=1e-8, max_iter=10000)
    sk.fit(train_z.numpy(), train_y)
    np.testing.assert_allclose(fit.weight.numpy(), sk.coef_, atol=2e-4 * np.abs(sk.coef_).max())
    ours = (test_z @ fit.weight.T + fit.bias).argmax(1).numpy()
    assert (ours == sk.predict(test_z.numpy())).mean() >= 0.995
    acc = linear_probe(train_x, train_y, test_x, test_y, l2=l2)  # the public path, float64, default tol
    assert acc == pytest.approx(sk.score(test_z.numpy(), test_y), abs=0.01)
    assert acc > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [7, 4096])  # several blocks with a short last one, and one block
def test_fused_objective_and_gradient_equal_autograd(dtype, block, monkeypatch):
    import randteach.probes.linear_knn as lk
    monkeypatch.setattr(lk, "_LOGREG_BLOCK_ROWS", block)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 6, generator=g, dtype=dtype), torch.randint(0, 4, (50,), generator=g)
    weight = torch.randn(4, 6, generator=g, dtype=dtype).requires_grad_()
    bias = torch.randn(4, generator=g, dtype=dtype).requires_grad_()
    want = logistic_objective(weight, bias, x, y, 0.3)
    want.backward()
    loss, grad_w, grad_b = logistic_objective_and_grad(weight.detach(), bias.detach(), x, y, 0.3)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert loss.dtype == torch.float64 and float(loss.detach()) == pytest.approx(float(want.detach()), rel=tol)
    assert grad_w.dtype == dtype and grad_b.dtype == dtype
    torch.testing.assert_close(grad_w, weight.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(grad_b, bias.grad, rtol=tol, atol=tol)


def test_logreg_gradient_vanishes_at_the_solution(digits):
    train_x, train_y, _, _ = digits
    x = torch.from_numpy(train_x).float()
    x = (x - x.mean(0)) / x.std(0).clamp(min=1e-3)
    y = torch.from_numpy(train_y)
    fit = fit_logistic_regression(x, y, 10, l2=1e-3, tol=1e-5)
    weight, bias = fit.weight.clone().requires_grad_(), fit.bias.clone().requires_grad_()
    logistic_objective(weight, bias, x, y, 1e-3).backward()
    assert max(weight.grad.abs().max(), bias.grad.abs().max()) <= 1e-5
    assert fit.grad_max <= 1e-5
    # stopping early leaves a clearly nonzero gradient: max_iter and tol are honoured
    early = fit_logistic_regression(x, y, 10, l2=1e-3, max_iter=3)
    assert early.n_iter <= 3 and early.grad_max > 1e-3


def test_separable_problem_is_solved_exactly():
    x, y = _blobs(40, 3, 5, spread=20.0, seed=2)
    train_x, train_y, test_x, test_y = _split(x, y, 30)
    assert linear_probe(train_x, train_y, test_x, test_y) == 1.0
    assert knn_probe(train_x, train_y, test_x, test_y, k=5) == 1.0
    assert knn_probe(train_x, train_y, test_x, test_y, k=5, weighting="majority") == 1.0


def test_standardize_option_is_honoured():
    # the informative feature lives at scale 1e-3: unstandardized, the L2 penalty keeps its weight near 0
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    x = np.stack([1e-3 * (y - 0.5 + 0.1 * rng.standard_normal(400)), rng.standard_normal(400)], 1)
    train_x, train_y, test_x, test_y = _split(x, y, 100)
    assert linear_probe(train_x, train_y, test_x, test_y, l2=0.1) > 0.95
    assert linear_probe(train_x, train_y, test_x, test_y, l2=0.1, standardize=False) < 0.75


def test_adamw_learns_and_is_close_to_logreg():
    # 10 epochs of batch 256 at lr 1e-3 are only 80 steps on 2000 samples: AdamW is not converged (0.89 here
    # against logreg's 0.99), the protocol assumes tens of thousands of samples
    x, y = _blobs(750, 4, 64, spread=0.5, seed=4)
    train_x, train_y, test_x, test_y = _split(x.astype(np.float32), y, 1000)
    logreg = linear_probe(train_x, train_y, test_x, test_y)
    adamw = linear_probe(train_x, train_y, test_x, test_y, method="adamw")
    assert adamw > 0.8  # chance is 0.25
    assert abs(adamw - logreg) < 0.15, (adamw, logreg)


def test_adamw_seed_fixes_init_and_order():
    x, y = torch.randn(300, 6, generator=torch.Generator().manual_seed(0)), torch.arange(300) % 3
    state = torch.get_rng_state()
    a = fit_adamw(x, y, 3, seed=0).weight
    b = fit_adamw(x, y, 3, seed=0).weight
    c = fit_adamw(x, y, 3, seed=1).weight
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


def test_numpy_and_torch_inputs_agree():
    x, y = _blobs(30, 3, 6, spread=1.5, seed=5)
    x = x.astype(np.float32)
    args_np = _split(x, y, 20)
    args_t = [torch.from_numpy(a) for a in args_np]
    assert linear_probe(*args_np) == linear_probe(*args_t)
    assert linear_probe(*args_np, method="adamw") == linear_probe(*args_t, method="adamw")
    assert knn_probe(*args_np, k=5) == knn_probe(*args_t, k=5)
    assert knn_probe(*args_t, k=5, device="cpu") == knn_probe(*args_np, k=5)


def test_num_classes_from_labels_or_given():
    x, y = _blobs(30, 3, 6, spread=3.0, seed=6)
    args = _split(x, y, 20)
    assert linear_probe(*args, num_classes=7) == pytest.approx(linear_probe(*args), abs=0.05)
    assert knn_probe(*args, k=5, num_classes=7) == knn_probe(*args, k=5)
    with pytest.raises(UserError, match="num_classes"):
        linear_probe(*args, num_classes=2)


@pytest.mark.parametrize("probe", [linear_probe, knn_probe])
def test_bad_inputs_raise_user_error(probe):
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((20, 3)), rng.integers(0, 2, 20)
    with pytest.raises(UserError, match="labels but the features have"):
        probe(x, y[:-1], x, y, k=3) if probe is knn_probe else probe(x, y[:-1], x, y)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(UserError, match="NaN"):
        probe(bad, y, x, y)
    with pytest.raises(UserError, match="fewer than 2 classes"):
        probe(x, np.zeros(20, dtype=np.int64), x, y)
    with pytest.raises(UserError, match="features but test_x has"):
        probe(x, y, x[:, :2], y)
    with pytest.raises(UserError, match="integer"):
        probe(x, y.astype(np.float64), x, y)
    with pytest.raises(UserError, match="shape"):
        probe(x[:, 0], y, x, y)


def test_bad_options_raise_user_error():
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((20, 3)), rng.integers(0, 2, 20)
    with pytest.raises(UserError, match="method"):
        linear_probe(x, y, x, y, method="sgd")
    with pytest.raises(UserError, match="weighting"):
        knn_probe(x, y, x, y, weighting="l1")
    with pytest.raises(UserError, match="k <= number of train samples"):
        knn_probe(x, y, x, y, k=21)


# ----------------------------------------------------------------------------------------------------
# the on-disk cache of results that cannot change (raw input, frozen teacher)


def _prober(tmp_path, **overrides):
    from randteach.models import build_encoder
    from randteach.probes.embedding import Prober
    from tests.tiny import tiny_config
    cfg = tiny_config(tmp_path, probe__max_iter=30, **overrides)
    prober = Prober(cfg, 1, 8, torch.device("cpu"), cache_dir=tmp_path / "probe-cache")
    torch.manual_seed(0)
    return prober, build_encoder("convnet", 1, 8, width=4)


def test_input_probe_is_computed_once_and_read_back(tmp_path):
    from randteach.probes.embedding import score
    prober, _ = _prober(tmp_path)
    first = prober.input()
    assert prober.origin["input"].startswith("computed and saved")
    splits = prober.splits
    direct = score(splits.train.images.flatten(1).float(), splits.train.labels, splits.test.images.flatten(1).float(),
                   splits.test.labels, prober.cfg.probe, prober.num_classes)
    assert first == pytest.approx(direct, abs=0.02)  # digits are floats: standardized either way
    again, _ = _prober(tmp_path)  # a new run
    assert again.input() == first and again.origin["input"].startswith("loaded")
    other, _ = _prober(tmp_path, probe__knn_k=3)  # the probe config is part of the key
    other.input()
    assert other.origin["input"].startswith("computed")
    assert len(list((tmp_path / "probe-cache").glob("*.json"))) == 2


def test_probe_batch_size_sets_the_embedding_batches(tmp_path):
    prober, encoder = _prober(tmp_path, probe__batch_size=7)
    sizes = []
    encoder.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    train_x, test_x = prober.features(encoder)
    assert max(sizes) == 7 and sum(sizes) == len(train_x) + len(test_x)


def test_frozen_encoder_probe_is_keyed_by_its_weights(tmp_path):
    prober, encoder = _prober(tmp_path)
    first = prober.frozen(encoder)
    assert first == prober.probe(encoder)
    assert prober.origin["frozen"].startswith("computed and saved")
    assert prober.frozen(encoder) == first and prober.origin["frozen"].startswith("loaded")
    with torch.no_grad():
        next(encoder.parameters()).mul_(-1.0)  # another teacher: recomputed, not read back
    changed = prober.frozen(encoder)
    assert prober.origin["frozen"].startswith("computed")
    assert changed == prober.probe(encoder)


ENCODER_V1 = """
import torch
from torch import nn

class Enc(nn.Module):
    out_dim = 8

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 8)

    def forward(self, x):
        return self.lin(x.flatten(1)).relu()
"""


def test_cached_results_belong_to_the_code_that_computed_them(tmp_path, monkeypatch):
    # The same encoder (class name, repr, weights) before and after an edit of its forward, in a real module
    # file: the probe cache and the teacher-target cache compute anew instead of serving the old code's result.
    import importlib
    from randteach.train.teacher_cache import cache_key as targets_key
    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "edited_encoder.py"
    module.write_text(ENCODER_V1)
    import edited_encoder
    prober, _ = _prober(tmp_path)
    torch.manual_seed(0)
    encoder = edited_encoder.Enc()
    x = torch.randn(20, 1, 8, 8)
    keys = (prober.cache_key("encoder", encoder), targets_key(encoder, x, None, 4, {}))
    first = prober.frozen(encoder)
    assert prober.frozen(encoder) == first and prober.origin["frozen"].startswith("loaded")
    assert keys == (prober.cache_key("encoder", encoder), targets_key(encoder, x, None, 4, {}))  # stable

    module.write_text(ENCODER_V1.replace(".relu()", ".tanh()"))
    importlib.reload(edited_encoder)
    edited = edited_encoder.Enc()
    edited.load_state_dict(encoder.state_dict())
    assert repr(edited) == repr(encoder)
    assert prober.cache_key("encoder", edited) != keys[0] and targets_key(edited, x, None, 4, {}) != keys[1]
    assert prober.frozen(edited) == prober.probe(edited) and prober.origin["frozen"].startswith("computed")


class _Gained(nn.Module):
    """An encoder whose output scale is a plain attribute, which neither repr nor the state dict shows."""

    def __init__(self, gain=1.0):
        super().__init__()
        self.gain, self.act = gain, torch.tanh
        self.lin = nn.Linear(64, 8)

    def forward(self, x):
        return self.act(self.gain * self.lin(x.flatten(1)))


def test_cached_results_belong_to_the_encoders_plain_attributes(tmp_path):
    # Two encoders with one code, repr and weights and another gain were served one probe result and one set
    # of teacher targets: the second run's teacher scored (and taught) as the first's.
    from randteach.train.teacher_cache import cache_key as targets_key
    prober, _ = _prober(tmp_path)
    torch.manual_seed(0)
    one, many = _Gained(1.0), _Gained(1000.0)
    many.load_state_dict(one.state_dict())
    assert repr(one) == repr(many)
    x = torch.randn(20, 1, 8, 8)
    assert prober.cache_key("encoder", one) != prober.cache_key("encoder", many)
    assert targets_key(one, x, None, 4, {}) != targets_key(many, x, None, 4, {})
    again = _Gained(1.0)
    again.load_state_dict(one.state_dict())  # equal attributes, a function among them: one key
    assert prober.cache_key("encoder", again) == prober.cache_key("encoder", one)
    first = prober.frozen(one)
    assert prober.frozen(many) == prober.probe(many) and prober.origin["frozen"].startswith("computed")
    assert prober.frozen(again) == first and prober.origin["frozen"].startswith("loaded")


class _Settings:  # a plain object without its own repr: every instance printed alike, less its address
    def __init__(self, gain):
        self.gain = gain


def _scaled(gain):
    return lambda x: gain * x


class _Held(nn.Module):
    """The gain held where repr shows nothing of it: in a closure, a plain object, mid-array; and a set."""

    def __init__(self, gain, how):
        super().__init__()
        self.lin, self.kinds = nn.Linear(4, 4), {"conv", "bn", "relu", "pool"}
        if how == "closure":
            self.act = _scaled(gain)
        elif how == "object":
            self.cfg = _Settings(gain)
        else:
            self.table = np.ones(5000)
            self.table[2500] = gain


@pytest.mark.parametrize("how", ["closure", "object", "array"])
def test_cache_keys_see_a_gain_held_in_a_closure_an_object_or_an_array(how):
    from randteach.train.teacher_cache import cache_key as targets_key
    x = torch.randn(8, 4)
    one, many = _Held(1.0, how), _Held(1000.0, how)
    many.load_state_dict(one.state_dict())
    assert targets_key(one, x, None, 4, {}) != targets_key(many, x, None, 4, {})
    again = _Held(1.0, how)
    again.load_state_dict(one.state_dict())
    assert targets_key(again, x, None, 4, {}) == targets_key(one, x, None, 4, {})


def test_cache_keys_are_the_same_in_every_process():
    # a set attribute's order follows PYTHONHASHSEED: its key differed in every process, so nothing was reused
    import os
    import subprocess
    import sys
    from pathlib import Path
    code = (f"import torch, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_probe import _Held; "
            "from randteach.train.teacher_cache import cache_key; torch.manual_seed(0); "
            "print(cache_key(_Held(2.0, 'object'), torch.zeros(2, 4), None, 4, {}))")
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(keys) == 1 and keys != {""}


def test_a_code_digest_follows_the_modules_source_and_the_libraries_versions(tmp_path, monkeypatch):
    # What every cache key folds in (probes, teacher targets, decoded folders): a real module file, edited.
    import hashlib
    import importlib
    from randteach.digests import digest_code

    def digest(modules, libraries=("torch",)):
        h = hashlib.sha256()
        digest_code(h, modules, libraries)
        return h.hexdigest()
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "decoder_v.py").write_text("SCALE = 1\n")
    import decoder_v
    before = digest({"decoder_v"})
    assert digest({"decoder_v"}) == before
    assert digest({"decoder_v"}, ("torch", "pillow")) != before                 # the decoder's library too
    assert digest({"decoder_v"}, ("torch", "no-such-distribution")) != before   # named, version unknown
    (tmp_path / "decoder_v.py").write_text("SCALE = 2\n")
    importlib.reload(decoder_v)
    assert digest({"decoder_v"}) != before


def test_a_corrupt_cache_entry_is_recomputed(tmp_path):
    prober, _ = _prober(tmp_path)
    first = prober.input()
    (entry,) = (tmp_path / "probe-cache").glob("*.json")
    entry.write_text('{"key": "trunc')
    again, _ = _prober(tmp_path)
    assert again.input() == first and again.origin["input"].startswith("computed and saved")
    assert json_load(entry)["result"] == first


def json_load(path):
    import json
    return json.loads(path.read_text())


def test_an_encoder_in_the_float64_start_probes_as_its_fp32_copy(tmp_path):
    # During the float64 start (precision.py) teacher and student are float64; their probes read fp32
    # copies: the same numbers and cache entry as the fp32 teacher, without float64 convolutions.
    import copy
    prober, encoder = _prober(tmp_path)
    first = prober.frozen(encoder)
    wide = copy.deepcopy(encoder).double()
    assert prober.frozen(wide) == first and prober.origin["frozen"].startswith("loaded")
    assert prober.probe(wide) == prober.probe(encoder)
    assert next(wide.parameters()).dtype == torch.float64  # the run's own model is left as it is


def test_narrow_conv_encoders_embed_in_channels_last_on_a_copy(tmp_path):
    # As in training: a convnet embeds in channels-last on a CPU; the caller's module keeps its layout, the
    # features equal the NCHW ones to rounding, a VGG (faster in NCHW) is left as it is.
    from randteach.models import build_encoder
    from randteach.probes.embedding import _cpu_layout, embed
    prober, encoder = _prober(tmp_path)
    cpu = torch.device("cpu")
    conv = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    moved = _cpu_layout(encoder, cpu)
    moved_conv = [m for m in moved.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert moved is not encoder and moved_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert _cpu_layout(moved, cpu) is moved
    vgg = build_encoder("vgg11", 1, 32)
    assert _cpu_layout(vgg, cpu) is vgg
    images = prober.splits.test.images[:64]
    nchw = encoder(prober.preprocess(images) if prober.preprocess else images.float()).detach()
    assert torch.allclose(embed(encoder, images, prober.preprocess, device=cpu, channels=1), nchw, atol=1e-5)
