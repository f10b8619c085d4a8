"""Signal-propagation metrics (escaping paper Fig. 2-3) against direct numpy computations."""
import numpy as np
import pytest
import torch

from randteach.analysis import signal_propagation
from randteach.analysis.signal_propagation import (condition_number, dead_neurons, effective_rank, fisher_metrics,
                                                   fisher_separability, signal_metrics, singular_values)
from randteach.errors import UserError


def _erank_direct(X):
    s = np.linalg.svd(np.asarray(X, dtype=np.float64), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return np.exp(-(p * np.log(p)).sum())


def _fisher_direct(X, labels):
    """Sigma_w, Sigma_b, Sigma_t by their defining sums, 1/n convention."""
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    mu = X.mean(0)
    sw, sb = np.zeros((d, d)), np.zeros((d, d))
    for c in np.unique(labels):
        Xc = X[labels == c]
        mc = Xc.mean(0)
        sw += (Xc - mc).T @ (Xc - mc)
        sb += len(Xc) * np.outer(mc - mu, mc - mu)
    st = (X - mu).T @ (X - mu)
    return sw / n, sb / n, st / n


@pytest.mark.parametrize("shape", [(40, 7), (7, 40), (25, 25)])
def test_effective_rank_matches_direct_svd(shape):
    X = np.random.default_rng(0).standard_normal(shape)
    assert effective_rank(X) == pytest.approx(_erank_direct(X), rel=1e-12)


def test_effective_rank_of_rank_k_matrix_is_at_most_k():
    rng = np.random.default_rng(1)
    for k in (1, 3, 6):
        X = rng.standard_normal((60, k)) @ rng.standard_normal((k, 30))
        for method in ("svd", "gram"):
            er = effective_rank(X, method=method)
            assert 1.0 - 1e-9 <= er <= k + 1e-4, (k, method, er)


def test_effective_rank_with_equal_singular_values_is_the_rank():
    X = np.zeros((10, 8))
    X[np.arange(5), np.arange(5)] = 3.0  # five singular values 3, three 0
    assert effective_rank(X) == pytest.approx(5.0, rel=1e-12)
    Q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((12, 12)))
    assert effective_rank(2.5 * Q[:, :7]) == pytest.approx(7.0, rel=1e-10)  # orthonormal columns
    assert effective_rank(np.zeros((4, 3))) == 0.0


def test_no_centering_inside():
    # a constant nonzero matrix has rank one: centering would make it the zero matrix
    X = np.full((20, 5), 2.0)
    assert effective_rank(X) == pytest.approx(1.0)
    assert condition_number(X) == pytest.approx(1.0)


def test_dead_neurons():
    rng = np.random.default_rng(3)
    X = np.maximum(rng.standard_normal((30, 6)), 0) + 0.1
    assert dead_neurons(X) == 0
    X[:, 2] = 0.0
    assert dead_neurons(X) == 1
    X[:, 4] = 1e-9
    assert dead_neurons(X) == 1
    assert dead_neurons(X, atol=1e-8) == 2
    X[5, 2] = -1e-3  # fires once: alive
    assert dead_neurons(X) == 0


def test_condition_number_by_hand_on_a_diagonal_matrix():
    # s = (10, 5, 2, 0.5, 0.01), sum 17.51; cumulative p: .5711, .8566, .9709, .99943, 1.0
    X = np.diag([5.0, 10.0, 0.01, 2.0, 0.5])
    assert condition_number(X) == pytest.approx(10.0 / 0.5)  # first above 0.999 is the 4th
    assert condition_number(X, threshold=0.9) == pytest.approx(10.0 / 2.0)  # .9709 > .9
    assert condition_number(X, threshold=0.5) == pytest.approx(1.0)  # already the first
    assert condition_number(X, threshold=0.9999) == pytest.approx(10.0 / 0.01)
    assert np.isnan(condition_number(np.zeros((3, 3))))
    with pytest.raises(UserError, match="threshold"):
        condition_number(X, threshold=1.0)


