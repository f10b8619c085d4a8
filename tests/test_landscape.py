import json
import math

import numpy as np
import pytest
import torch

from randteach.analysis import landscape as ls
from randteach.analysis.landscape import compute_landscape, grid_axis, landscape_loss, loss_inputs, view_anchors
from randteach.analysis.params import ParamSpace, Plane, interpolate_buffers
from randteach.cli import main
from randteach.config import build_config
from randteach.errors import UserError
from randteach.losses import distill_loss
from randteach.models import build_model
from randteach.runs.checkpoint import load_state_dict
from randteach.train.supervised import run_info

from test_supervised import tiny_run


@pytest.fixture(scope="module")
def runs():
    """Two runs sharing their teacher: alpha = 1e-10 and alpha = 1 (batch-norm conv net)."""
    return tiny_run("1e-10"), tiny_run("1")


def _vectors(seed=0, p=50):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p, generator=g, dtype=torch.float64) for _ in range(3)]


def test_plane_points_are_the_parameters_they_claim():
    t, a, b = (v.numpy() for v in _vectors())
    plane = Plane.through(*map(torch.from_numpy, (t, a, b)))
    for l1, l2 in [(0, 0), (1, 0), (0, 1), (0.3, -0.7), (1.5, 2.0)]:
        np.testing.assert_allclose(plane.affine_point(l1, l2).numpy(), t + l1 * (a - t) + l2 * (b - t), rtol=1e-12)
    e1 = (a - t) / np.linalg.norm(a - t)
    u = (b - t) - ((b - t) @ e1) * e1
    e2 = u / np.linalg.norm(u)
    for x, y in [(0.0, 0.0), (2.5, -1.0), (-3.0, 4.0)]:
        point = plane.orthogonal_point(x, y)
        np.testing.assert_allclose(point.numpy(), t + x * e1 + y * e2, rtol=1e-12, atol=1e-12)
        assert plane.project(point) == pytest.approx((x, y), abs=1e-12)
        assert plane.to_orthogonal(*plane.to_affine(x, y)) == pytest.approx((x, y), abs=1e-12)
        np.testing.assert_allclose(plane.affine_point(*plane.to_affine(x, y)).numpy(), point.numpy(), atol=1e-12)
    # the anchors' orthogonal coordinates give back the anchors
    for (x, y), want in zip(plane.anchor_coordinates("orthogonal"), (t, a, b)):
        np.testing.assert_allclose(plane.orthogonal_point(x, y).numpy(), want, atol=1e-12)


def test_orthogonal_coordinates_preserve_distances_and_angles():
    t, a, b = _vectors(1)
    plane = Plane.through(t, a, b)
    xy = np.array(plane.anchor_coordinates("orthogonal"))
    pts = [v.numpy() for v in (t, a, b)]
    for i in range(3):
        for j in range(3):
            assert np.linalg.norm(xy[i] - xy[j]) == pytest.approx(np.linalg.norm(pts[i] - pts[j]), rel=1e-12)
    cos = (pts[1] - pts[0]) @ (pts[2] - pts[0]) / (np.linalg.norm(pts[1] - pts[0]) * np.linalg.norm(pts[2] - pts[0]))
    cos_xy = xy[1] @ xy[2] / (np.linalg.norm(xy[1]) * np.linalg.norm(xy[2]))
    assert math.acos(cos_xy) == pytest.approx(math.acos(cos), rel=1e-10)


def test_collinear_anchors_are_refused():
    t, a, _ = _vectors(2)
    with pytest.raises(ValueError, match="collinear"):
        Plane.through(t, a, t + 2 * (a - t))


