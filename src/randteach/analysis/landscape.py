"""Loss and probing landscapes on a plane through three parameter vectors (random-teacher paper Sec. 5,
Fig. 5 and App. C.3, Fig. 13-16).

Anchors: theta_0 (origin, the teacher theta_T), theta_1, theta_2 from run directories or checkpoints.
Views (named presets):
- non-local: theta_T, theta_S(1), theta*_S(1): teacher, student init and final student of ONE run
             distilled with init.alpha = 1 (or init.mode = independent);
- shared:    theta_T, theta*_S(0), theta*_S(1): the final students of a run with alpha ~ 0 and of a run
             with alpha = 1 that share the teacher (same train.seed or init.teacher_seed).
Parameterizations (`randteach.analysis.params.Plane`): affine theta_0 + l1 v1 + l2 v2 (grid extent in
units of l), or orthogonal theta_0 + x e1 + y e2 (Gram-Schmidt; coordinates are distances, the extent
is in units of max(|v1|, |v2|), or with unit="first" of |v1|). The zoom on the teacher (Fig. 14/16) is the
orthogonal projection with unit="first": an extent such as (-0.5, 1.5) then frames theta_T and anchor 1 (the
alpha ~ 0 student of the shared view), whatever the distance to anchor 2.
Grid coordinates within 1e-9 of the extent's span of an anchor coordinate are snapped onto it, so
the anchors on the grid are evaluated at exactly their own parameters.

At every grid point theta (networks in fp32 and in eval mode; losses in float64 from their fp32 outputs):
- loss:      the run's teacher-student loss (temperatures, no centering) between the teacher checkpoint
             and theta, mean over `n_loss` distillation inputs (a stratified subset); for ce and kl runs
             the KL divergence, which the paper's Fig. 5 and 13-14 colour on a log scale from 1e-7 to 1e-3:
             a cross-entropy carries the teacher's entropy (ln m for the paper's head) and fp32 rounding of
             it (1e-6 at ln 2^16) would hide the valley around the teacher;
- embed_kl:  KL(softmax(g_T(x)) || softmax(g_theta(x))) of the encoder embeddings (Fig. 15/16);
- probe_*:   the project's probe (`randteach.probes.embedding.Prober`, the run's probe config) of theta's encoder;
- norm:      ||theta||_2 over all parameters (encoder and head).
Batch-norm buffers are interpolated like the parameters, with the affine coordinates of the point:
b = b_0 + l1 (b_1 - b_0) + l2 (b_2 - b_0) (running variances clamped at 0; integer counters from the
origin), so each anchor is evaluated with exactly its own running statistics.

Output in OUT: points.jsonl (one line per finished point, fsynced: a killed run resumes after the last
complete line), landscape.json (the settings, checked on resume), landscape.npz (axes, every metric as
a (len(y), len(x)) grid with NaN where not computed, affine coordinates of every point, anchor
coordinates, labels, norms and pairwise distances) and one contour PNG per metric with ||theta||_2
contours and the anchors marked.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import ImageData, stratified_subset
from ..errors import UserError
from ..files import written_whole
from ..losses import distill_loss
from ..models import build_model
from ..probes.embedding import Prober
from ..runs.checkpoint import load_state_dict, resolve_model_checkpoint
from ..runs.rundir import changed_settings, write_json
from ..train.setup import load_training_inputs
from ..train.supervised import RUN_ROLES, RunInfo, run_info
from ..precision import exact_fp32
from .params import AtPoint, ParamSpace, Plane, distances, interpolate_buffers, prefixed

VIEWS = ("non-local", "shared")
PROJECTIONS = ("affine", "orthogonal")
UNITS = ("longer", "first")  # the orthogonal extent's unit: max(|v1|, |v2|) or |v1|
# Each projection's extent when none is given. Affine: RT Sec. 5 takes (l1, l2) in [0, 1]^2 (Fig. 5's axes
# run 0 to 1; the three anchors are three of the square's corners). Orthogonal: the paper draws App. C.3's
# projections in absolute distances without saying where they end, so both anchors are framed with half a
# length of margin.
DEFAULT_EXTENTS = {"affine": (0.0, 1.0), "orthogonal": (-0.5, 1.5)}
_SNAP = 1e-9
_EVAL_BATCH = 512


@dataclass
class Anchor:
    label: str
    state: dict          # a model state dict (parameters and buffers)
    source: str          # where it came from


def split_spec(spec: str | Path) -> tuple[Path, str | None]:
    """'RUN_DIR:ROLE' -> (RUN_DIR, ROLE); anything else -> (path, None)."""
    head, sep, tail = str(spec).rpartition(":")
    return (Path(head), tail) if sep and tail in RUN_ROLES else (Path(spec), None)


def resolve_anchor(spec: str | Path, default_role: str = "student", label: str | None = None) -> Anchor:
    """'RUN_DIR' (its `default_role` checkpoint), 'RUN_DIR:ROLE' or a checkpoint file."""
    path, role = split_spec(spec)
    role = role or default_role
    file = resolve_model_checkpoint(path, role)
    return Anchor(label or f"{path.name}:{role}", load_state_dict(file, role), str(file))


def run_of(spec: str | Path) -> Path | None:
    """The run directory an anchor comes from: RUN_DIR itself, or RUN for RUN/checkpoints/x.pt."""
    path, _ = split_spec(spec)
    for cand in (path, path.parent.parent):
        if (cand / "config.yaml").is_file():
            return cand
    return None


def _alpha_label(run: RunInfo) -> str:
    """The alpha of a run's student init, as the paper labels it: 1 (independent), 0 (~1e-10), else its value."""
    init = run.cfg.init
    if init.mode == "independent" or (init.mode == "locality" and init.alpha == 1.0):
        return "1"
    if init.mode == "locality" and init.alpha >= 1e-3:
        return f"{init.alpha:g}"
    return "0"


