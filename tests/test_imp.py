import json

import numpy as np
import pytest
import torch

from randteach.analysis import imp
from randteach.analysis.imp import imp_series, kept_after, magnitude_prune, prunable_names
from randteach.cli import main
from randteach.errors import UserError
from randteach.train.supervised import build_classifier, load_supervised_data, run_info

from test_supervised import TINY_RECIPE, tiny_run


@pytest.fixture(scope="module")
def setup():
    info = run_info(tiny_run())
    return info, load_supervised_data(info.cfg, info.image_size, n_train=256, n_test=100)


def test_magnitude_prune_keeps_the_largest_surviving_weights_globally():
    rng = np.random.default_rng(0)
    w = {"a": torch.tensor(rng.normal(size=(4, 5))), "b": torch.tensor(rng.normal(size=(7,)))}
    masks = {k: torch.ones_like(v) for k, v in w.items()}
    masks["a"][0, :] = 0  # already pruned: must stay pruned even though some are large
    w["a"][0, 0] = 100.0
    new = magnitude_prune(w, masks, keep=10)
    flat_w = np.concatenate([w["a"].numpy().ravel(), w["b"].numpy().ravel()])
    alive = np.concatenate([masks["a"].numpy().ravel(), masks["b"].numpy().ravel()]).astype(bool)
    want = np.zeros_like(alive)
    idx = np.flatnonzero(alive)
    want[idx[np.argsort(-np.abs(flat_w[idx]), kind="stable")[:10]]] = True
    got = np.concatenate([new["a"].numpy().ravel(), new["b"].numpy().ravel()]).astype(bool)
    np.testing.assert_array_equal(got, want)
    assert new["a"][0].sum() == 0


def test_rounding_of_the_kept_count():
    assert [kept_after(1000, r) for r in range(4)] == [1000, 800, 640, 512]
    assert kept_after(1001, 1) == 801  # 800.8
    assert kept_after(10, 3) == 5      # 5.12


def test_what_is_pruned(setup):
    info, data = setup
    model = build_classifier(info, "student", data.num_classes)
    names = prunable_names(model)
    assert names and all(n.endswith(".weight") for n in names) and "fc.weight" not in names
    assert not any("bias" in n or ".1." in n for n in names)  # no biases, no batch-norm parameters
    assert prunable_names(model, prune_classifier=True) == names + ["fc.weight"]


def test_pruning_rounds_zero_exactly_the_stated_fraction_and_keep_it_zero(setup, tmp_path, monkeypatch):
    info, data = setup
    recipe = TINY_RECIPE.replace(epochs=1, eval_every=0)
    result = imp_series(info, "student@0", data, recipe, torch.device("cpu"), rounds=3, out=tmp_path)
    rounds = result["rounds"]
    n = rounds[0]["prunable"]
    for r, rec in enumerate(rounds):
        assert rec["remaining"] == round(n * 0.8 ** r)
        assert rec["sparsity"] == pytest.approx(1 - round(n * 0.8 ** r) / n)
        assert rec["pruned_nonzero"] == 0                   # pruned weights stayed exactly 0 through training
        assert rec["zero_weights"] >= n - rec["remaining"]
        assert 0 < rec["test_accuracy"] <= 1
    # the saved state: masks and trained weights agree; a second call resumes without training
    saved = torch.load(tmp_path / "imp_state.pt", weights_only=True)
    trained, masks = saved["trained"], saved["masks"]
    assert sum(int((m == 0).sum()) for m in masks.values()) == n - round(n * 0.8 ** 3)
    assert all(bool((trained[k][masks[k] == 0] == 0).all()) for k in masks)
    monkeypatch.setattr(imp, "train_supervised", lambda *a, **k: pytest.fail("retrained a finished round"))
    assert imp_series(info, "student@0", data, recipe, torch.device("cpu"), rounds=3, out=tmp_path)["rounds"] == rounds
    # fewer rounds are read from the series; other settings are named (it said "different settings" only)
    assert imp_series(info, "student@0", data, recipe, torch.device("cpu"), rounds=1, out=tmp_path)["rounds"] == \
        rounds[:2]
    with pytest.raises(UserError, match=r"other settings \(recipe.epochs 1 there, 2 now\); give those to continue"):
        imp_series(info, "student@0", data, recipe.replace(epochs=2), torch.device("cpu"), rounds=3, out=tmp_path)
    monkeypatch.undo()
    more = imp_series(info, "student@0", data, recipe, torch.device("cpu"), rounds=4, out=tmp_path)["rounds"]
    assert more[:4] == rounds and more[4]["remaining"] == round(n * 0.8 ** 4)  # one round more, trained


def test_imp_command(setup, tmp_path, capsys):
    info, _ = setup
    out = tmp_path / "imp"
    rc = main(["--quiet", "imp", str(info.path), "--start", "student@0", "random@1", "--rounds", "1",
               "--epochs", "2", "--batch-size", "64", "--lr", "0.02", "--milestones", "--pad", "1",
               "--n-train", "128", "--n-test", "50", "--device", "cpu", "--prune-classifier", "--eval-every", "1",
               "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "imp.json").read_text())
    assert [s["start"] for s in result["series"]] == ["student@0", "random@1"]
    assert result["series"][1]["rewind_step"] == 2  # 128 / 64 steps per epoch
    assert all("fc.weight" in s["pruned"] for s in result["series"])
    assert [len(s["rounds"]) for s in result["series"]] == [2, 2]
    # --eval-every 1: round 0 tested after epochs 1 and 2 (it was computed and not kept)
    assert [h["epoch"] for h in result["series"][0]["rounds"][0]["history"]] == [1, 2]
    assert (out / "imp.png").stat().st_size > 0
    assert main(["imp", str(info.path), "--start", "student", "student@0", "--out", str(out)]) == 2  # trained twice
    assert "--start student and student@0 name the same start" in capsys.readouterr().err


def test_the_default_rounds_reach_the_end_of_fig_8s_axis():
    """RT Fig. 8's axis ends at 0.5 % of the weights remaining: the command and the API prune that far."""
    import inspect

    import randteach
    from randteach.analysis.imp import PAPER_ROUNDS, kept_after
    from randteach.cli import build_parser
    assert round(100 * kept_after(10**6, PAPER_ROUNDS) / 10**6, 1) == 0.5
    assert build_parser().parse_args(["imp", "RUN"]).rounds == PAPER_ROUNDS
    assert inspect.signature(randteach.imp).parameters["rounds"].default is None  # None: PAPER_ROUNDS