def test_batch_norm_buffers_are_interpolated_like_parameters():
    b0 = {"bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3), "bn.num_batches_tracked": torch.tensor(0)}
    b1 = {"bn.running_mean": torch.full((3,), 2.0), "bn.running_var": torch.full((3,), 3.0),
          "bn.num_batches_tracked": torch.tensor(9)}
    b2 = {"bn.running_mean": torch.full((3,), -1.0), "bn.running_var": torch.full((3,), 0.5),
          "bn.num_batches_tracked": torch.tensor(5)}
    for (l1, l2), want in (((0, 0), b0), ((1, 0), b1), ((0, 1), b2)):
        got = interpolate_buffers(b0, b1, b2, l1, l2)
        assert all(torch.equal(got[k], want[k]) for k in ("bn.running_mean", "bn.running_var"))
    mid = interpolate_buffers(b0, b1, b2, 0.5, 0.25)
    assert torch.allclose(mid["bn.running_mean"], torch.full((3,), 0.75))
    assert torch.allclose(mid["bn.running_var"], torch.full((3,), 1.0 + 0.5 * 2.0 + 0.25 * -0.5))
    assert int(mid["bn.num_batches_tracked"]) == 0  # integer counters: the origin's
    assert float(interpolate_buffers(b0, b1, b2, -1.0, 0.0)["bn.running_var"].min()) == 0.0  # clamped


def test_grid_axis_snaps_onto_anchor_coordinates():
    axis = grid_axis(-0.5, 1.5, 21, [0.0, 1.0])
    assert 0.0 in axis.tolist() and 1.0 in axis.tolist() and len(axis) == 21


def _model(info, state):
    m = build_model(info.cfg, info.in_channels, info.image_size, seed=0).eval()
    m.load_state_dict(state)
    return m


def test_teacher_point_is_the_teacher_against_itself_and_anchors_are_themselves(runs, tmp_path):
    a0, a1 = runs
    info = run_info(a0)
    anchors = view_anchors("shared", [a0, a1])
    res = compute_landscape(anchors, info, tmp_path, grid=3, extent=(-1, 1), n_loss=128, probe=False)
    assert res["complete"] and list(res["x"]) == [-1.0, 0.0, 1.0]
    x = loss_inputs(info.cfg, 128)
    teacher = _model(info, load_state_dict(a0, "teacher"))
    with torch.no_grad():
        t_out = teacher(x).double()
        assert res["loss"][1, 1] == 0.0 and res["embed_kl"][1, 1] == 0.0  # (l1, l2) = (0, 0): KL to itself
        # anchor 1 at (1, 0): the alpha~0 student with its own batch-norm statistics; the loss is the float64
        # KL of the fp32 outputs (a kl run; a ce run maps the same KL, see the test below)
        student = _model(info, load_state_dict(a0, "student"))
        want = float(distill_loss("kl", student(x).double(), t_out))
        assert res["loss"][1, 2] == pytest.approx(want, rel=1e-4) and want > 0
    space = ParamSpace(teacher)
    assert res["norm"][1, 1] == pytest.approx(float(space.flatten(teacher).norm()), rel=1e-9)
    saved = np.load(tmp_path / "landscape.npz")
    assert set(saved.files) >= {"x", "y", "loss", "embed_kl", "norm", "anchors", "anchor_labels", "l1", "l2"}
    np.testing.assert_array_equal(saved["anchors"], [[0, 0], [1, 0], [0, 1]])
    assert list(saved["anchor_labels"]) == ["θ_T", "θ*_S(0)", "θ*_S(1)"]
    assert (tmp_path / "loss.png").exists() and (tmp_path / "embed_kl.png").exists()


def test_a_stopped_grid_resumes_without_recomputing_done_points(runs, tmp_path, monkeypatch):
    a0, _ = runs
    info = run_info(a0)
    anchors = view_anchors("non-local", [runs[1]])
    kw = dict(grid=3, extent=(-0.5, 1.5), n_loss=64, probe=False)
    part = compute_landscape(anchors, info, tmp_path, limit=4, **kw)
    assert not part["complete"] and not (tmp_path / "landscape.npz").exists()
    lines = (tmp_path / "points.jsonl").read_text().splitlines()
    assert len(lines) == 4
    with open(tmp_path / "points.jsonl", "a") as f:
        f.write('{"i": 1, "j": 1, "x": 0.5, "lo')  # a kill in the middle of a write
    calls = []
    real = ls._outputs
    monkeypatch.setattr(ls, "_outputs", lambda *a: calls.append(1) or real(*a))
    full = compute_landscape(anchors, info, tmp_path, **kw)
    assert full["complete"] and len(calls) == 1 + 9 - 4  # the teacher once, then only the missing points
    done = [json.loads(line) for line in lines]
    for rec in done:
        assert full["loss"][rec["i"], rec["j"]] == rec["loss"]
    assert np.isfinite(full["loss"]).all()
    with pytest.raises(Exception, match="other settings"):
        compute_landscape(anchors, info, tmp_path, grid=4, extent=(-0.5, 1.5), n_loss=64, probe=False)


def test_a_landscape_folder_is_claimed_by_settings_and_a_matching_config_digest(tmp_path):
    cfg = build_config("cpu", overrides={"data.root": "/data"})
    spec = {"grid": [3, 3], "config_digest": cfg.digest()}
    ls._claim_folder(tmp_path, {**spec, "config_digest": cfg.digest(before_2026_12=True)}, cfg)  # written before
    ls._claim_folder(tmp_path, spec, cfg)  # the same run's landscape: it continues
    with pytest.raises(UserError, match=r"other settings \(grid \[3, 3\] there, \[3, 2\] now\); give those"):
        ls._claim_folder(tmp_path, {**spec, "grid": [3, 2]}, cfg)
    with pytest.raises(UserError, match=r"\(probe None there, False now\)"):  # not the grid given
        ls._claim_folder(tmp_path, {**spec, "probe": False}, cfg)
    other = build_config("cpu", overrides={"init.alpha": "0.5"})
    with pytest.raises(UserError, match=r"other settings \(the --section.key options\)"):
        ls._claim_folder(tmp_path, {**spec, "config_digest": other.digest()}, other)


def test_landscape_command_orthogonal_with_probe(runs, tmp_path):
    a0, a1 = runs
    out = tmp_path / "ortho"
    rc = main(["--quiet", "landscape", "--view", "shared", str(a0), str(a1), "--projection", "orthogonal",
               "--grid", "3", "2", "--extent", "-0.1", "1.1", "0", "1", "--n-loss", "64", "--device", "cpu",
               "--probe.n_train", "200", "--probe.n_test", "100", "--probe.knn_k", "5", "--out", str(out)])
    assert rc == 0
    res = np.load(out / "landscape.npz")
    assert res["loss"].shape == (2, 3) and res["probe_linear"].shape == (2, 3)
    assert np.all((res["probe_linear"] > 0) & (res["probe_linear"] <= 1))
    assert np.all((res["probe_knn"] > 0) & (res["probe_knn"] <= 1))
    assert res["y"][0] == 0.0 and res["y"][-1] == pytest.approx(float(res["scale"]))
    d = res["anchor_distances"]
    xy = res["anchors"]
    assert np.linalg.norm(xy[1] - xy[2]) == pytest.approx(d[1, 2], rel=1e-9)
    assert (out / "probe_linear.png").exists() and (out / "probe_knn.png").exists()
    spec = json.loads((out / "landscape.json").read_text())
    assert spec["projection"] == "orthogonal" and spec["grid"] == [3, 2]


def test_landscape_command_errors(runs, tmp_path):
    a0, a1 = runs
    assert main(["landscape", "--view", "shared", str(a0), "--out", str(tmp_path / "x")]) == 2  # needs two runs
    assert main(["landscape", "--out", str(tmp_path / "x")]) == 2                                 # no plane
    assert main(["landscape", "--anchors", f"{a0}:teacher", f"{a0}:teacher", f"{a1}:student",
                 "--out", str(tmp_path / "x")]) == 2                                               # degenerate plane


def test_ce_runs_are_mapped_as_their_kl_and_other_losses_as_they_are():
    assert landscape_loss(build_config("cpu", None, {"loss.name": "ce"})) == "kl"
    assert landscape_loss(build_config("cpu", None, {"loss.name": "kl"})) == "kl"
    assert landscape_loss(build_config("cpu", None, {"loss.name": "nmse"})) == "nmse"


def test_the_log_colour_scale_starts_below_the_second_smallest_loss():
    """The teacher's own point is 0 up to fp32 output rounding (~1e-16): the scale starts a decade below the
    next-smallest value instead, as Fig. 5's starts at 1e-7."""
    z = np.array([[6e-16, 2e-7], [3e-5, np.nan]])
    assert ls.log_floor(z) == pytest.approx(2e-8)
    assert ls.log_floor(np.array([0.0, 5e-3])) == 5e-3 and ls.log_floor(np.array([0.0])) == 1e-300


def test_landscape_command_zoom_on_the_teacher(runs, tmp_path):
    """--unit first: the orthogonal extent in units of |θ*_S(0) - θ_T|, so [-0.5, 1.5] frames θ_T and θ*_S(0)."""
    a0, a1 = runs
    out = tmp_path / "zoom"
    assert main(["--quiet", "landscape", "--view", "shared", str(a0), str(a1), "--projection", "orthogonal",
                 "--unit", "first", "--grid", "3", "--extent", "-0.5", "1.5", "--n-loss", "32", "--no-probe",
                 "--device", "cpu", "--out", str(out)]) == 0
    res = np.load(out / "landscape.npz")
    d = float(res["anchors"][1][0])  # θ*_S(0) lies on e1 at its distance from θ_T
    np.testing.assert_allclose(res["x"], [-0.5 * d, 0.5 * d, 1.5 * d], rtol=1e-9)
    assert json.loads((out / "landscape.json").read_text())["unit"] == "first"


def test_without_an_extent_the_affine_plane_is_the_papers_unit_square_and_the_orthogonal_one_frames_both(runs,
                                                                                                          tmp_path):
    """RT Sec. 5: (l1, l2) in [0, 1]^2; the orthogonal default is [-0.5, 1.5] in units of the longer anchor."""
    info = run_info(runs[0])
    anchors = view_anchors("shared", list(runs))
    affine = compute_landscape(anchors, info, tmp_path / "affine", grid=3, n_loss=32, probe=False)
    assert list(affine["x"]) == list(affine["y"]) == [0.0, 0.5, 1.0]
    ortho = compute_landscape(anchors, info, tmp_path / "ortho", grid=3, n_loss=32, probe=False,
                              projection="orthogonal")
    longer = max(np.linalg.norm(ortho["anchors"][1]), np.linalg.norm(ortho["anchors"][2]))
    assert ortho["x"][0] == pytest.approx(-0.5 * longer) and ortho["x"][-1] == pytest.approx(1.5 * longer)


def test_the_paper_landscape_recipe_draws_the_affine_plane_over_the_unit_square():
    from randteach.experiments import load_recipe
    from randteach.experiments.landscape import _plans
    params = load_recipe("landscape", "paper").params
    extents = {plan["name"]: plan["extent"] for plan in _plans(params, "shared")}
    assert extents == {"affine": [0.0, 1.0], "orthogonal": [-0.5, 1.5], "zoom": [-0.5, 1.5, -1.0, 1.0]}


def test_more_loss_inputs_than_the_data_has_are_noted(runs, tmp_path, capsys):
    a0, a1 = runs
    info = run_info(a0)
    compute_landscape(view_anchors("shared", [a0, a1]), info, tmp_path, grid=2, n_loss=10 ** 6, probe=False)
    n = len(loss_inputs(info.cfg, 10 ** 6))
    assert f"note: n_loss 1000000: the run's data has {n} inputs" in capsys.readouterr().err  # it said nothing