def view_anchors(view: str, runs: list[str | Path]) -> list[Anchor]:
    """The three anchors of a named view (see the module docstring)."""
    if view == "non-local":
        if len(runs) != 1:
            raise UserError("the non-local view takes one run directory: a run distilled with init.alpha=1")
        info = run_info(runs[0])
        a = _alpha_label(info)
        return [resolve_anchor(f"{runs[0]}:teacher", label="θ_T"),
                resolve_anchor(f"{runs[0]}:student_init", label=f"θ_S({a})"),
                resolve_anchor(f"{runs[0]}:student", label=f"θ*_S({a})")]
    if view == "shared":
        if len(runs) != 2:
            raise UserError("the shared view takes two run directories: a run distilled with init.alpha~0 "
                            "(e.g. 1e-10) and one with init.alpha=1, sharing their teacher")
        a0, a1 = (_alpha_label(run_info(r)) for r in runs)
        teacher = resolve_anchor(f"{runs[0]}:teacher", label="θ_T")
        other = load_state_dict(runs[1], "teacher")
        if any(not torch.equal(teacher.state[k], other[k]) for k in teacher.state):
            raise UserError(f"{runs[0]} and {runs[1]} have different teachers; distill both with the same "
                            "train.seed (or init.teacher_seed) so that they share theta_T")
        return [teacher, resolve_anchor(f"{runs[0]}:student", label=f"θ*_S({a0})"),
                resolve_anchor(f"{runs[1]}:student", label=f"θ*_S({a1})")]
    raise UserError(f"unknown view {view!r}; valid views: {', '.join(VIEWS)}")


def grid_axis(lo: float, hi: float, n: int, snaps: list[float]) -> np.ndarray:
    """n evenly spaced coordinates from lo to hi; any within 1e-9 * (hi - lo) of a snap value become it."""
    if n < 2 or not hi > lo:
        raise UserError(f"a grid needs at least 2 points and extent lo < hi, got {n} points on [{lo}, {hi}]")
    axis = lo + (hi - lo) * np.arange(n) / (n - 1)
    for s in snaps:
        axis[np.abs(axis - s) <= _SNAP * (hi - lo)] = s
    return axis