def test_gram_path_equals_svd_path(monkeypatch):
    rng = np.random.default_rng(4)
    for shape in [(50, 12), (12, 50)]:  # X^T X and X X^T
        X = rng.standard_normal(shape) * np.linspace(0.1, 3.0, shape[1])
        s_svd = singular_values(X, method="svd")
        s_gram = singular_values(X, method="gram")
        np.testing.assert_allclose(s_gram, s_svd, rtol=1e-10)
        assert effective_rank(X, method="gram") == pytest.approx(effective_rank(X, method="svd"), rel=1e-10)
        assert condition_number(X, method="gram") == pytest.approx(condition_number(X, method="svd"), rel=1e-9)
    # "auto" switches to the Gram matrix for large X, chunked: shrink both limits to exercise them
    monkeypatch.setattr(signal_propagation, "SVD_MAX_ELEMENTS", 100)
    monkeypatch.setattr(signal_propagation, "_CHUNK_ELEMENTS", 64)
    X = rng.standard_normal((30, 9)).astype(np.float32)
    np.testing.assert_allclose(singular_values(X), np.linalg.svd(X.astype(np.float64), compute_uv=False),
                               rtol=1e-9)
    np.testing.assert_allclose(singular_values(X.T), singular_values(X), rtol=1e-9)


def test_fisher_matches_direct_and_total_is_within_plus_between():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, size=80)
    X = rng.standard_normal((80, 6)) + 2.0 * rng.standard_normal((4, 6))[labels] + 5.0  # offset: centering matters
    sw, sb, st = _fisher_direct(X, labels)
    np.testing.assert_allclose(st, sw + sb, atol=1e-12)
    m = fisher_metrics(X, labels)
    assert m["trace_within"] == pytest.approx(np.trace(sw), rel=1e-12)
    assert m["trace_between"] == pytest.approx(np.trace(sb), rel=1e-12)
    assert m["trace_total"] == pytest.approx(np.trace(st), rel=1e-12)
    assert m["trace_total"] == pytest.approx(m["trace_within"] + m["trace_between"], rel=1e-12)
    assert m["separability"] == pytest.approx(np.trace(np.linalg.pinv(sw) @ sb), rel=1e-10)
    assert fisher_separability(X, labels) == m["separability"]


def test_fisher_sample_space_path_equals_direct(monkeypatch):
    # d > n: Sigma_w is singular; the sample-space path must reproduce pinv with the same cutoff
    rng = np.random.default_rng(6)
    labels = np.repeat(np.arange(3), 5)
    X = rng.standard_normal((15, 40)) + 3.0 * rng.standard_normal((3, 40))[labels]
    sw, sb, _ = _fisher_direct(X, labels)
    expected = np.trace(np.linalg.pinv(sw, hermitian=True) @ sb)
    m = fisher_metrics(X, labels)
    assert m["separability"] == pytest.approx(expected, rel=1e-8)
    assert m["trace_within"] == pytest.approx(np.trace(sw), rel=1e-12)
    monkeypatch.setattr(signal_propagation, "_CHUNK_ELEMENTS", 32)  # several column chunks
    assert fisher_metrics(X, labels)["separability"] == pytest.approx(expected, rel=1e-8)
    # the feature-space path on the transposed problem size agrees with itself chunked, too
    Y = rng.standard_normal((40, 5))
    ly = rng.integers(0, 3, size=40)
    sw, sb, _ = _fisher_direct(Y, ly)
    assert fisher_metrics(Y, ly)["separability"] == pytest.approx(np.trace(np.linalg.pinv(sw) @ sb), rel=1e-9)


def test_fisher_cutoff_is_used():
    # a within-class direction with tiny variance but class-mean spread: kept or dropped by rtol
    rng = np.random.default_rng(7)
    labels = np.repeat([0, 1], 20)
    X = rng.standard_normal((40, 3))
    X[:, 2] = 1e-4 * rng.standard_normal(40) + 1e-2 * labels
    sep_kept = fisher_separability(X, labels, rtol=1e-12)
    sep_dropped = fisher_separability(X, labels, rtol=1e-6)
    assert sep_kept > 100 * sep_dropped
    assert fisher_separability(X, labels) == pytest.approx(sep_kept, rel=1e-9)  # the default: a float64 pinv's


