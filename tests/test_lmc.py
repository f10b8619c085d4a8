import json

import numpy as np
import pytest
import torch

from randteach.analysis.lmc import barrier_height, lmc_series, pooled_series
from randteach.analysis.params import interpolate_states
from randteach.cli import main
from randteach.runs.checkpoint import load_checkpoint
from randteach.train.supervised import accuracy, build_classifier, load_supervised_data, run_info

from test_supervised import TINY_RECIPE, tiny_run


@pytest.fixture(scope="module")
def setup():
    info = run_info(tiny_run())
    return info, load_supervised_data(info.cfg, info.image_size, n_train=256, n_test=100)


def test_barrier_height_matches_numpy():
    g = np.linspace(0, 1, 5)
    err = np.array([0.1, 0.3, 0.5, 0.25, 0.2])
    want = max(err - (g * 0.2 + (1 - g) * 0.1))
    assert barrier_height(g, err) == pytest.approx(want)
    assert barrier_height(g, g * 0.2 + (1 - g) * 0.1) == pytest.approx(0.0, abs=1e-12)


def test_interpolation_ends_are_the_endpoints_exactly():
    a = {"w": torch.randn(5, 3), "n": torch.tensor(3)}
    b = {"w": torch.randn(5, 3), "n": torch.tensor(7)}
    assert torch.equal(interpolate_states(a, b, 1.0)["w"], a["w"])
    assert torch.equal(interpolate_states(a, b, 0.0)["w"], b["w"])
    mid = interpolate_states(a, b, 0.25)["w"].double()
    np.testing.assert_allclose(mid.numpy(), (0.25 * a["w"].double() + 0.75 * b["w"].double()).numpy(), rtol=1e-6)


def test_path_ends_reproduce_the_endpoint_accuracies(setup, tmp_path):
    """Batch-norm network: statistics recomputed at every point, endpoints included."""
    info, data = setup
    recipe = TINY_RECIPE.replace(epochs=1, eval_every=0)
    s = lmc_series(info, "student", data, recipe, torch.device("cpu"), runs=3, resolution=3, bn_batches=2,
                   out=tmp_path)
    pair = s["pairs"][0]
    assert [(p["i"], p["j"]) for p in s["pairs"]] == [(0, 1), (0, 2), (1, 2)]
    assert s["barrier_std"] == pytest.approx(np.std([p["barrier"] for p in s["pairs"]], ddof=1))  # sample std
    for k, end in ((0, -1), (1, 0)):  # gamma = 1 is run i, gamma = 0 is run j
        model = build_classifier(info, "random", data.num_classes)
        model.load_state_dict(load_checkpoint(tmp_path / f"run{k}.pt")["model"])
        err = 1 - accuracy(model, data.test, data.preprocess, torch.device("cpu"))
        assert pair["test_error"][end] == err == s["runs"][k]["test_error"]
    assert pair["barrier"] >= 0 and s["runs"][0]["seed"] != s["runs"][1]["seed"]