def loss_inputs(cfg, n_loss: int, data: ImageData | None = None) -> torch.Tensor:
    """The float inputs on which the landscape's losses are measured: a stratified subset of `n_loss`
    distillation inputs (images preprocessed as in training, or the run's noise inputs); `data`
    replaces the configured data set."""
    inputs, preprocess, data, _ = load_training_inputs(cfg, data)
    if n_loss < len(inputs):
        inputs = inputs[stratified_subset(data.labels, n_loss, seed=cfg.data.subset_seed)]
    return preprocess(inputs) if preprocess is not None else inputs.float()


def _digest(vec: torch.Tensor) -> str:
    return hashlib.sha256(vec.to(torch.float64).numpy().tobytes()).hexdigest()[:16]


class _Points:
    """points.jsonl: the finished points, one JSON object per line, appended and fsynced."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[tuple[int, int], dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.done[(rec["i"], rec["j"])] = rec
                except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a kill
                    continue
            # rewrite without a cut line, so new lines do not append to a fragment
            with written_whole(path) as f:
                f.writelines(json.dumps(r) + "\n" for r in self.done.values())

    def add(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[(rec["i"], rec["j"])] = rec


@torch.inference_mode()
def _outputs(template, tensors: dict, x: torch.Tensor) -> tuple[list, list]:
    """(encoder embeddings, head outputs) per batch of x, at the parameters/buffers in `tensors`."""
    enc = AtPoint(template.encoder, prefixed(tensors, "encoder."))
    head = AtPoint(template.head, prefixed(tensors, "head."))
    embs, outs = [], []
    for i in range(0, len(x), _EVAL_BATCH):
        e = enc(x[i:i + _EVAL_BATCH])
        embs.append(e)
        outs.append(head(e))
    return embs, outs


def landscape_loss(cfg) -> str:
    """The loss the landscape maps: the run's, with ce mapped as kl (the same up to the teacher's entropy)."""
    return "kl" if cfg.loss.name == "ce" else cfg.loss.name


def _mean_loss(name: str, student: list, teacher: list, t_temp: float, s_temp: float) -> float:
    """The mean over all samples (batch-size-weighted mean of the per-batch means), in float64."""
    n = sum(len(s) for s in student)
    return float(sum(float(distill_loss(name, s.double(), t.double(), t_temp, s_temp)) * len(s)
                     for s, t in zip(student, teacher)) / n)


@dataclass
class _Grid:
    """The plane through the anchors and the grid of points evaluated on it."""
    space: ParamSpace
    vecs: list[torch.Tensor]      # the anchors' flat parameter vectors, origin first
    buffers: list[dict]           # the anchors' buffers (interpolated, not projected)
    plane: Plane
    projection: str
    anchor_xy: list
    xs: np.ndarray                # grid coordinates, x axis (nx)
    ys: np.ndarray                # grid coordinates, y axis (ny)

    def point(self, i: int, j: int) -> tuple[float, float, float, float, torch.Tensor]:
        """(x, y, λ1, λ2, θ) of grid point (row i, column j)."""
        cx, cy = float(self.xs[j]), float(self.ys[i])
        if self.projection == "affine":
            return cx, cy, cx, cy, self.plane.affine_point(cx, cy)
        l1, l2 = self.plane.to_affine(cx, cy)
        return cx, cy, l1, l2, self.plane.orthogonal_point(cx, cy)


def _checked_shape(anchors: list[Anchor], projection: str, extent, grid,
                   unit: str = "longer") -> tuple[tuple[float, ...], int, int]:
    """(x_lo, x_hi, y_lo, y_hi), nx, ny of the arguments, or a UserError saying what is wrong."""
    if len(anchors) != 3:
        raise UserError(f"a plane needs three anchors (origin, anchor 1, anchor 2), got {len(anchors)}")
    if projection not in PROJECTIONS:
        raise UserError(f"unknown projection {projection!r}; valid: {', '.join(PROJECTIONS)}")
    if unit not in UNITS:
        raise UserError(f"unknown extent unit {unit!r}; valid: {', '.join(UNITS)}")
    extent = tuple(float(e) for e in (DEFAULT_EXTENTS[projection] if extent is None else extent))
    if len(extent) == 2:
        extent = extent * 2
    if len(extent) != 4:
        raise UserError(f"extent takes 2 numbers (lo hi) or 4 (x_lo x_hi y_lo y_hi), got {len(extent)}")
    if not (extent[0] < extent[1] and extent[2] < extent[3]):  # here, before the output folder is made
        raise UserError(f"extent {' '.join(f'{e:g}' for e in extent)}: each axis needs lo < hi")
    nx, ny = (grid, grid) if isinstance(grid, int) else grid
    return extent, nx, ny


def _grid_through(template: nn.Module, anchors: list[Anchor], projection: str, extent: tuple[float, ...],
                  nx: int, ny: int, unit: str) -> _Grid:
    space = ParamSpace(template)
    vecs = []
    for a in anchors:
        try:
            vecs.append(space.flatten(a.state))
        except KeyError as e:  # a checkpoint of another architecture than the run's
            raise UserError(f"anchor {a.label} ({a.source}): {e.args[0]}; give checkpoints of the run's architecture") from None
    try:
        plane = Plane.through(*vecs)
    except ValueError as e:
        raise UserError(f"anchors {', '.join(a.label for a in anchors)}: {e}") from None
    anchor_xy = plane.anchor_coordinates(projection)
    length = 1.0 if projection == "affine" else plane.scale if unit == "longer" else plane.norm_v1
    xs = grid_axis(extent[0] * length, extent[1] * length, nx, [c[0] for c in anchor_xy])
    ys = grid_axis(extent[2] * length, extent[3] * length, ny, [c[1] for c in anchor_xy])
    return _Grid(space, vecs, [space.buffers(a.state) for a in anchors], plane, projection, anchor_xy, xs, ys)


def _claim_folder(out: Path, spec: dict, cfg) -> None:
    """Write OUT/landscape.json, or refuse if OUT holds a landscape with other settings (a resume must
    continue the same grid). The config digest compares as a run's does (`Config.matches`)."""
    spec_path = out / "landscape.json"
    saved = json.loads(spec_path.read_text()) if spec_path.exists() else None
    unrecorded = lambda d: {k: v for k, v in json.loads(json.dumps(d)).items() if k != "config_digest"}
    if saved is not None and (unrecorded(saved) != unrecorded(spec) or not cfg.matches(saved.get("config_digest"))):
        changes = changed_settings(unrecorded(saved), unrecorded(spec)) or "the --section.key options"
        if "extent" in changes:
            changes += "; the affine default extent was (-0.5, 1.5) before 2026-12-02"
        raise UserError(f"{out} holds a landscape made with other settings ({changes}); give those to continue "
                        "it, choose another --out, or delete that folder to start over")
    write_json(spec_path, spec)


