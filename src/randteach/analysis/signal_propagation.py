"""Signal-propagation metrics of a layer's representation (escaping paper, Sec. 3, Fig. 2-3).

Every function takes X of shape (n_samples, n_features): one row per sample, one column per neuron (the
transpose of the paper's X^(l) in R^{d_l x n}; singular values are the same). The spectral metrics and
dead neurons use X exactly as given (no centering); the Fisher metrics are covariances and so center by
definition. Computation is in float64 numpy; torch tensors (any device) and numpy arrays are accepted.

Wide layers: singular values come from the Gram matrix of the smaller side (X X^T or X^T X), built from
float64 chunks of X, so memory is min(n, d)^2 plus one chunk, never a float64 copy of X. The Fisher
separability likewise works in sample space when d > n (exact, not a projection).
"""
from __future__ import annotations

import numpy as np
import torch

from randteach.errors import UserError

CONDITION_THRESHOLD = 0.999  # cumulative singular-value mass that defines sigma'_min (escaping paper)
SVD_MAX_ELEMENTS = 1 << 22  # "auto": direct SVD up to 4M entries (32 MiB in float64), else the Gram path
_CHUNK_ELEMENTS = 1 << 23  # entries of X converted to float64 at a time (64 MiB)


def _matrix(X, name: str = "X") -> np.ndarray:
    if hasattr(X, "detach"):  # torch tensor; numpy has no bfloat16
        X = X.detach().cpu()
        X = (X.float() if X.dtype == torch.bfloat16 else X).numpy()
    X = np.asarray(X)
    if X.ndim != 2:
        raise UserError(f"{name} must have shape (n_samples, n_features), got shape {X.shape}; "
                        "flatten each sample's activations first.")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise UserError(f"{name} is empty (shape {X.shape}); pass at least one sample and one feature.")
    if not np.issubdtype(X.dtype, np.number) or np.iscomplexobj(X):
        raise UserError(f"{name} must hold real numbers, got dtype {X.dtype}.")
    if not np.isfinite(X).all():
        raise UserError(f"{name} contains NaN or infinite values (a diverged network?); "
                        "the metrics are defined for finite activations only.")
    return X