def test_lmc_command(setup, tmp_path, capsys):
    info, _ = setup
    out = tmp_path / "lmc"
    args = ["--quiet", "lmc", str(info.path), "--start", "student@1", "--runs", "2", "--resolution", "3",
            "--epochs", "2", "--batch-size", "64", "--lr", "0.02", "--milestones", "--no-augment",
            "--n-train", "128", "--n-test", "50", "--device", "cpu", "--bn-batches", "0", "--eval-every", "1",
            "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "lmc.json").read_text())
    assert [s["start"] for s in result["series"]] == ["student@1"]
    assert "interpolated" in result["bn"]
    for s in result["series"]:
        assert s["gammas"] == [0.0, 0.5, 1.0] and len(s["pairs"]) == 1
        # without recomputation the endpoints are the trained networks as they are
        run0 = s["runs"][0]
        assert s["pairs"][0]["test_error"][-1] == run0["test_error"] == run0["test_error_before_bn_recompute"]
        assert [h["epoch"] for h in run0["history"]] == [2]  # --eval-every 1 after the shared first epoch
    assert (out / "lmc.png").stat().st_size > 0
    printed = capsys.readouterr().out  # one pair: no spread to show (it printed "± nan")
    assert "over 1 pair" in printed and "±" not in printed and "nan" not in printed, printed
    assert main(args) == 0  # finished runs are loaded, not retrained
    assert main([*args, "--lr", "0.03"]) == 2  # argparse: the last --lr wins
    assert "other settings (recipe.lr 0.02 there, 0.03 now); give those to continue" in capsys.readouterr().err


def test_pooled_endpoint_errors_count_each_run_once():
    runs = [{"test_error": e} for e in (0.1, 0.2, 0.6)]
    pairs = [{"barrier": b, "test_error": [runs[j]["test_error"], 0.5, runs[i]["test_error"]]}
             for b, (i, j) in zip((0.01, 0.02, 0.03), ((0, 1), (0, 2), (1, 2)))]
    (pooled,) = pooled_series([{"series": [{"start": "student", "gammas": [0, 0.5, 1], "pairs": pairs, "runs": runs}]}])
    assert [p["barrier"] for p in pooled["pairs"]] == [0.01, 0.02, 0.03]
    assert [r["test_error"] for r in pooled["runs"]] == [0.1, 0.2, 0.6]


def test_lmc_and_imp_figures_show_points_as_the_tables_do(tmp_path, monkeypatch):
    # the figures plotted fractions (error 0.90, "barrier 0.005") beside tables in % and pp
    from matplotlib.figure import Figure
    from randteach.analysis.imp import plot_imp
    from randteach.analysis.lmc import plot_lmc
    drawn = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: drawn.__setitem__(path.name, fig))
    series = {"start": "student", "gammas": [0.0, 0.5, 1.0], "runs": [],
              "pairs": [{"test_error": [0.10, 0.14, 0.12], "barrier": 0.025}]}
    plot_lmc([{"series": [series]}], tmp_path / "lmc.png")
    (ax,) = drawn["lmc.png"].axes
    assert list(ax.lines[0].get_ydata()) == pytest.approx([10.0, 14.0, 12.0])
    assert ax.get_title() == "from student: barrier 2.50 pp\n(1 pair)" and ax.get_ylabel() == "test error (%)"
    rounds = [{"sparsity": 0.0, "test_accuracy": 0.91}, {"sparsity": 0.2, "test_accuracy": 0.9}]
    plot_imp([{"series": [{"source": "student", "rewind_epochs": 0, "rounds": rounds}], "data": "digits",
               "fraction": 0.2}], tmp_path / "imp.png")
    (ax,) = drawn["imp.png"].axes
    assert list(ax.lines[0].get_ydata()) == pytest.approx([91.0, 90.0]) and ax.get_ylabel() == "test accuracy (%)"


def test_the_lmc_and_imp_figures_pool_every_distilled_checkpoint(tmp_path, monkeypatch):
    # RT Fig. 8 aggregates 5 checkpoints, Fig. 9 3 initializations x 5 orderings: one figure over all of them
    from matplotlib.figure import Figure
    from randteach.analysis.imp import plot_imp
    from randteach.analysis.lmc import plot_lmc
    drawn = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: drawn.__setitem__(path.name, fig))
    pair = lambda e, b: {"test_error": [0.1, e, 0.1], "barrier": b}
    seed = lambda *pairs: {"series": [{"start": "student", "gammas": [0.0, 0.5, 1.0], "pairs": list(pairs),
                                       "runs": [], "barrier_mean": 0.0, "barrier_std": 0.0}]}
    plot_lmc([seed(pair(0.2, 0.1)), seed(pair(0.4, 0.3), pair(0.3, 0.2))], tmp_path / "lmc.png")
    (ax,) = drawn["lmc.png"].axes
    assert len(ax.lines) == 4 and list(ax.lines[-1].get_ydata()) == pytest.approx([10.0, 30.0, 10.0])  # 3 pairs, mean
    assert ax.get_title() == "from student: barrier 20.00 ± 10.00 pp\n(3 pairs, 2 checkpoints)"
    rounds = lambda *acc: [{"sparsity": s, "test_accuracy": a} for s, a in zip((0.0, 0.2), acc)]
    one = lambda *acc: {"series": [{"source": "student", "rewind_epochs": 0, "rounds": rounds(*acc)}],
                        "data": "digits", "fraction": 0.2}
    plot_imp([one(0.9, 0.8), one(0.7, 0.8)], tmp_path / "imp.png")
    (ax,) = drawn["imp.png"].axes
    assert list(ax.lines[0].get_ydata()) == pytest.approx([80.0, 80.0]) and "over 2 checkpoints" in ax.get_title()