def _evaluate(g: _Grid, todo: list[tuple[int, int]], points: "_Points", template: nn.Module, cfg, x: torch.Tensor,
              teacher_state: dict, prober: Prober | None, device: torch.device, desc: str, progress: bool) -> None:
    """Loss against the teacher, embedding KL, ||θ|| and (with `prober`) probes at each point of `todo`."""
    t_emb, t_out = _outputs(template, {k: v.to(device) for k, v in teacher_state.items()}, x)
    for i, j in tqdm(todo, disable=not progress, desc=desc, unit="point", dynamic_ncols=True):
        cx, cy, l1, l2, theta = g.point(i, j)
        tensors = {**g.space.unflatten(theta), **interpolate_buffers(*g.buffers, l1, l2)}
        tensors = {k: v.to(device) for k, v in tensors.items()}
        emb, outs = _outputs(template, tensors, x)
        rec = {"i": i, "j": j, "x": cx, "y": cy, "l1": l1, "l2": l2,
               "loss": _mean_loss(landscape_loss(cfg), outs, t_out, cfg.loss.teacher_temp, cfg.loss.student_temp),
               "embed_kl": _mean_loss("kl", emb, t_emb, 1.0, 1.0),
               "norm": float(theta.to(torch.float32).double().norm())}
        if prober is not None:
            enc = AtPoint(template.encoder, prefixed(tensors, "encoder."))
            rec.update({f"probe_{k}": v for k, v in prober.probe(enc).items()})
        points.add(rec)