def _labels(labels, n: int) -> np.ndarray:
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise UserError(f"labels must have shape ({n},), one per row of X, got shape {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    return labels


def _row_chunks(n: int, d: int):
    step = max(1, _CHUNK_ELEMENTS // d)
    return (slice(i, min(i + step, n)) for i in range(0, n, step))


def _col_chunks(n: int, d: int):
    step = max(1, _CHUNK_ELEMENTS // n)
    return (slice(j, min(j + step, d)) for j in range(0, d, step))


def gram(X) -> np.ndarray:
    """The smaller Gram matrix in float64: X^T X (d x d) when d <= n, else X X^T (n x n)."""
    X = _matrix(X)
    n, d = X.shape
    if d <= n:
        G = np.zeros((d, d))
        for rows in _row_chunks(n, d):
            block = X[rows].astype(np.float64)
            G += block.T @ block
    else:
        G = np.zeros((n, n))
        for cols in _col_chunks(n, d):
            block = X[:, cols].astype(np.float64)
            G += block @ block.T
    return G


def singular_values(X, method: str = "auto") -> np.ndarray:
    """Singular values of X, descending, min(n, d) of them.

    method="svd": LAPACK on a float64 copy of X. method="gram": sqrt of the eigenvalues of `gram(X)`,
    negatives (rounding) clamped to 0; values below about 1e-8 * s_max are rounding noise on this path.
    method="auto": "svd" when X has at most SVD_MAX_ELEMENTS entries, else "gram".
    """
    X = _matrix(X)
    if method == "auto":
        method = "svd" if X.size <= SVD_MAX_ELEMENTS else "gram"
    if method == "svd":
        return np.linalg.svd(X.astype(np.float64), compute_uv=False)
    if method == "gram":
        return np.sqrt(np.clip(np.linalg.eigvalsh(gram(X)), 0.0, None))[::-1].copy()
    raise UserError(f"unknown singular-value method {method!r}; expected 'auto', 'svd' or 'gram'.")


# ----------------------------------------------------------------------------------------------------
# formulas on a spectrum (written once; the X-level functions and `signal_metrics` share them)


def _effective_rank(s: np.ndarray, eps: float = 0.0) -> float:
    # escaping paper (after Roy & Vetterli 2007): erank = exp(H(p)), p_k = s_k / sum_j s_j,
    # H = -sum p log p with 0 log 0 = 0. RankMe (Garrido et al. 2023, Eq. 1) adds eps to every p_k.
    total = s.sum()
    if total == 0:
        return 0.0  # the zero matrix has rank 0
    p = s / total + eps
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def _condition_number(s: np.ndarray, threshold: float) -> float:
    # escaping paper: s_max / s'_min, s'_min = s_k, k the first index with sum_{j<=k} p_j > threshold
    if not 0 < threshold < 1:
        raise UserError(f"condition-number threshold must be in (0, 1), got {threshold}.")
    total = s.sum()
    if total == 0:
        return float("nan")  # 0 / 0: no direction carries signal
    above = np.flatnonzero(np.cumsum(s / total) > threshold)
    k = above[0] if above.size else np.flatnonzero(s > 0)[-1]  # rounding kept the sum below threshold
    return float(s[0] / s[k])


RANKME = {"center": True, "eps": 1e-7}  # the RankMe convention (Garrido et al. 2023; reptrix)


def effective_rank(X, center: bool = False, eps: float = 0.0, *, method: str = "auto") -> float:
    """exp(H(p)) with p_k = s_k / sum_j s_j + eps over the singular values s of X and
    H(p) = -sum_k p_k log p_k (0 log 0 = 0).

    Defaults: the escaping paper's convention (Roy & Vetterli 2007): X uncentered, eps = 0; between 1 and
    rank(X), equal singular values give exactly the rank, the zero matrix gives 0. RankMe's convention
    (Garrido et al. 2023, "RankMe: assessing the downstream performance of pretrained self-supervised
    representations by their rank"): `effective_rank(X, **RANKME)`, i.e. each column centered over the
    samples and eps = 1e-7 added to every p_k (which adds about eps * min(n, d) * log(1/eps) to H)."""
    X = _matrix(X)
    if center:
        X = X - X.mean(axis=0, keepdims=True)
    return _effective_rank(singular_values(X, method), eps)


def condition_number(X, threshold: float = CONDITION_THRESHOLD, *, method: str = "auto") -> float:
    """s_max / s_k over the descending singular values s of X (uncentered), with k the first index at
    which the cumulative mass sum_{j<=k} s_j / sum_j s_j exceeds `threshold` (0.999, escaping paper): the
    condition number of the part of X that carries all but 0.1 % of the spectrum. 1 for rank one; NaN for
    the zero matrix."""
    return _condition_number(singular_values(X, method), threshold)


def dead_neurons(X, atol: float = 0.0) -> int:
    """Number of feature columns with |x| <= atol for every sample (post-activation: units that never fire)."""
    X = _matrix(X)
    return int((np.abs(X) <= atol).all(axis=0).sum())


def fisher_metrics(X, labels, *, rtol: float | None = None) -> dict[str, float]:
    """Fisher discriminant metrics of X (n, d) with integer class labels (n,).

    Convention (population, 1/n, centered on the class means mu_c and the overall mean mu):
        Sigma_w = (1/n) sum_c sum_{i in c} (x_i - mu_c)(x_i - mu_c)^T
        Sigma_b = (1/n) sum_c n_c (mu_c - mu)(mu_c - mu)^T
        Sigma_t = (1/n) sum_i (x_i - mu)(x_i - mu)^T = Sigma_w + Sigma_b   (exactly)
    Returns the traces "trace_within", "trace_between", "trace_total" and
    "separability" = tr(pinv(Sigma_w) Sigma_b), the escaping paper's Moore-Penrose pseudo-inverse (Sec. 3):
    eigenvalues of Sigma_w at or below rtol * the largest count as 0, with rtol by default that of a float64
    pinv (torch.linalg.pinv's: the matrix size times float64's epsilon). The covariance is accumulated in
    float64 from the activations as given, so only its exact null space (dead or class-constant features,
    the class-centering rank loss) is dropped; a larger cutoff would also drop the weak but real directions
    of a badly conditioned layer (the teacher's, the collapse's) and bias their separability low. Sigma_w = 0
    gives separability 0. With Sigma_w = V diag(lambda) V^T the separability is sum_k v_k^T Sigma_b v_k / lambda_k
    over the kept k; when d > n the v_k come from the n x n Gram matrix of the class-centered rows
    (same result, n^2 memory instead of d^2).
    """
    X = _matrix(X)
    n, d = X.shape
    labels = _labels(labels, n)
    classes, y, counts = np.unique(labels, return_inverse=True, return_counts=True)
    sums = np.zeros((classes.size, d))
    for rows in _row_chunks(n, d):
        onehot = (y[rows] == np.arange(classes.size)[:, None]).astype(np.float64)  # (classes, chunk)
        sums += onehot @ X[rows].astype(np.float64)
    class_means = sums / counts[:, None]
    mean = sums.sum(0) / n
    trace_total = sum(np.square(X[rows].astype(np.float64) - mean).sum() for rows in _row_chunks(n, d)) / n
    B = np.sqrt(counts)[:, None] * (class_means - mean)  # Sigma_b = B^T B / n, B is (classes, d)

    def centered(rows, cols):  # rows of X minus their class mean, float64
        return X[rows, cols].astype(np.float64) - class_means[y[rows], cols]

    if d <= n:  # feature space: A^T A = n Sigma_w, (d, d)
        AtA = np.zeros((d, d))
        for rows in _row_chunks(n, d):
            block = centered(rows, slice(None))
            AtA += block.T @ block
        trace_within = np.trace(AtA) / n
        lam, V = np.linalg.eigh(AtA)  # eigenvalues of n Sigma_w
        proj = np.square(B @ V).sum(0)  # ||B v_k||^2 = n v_k^T Sigma_b v_k
    else:  # sample space: A A^T (n, n) shares A^T A's nonzero eigenvalues; v_k = A^T u_k / sqrt(lam_k)
        AAt = np.zeros((n, n))
        BAt = np.zeros((classes.size, n))
        for cols in _col_chunks(n, d):
            block = centered(slice(None), cols)
            AAt += block @ block.T
            BAt += B[:, cols] @ block.T
        trace_within = np.trace(AAt) / n
        lam, U = np.linalg.eigh(AAt)
        with np.errstate(divide="ignore", invalid="ignore"):
            proj = np.square(BAt @ U).sum(0) / lam  # ||B v_k||^2, finite wherever lam is kept below
    rtol = lam.size * np.finfo(np.float64).eps if rtol is None else rtol
    keep = lam > rtol * lam.max() if lam.max() > 0 else np.zeros(lam.shape, bool)
    separability = float((proj[keep] / lam[keep]).sum())  # (||B v_k||^2 / n) / (lam_k / n)
    return {"trace_within": float(trace_within), "trace_between": float(np.square(B).sum() / n),
            "trace_total": float(trace_total), "separability": separability}


def fisher_separability(X, labels, *, rtol: float | None = None) -> float:
    """tr(pinv(Sigma_w) Sigma_b); see `fisher_metrics` for the convention and the cutoff."""
    return fisher_metrics(X, labels, rtol=rtol)["separability"]


def signal_metrics(X, labels=None, *, threshold: float = CONDITION_THRESHOLD, atol: float = 0.0,
                   method: str = "auto", rank_eps: float = 0.0) -> dict[str, float]:
    """All metrics of one layer (escaping paper, Fig. 2-3) from a single spectrum: "effective_rank" (with `rank_eps` added to
    each p_k, see `effective_rank`), "condition_number", "dead_neurons", and with labels the
    `fisher_metrics` entries."""
    X = _matrix(X)
    s = singular_values(X, method)
    out = {"effective_rank": _effective_rank(s, rank_eps), "condition_number": _condition_number(s, threshold),
           "dead_neurons": dead_neurons(X, atol)}
    if labels is not None:
        out.update(fisher_metrics(X, labels))
    return out