def test_fisher_default_cutoff_keeps_weak_real_directions_of_float32_activations():
    # a ReLU layer with a spectrum over many decades, as float32: the default (float64-level) cutoff gives
    # what exact float64 activations give; a 1e-6 cutoff drops real directions and reads far lower
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 5, size=600)
    W = rng.standard_normal((20, 40)) * np.logspace(0, -4, 40)
    X64 = np.maximum((rng.standard_normal((600, 20)) + 2.0 * rng.standard_normal((5, 20))[labels]) @ W, 0)
    X32 = X64.astype(np.float32)
    exact = fisher_separability(X64, labels)
    assert fisher_separability(X32, labels) == pytest.approx(exact, rel=1e-3)
    assert fisher_separability(X32, labels, rtol=1e-6) < 0.9 * exact


def test_well_separated_classes_beat_shuffled_labels():
    rng = np.random.default_rng(8)
    labels = np.repeat(np.arange(5), 40)
    X = rng.standard_normal((200, 10)) + 6.0 * rng.standard_normal((5, 10))[labels]
    shuffled = rng.permutation(labels)
    assert fisher_separability(X, labels) > 50 * fisher_separability(X, shuffled)


def test_torch_input_and_signal_metrics():
    rng = np.random.default_rng(9)
    X = np.maximum(rng.standard_normal((30, 8)), 0)
    X[:, 0] = 0
    labels = rng.integers(0, 3, size=30)
    out = signal_metrics(torch.from_numpy(X).float(), torch.from_numpy(labels))
    assert out["dead_neurons"] == 1
    assert out["effective_rank"] == pytest.approx(_erank_direct(X), rel=1e-6)
    assert out["condition_number"] == pytest.approx(condition_number(X), rel=1e-6)
    assert out["separability"] == pytest.approx(fisher_separability(X, labels), rel=1e-5)
    assert dead_neurons(torch.from_numpy(X).bfloat16()) == 1


@pytest.mark.parametrize("bad, match", [
    (np.zeros(5), "shape"),
    (np.zeros((0, 3)), "empty"),
    (np.array([[1.0, np.nan]]), "NaN"),
])
def test_bad_inputs_raise_user_error(bad, match):
    with pytest.raises(UserError, match=match):
        effective_rank(bad)


def test_bad_labels_raise_user_error():
    X = np.ones((4, 2))
    with pytest.raises(UserError, match="one per row"):
        fisher_metrics(X, np.array([0, 1, 0]))
    with pytest.raises(UserError, match="integer"):
        fisher_metrics(X, np.array([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(UserError, match="method"):
        singular_values(X, method="qr")


def _rankme_direct(X, eps=1e-7):
    Xc = X - X.mean(0)
    s = np.linalg.svd(Xc, compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def test_rankme_convention_matches_direct_computation():
    from randteach.analysis.signal_propagation import RANKME
    rng = np.random.default_rng(3)
    X = 100.0 + rng.normal(size=(40, 6)) @ rng.normal(size=(6, 30))  # rank 6 plus a large common offset
    assert effective_rank(X, **RANKME) == pytest.approx(_rankme_direct(X), rel=1e-10)
    # centering removes the offset direction that dominates the uncentered spectrum
    assert effective_rank(X) < 2.0 < effective_rank(X, center=True)
    # eps puts mass on the 24 zero singular values: the entropy grows by about 24 * eps * log(1/eps)
    diff = np.log(effective_rank(X, center=True, eps=1e-7)) - np.log(effective_rank(X, center=True))
    assert diff == pytest.approx(24 * 1e-7 * np.log(1e7), rel=0.2)


def test_signal_metrics_passes_rank_eps():
    X = np.diag([3.0, 1.0, 0.0, 0.0])
    assert signal_metrics(X, rank_eps=1e-3)["effective_rank"] == pytest.approx(effective_rank(X, eps=1e-3))
    assert signal_metrics(X, rank_eps=1e-3)["effective_rank"] > signal_metrics(X)["effective_rank"]