def _arrays(g: _Grid, anchors: list[Anchor], done: dict, metrics: list[str]) -> dict:
    """The npz contents: axes, anchors, (λ1, λ2) of every grid point and one (ny, nx) grid per metric
    (NaN where a point is not evaluated yet)."""
    ny, nx = len(g.ys), len(g.xs)
    result = {"x": g.xs, "y": g.ys, "projection": np.array(g.projection), "scale": np.array(g.plane.scale),
              "anchors": np.array(g.anchor_xy), "anchor_labels": np.array([a.label for a in anchors]),
              "anchor_norms": np.array([float(v.norm()) for v in g.vecs]),
              "anchor_distances": np.array(distances(*g.vecs))}
    l1 = np.full((ny, nx), np.nan)
    l2 = np.full((ny, nx), np.nan)
    for i in range(ny):
        for j in range(nx):
            l1[i, j], l2[i, j] = ((g.xs[j], g.ys[i]) if g.projection == "affine"
                                  else g.plane.to_affine(g.xs[j], g.ys[i]))
    result.update(l1=l1, l2=l2)
    for m in metrics:
        grid = np.full((ny, nx), np.nan)
        for (i, j), r in done.items():
            if m in r:
                grid[i, j] = r[m]
        result[m] = grid
    return result


@exact_fp32()  # fp32 that is fp32 on a GPU (no TF32), as in the training loop
def compute_landscape(anchors: list[Anchor], run: RunInfo, out: str | Path, *, teacher: dict | None = None,
                      grid: int | tuple[int, int] = 21, extent=None, projection: str = "affine",
                      unit: str = "longer", n_loss: int = 512, probe: bool = True, limit: int | None = None,
                      device: torch.device | str = "cpu", progress: bool = False, template: nn.Module | None = None,
                      data: ImageData | None = None, probe_splits: tuple[ImageData, ImageData] | None = None) -> dict:
    """Evaluate the landscape on the plane through `anchors` (origin first) and write OUT (see the module
    docstring). `run` gives the architecture, loss, data and probe config; `teacher` (default: the
    origin's state) is the teacher of the loss. `extent`: (lo, hi) for both axes or (x_lo, x_hi, y_lo, y_hi);
    orthogonal extents in units of max(|v1|, |v2|) (`unit` "longer") or |v1| ("first"); None: the
    projection's `DEFAULT_EXTENTS` (affine: the paper's [0, 1]^2).
    `limit`: evaluate at most this many new points and return (the rest on a later call).
    Python API: `template` (a model with .encoder and .head whose state dicts are the anchors') replaces
    the run's architecture, `data` its distillation data, `probe_splits` (train, test) its probe data.
    Returns the npz contents plus "complete", "done" and "total" (points) and "metrics" (names)."""
    extent, nx, ny = _checked_shape(anchors, projection, extent, grid, unit)
    device = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = run.cfg
    if template is None:
        template = build_model(cfg, run.in_channels, run.image_size, seed=0)
    template = template.to(device).eval()
    g = _grid_through(template, anchors, projection, extent, nx, ny, unit)

    spec = {"anchors": [{"label": a.label, "source": a.source, "digest": _digest(v)} for a, v in zip(anchors, g.vecs)],
            "projection": projection, "unit": unit, "grid": [nx, ny], "extent": list(extent), "n_loss": n_loss,
            "probe": probe,
            "loss": landscape_loss(cfg), "loss_dtype": "float64", "config_digest": cfg.digest(),
            "teacher": _digest(g.space.flatten(teacher)) if teacher is not None else "origin"}
    if data is not None or probe_splits is not None:  # Python-API data: its bytes decide a resume
        spec["data"] = [d.digest() for d in (data, *(probe_splits or ())) if d is not None]
    _claim_folder(out, spec, cfg)
    points = _Points(out / "points.jsonl")

    todo = [(i, j) for i in range(ny) for j in range(nx) if (i, j) not in points.done]
    if limit is not None:
        todo = todo[:limit]
    if todo:
        x = loss_inputs(cfg, n_loss, data).to(device)
        if len(x) < n_loss:  # landscape.json keeps the number asked for: it names the landscape
            print(f"note: n_loss {n_loss}: the run's data has {len(x)} inputs; the losses are means over all of "
                  "them", file=sys.stderr)
        prober = Prober(cfg, run.in_channels, run.image_size, device, splits=probe_splits) if probe else None
        _evaluate(g, todo, points, template, cfg, x, teacher if teacher is not None else anchors[0].state, prober,
                  device, f"landscape {out.name}", progress)

    metrics = sorted({k for r in points.done.values() for k in r} - {"i", "j", "x", "y", "l1", "l2"})
    result = _arrays(g, anchors, points.done, metrics)
    complete = len(points.done) == nx * ny
    if complete:
        _save_npz(out / "landscape.npz", result)
        plot_landscape(result, out)
    return {**result, "complete": complete, "metrics": metrics, "done": len(points.done), "total": nx * ny}


def _save_npz(path: Path, arrays: dict) -> None:
    with written_whole(path, "wb") as f:
        np.savez(f, **arrays)


TITLES = {"loss": "teacher-student loss", "embed_kl": "encoder-embedding KL",
          "probe_linear": "linear probe accuracy", "probe_knn": "k-NN probe accuracy", "norm": "‖θ‖₂"}


def _math(label: str) -> str:
    """'θ*_S(1)' -> matplotlib mathtext; other labels as they are."""
    if not label.startswith("θ"):
        return label
    return "$" + label.replace("θ*", r"\theta^*").replace("θ", r"\theta") + "$"


def log_floor(z: np.ndarray) -> float:
    """Where a loss map's log colour scale starts (Fig. 5's runs from 1e-7): a tenth of its second-smallest
    positive value. The smallest is the teacher's own point, 0 up to the rounding of fp32 outputs (~1e-16),
    which would otherwise take most of the scale."""
    pos = np.sort(z[np.isfinite(z) & (z > 0)])
    return float(pos[1] / 10) if pos.size > 1 else float(pos[0]) if pos.size else 1e-300


def plot_landscape(result: dict, out: Path, metrics: list[str] | None = None) -> list[Path]:
    """One contour plot per metric (losses on a log colour scale), ‖θ‖₂ contour lines, anchors marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = result["x"], result["y"]
    X, Y = np.meshgrid(xs, ys)
    ortho = str(result["projection"]) == "orthogonal"
    paths = []
    for m in metrics or [k for k in TITLES if k in result and k != "norm"]:
        z = np.asarray(result[m], dtype=float)
        fig, ax = plt.subplots(figsize=(5.2, 4.2))
        label = TITLES[m]
        if m in ("loss", "embed_kl"):
            z, label = np.log10(np.clip(z, log_floor(z), None)), f"log10 of the {label}"
        cs = ax.contourf(X, Y, z, levels=30, cmap="viridis")
        fig.colorbar(cs, ax=ax, label=label)
        if "norm" in result:
            cl = ax.contour(X, Y, result["norm"], levels=8, colors="white", linewidths=0.6, alpha=0.8)
            ax.clabel(cl, fontsize=6, fmt="%.3g")
        for k, ((ax_x, ax_y), label) in enumerate(zip(result["anchors"], result["anchor_labels"])):
            if not (min(xs) <= ax_x <= max(xs) and min(ys) <= ax_y <= max(ys)):
                continue  # off this grid (a zoom): marking it would stretch the axes past the data
            ax.plot(ax_x, ax_y, "o", color="red", ms=5, mec="white")
            ax.annotate(_math(str(label)), (ax_x, ax_y), textcoords="offset points", color="red", fontsize=10,
                        xytext=(-5, -12) if k == 0 else (5, 4), ha="right" if k == 0 else "left")
        ax.set_xlabel("distance along e1" if ortho else "λ1 (along v1)")
        ax.set_ylabel("distance along e2" if ortho else "λ2 (along v2)")
        if ortho:
            ax.set_aspect("equal")
        ax.set_title(f"{TITLES[m]} ({'orthogonal' if ortho else 'affine'} plane)", fontsize=10)
        fig.tight_layout()
        path = out / f"{m}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
