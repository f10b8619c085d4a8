"""Experiments: the paper-scale recipes resolve to the papers' configs; every experiment runs end to end at the
tests' tiny scale (digits, a tiny conv net, 3 steps) and writes its report; runs are shared and reused."""
import csv
import json
import math
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import yaml

from randteach.cli import main
from randteach.config import ConfigError
from randteach.errors import UserError
from randteach.experiments import NAMES, get_experiment, load_recipe, make_context, run_experiment
from randteach.experiments.base import known_params
from randteach.experiments.recipe import recipe_names
from randteach.experiments.signal_propagation import SIGNAL_PARAMS
from randteach.reports.experiment import markdown, summarize

PAPER_ENCODERS = ["vgg11", "vgg13", "vgg16", "vgg19", "resnet20", "resnet56", "resnet18", "resnet34", "resnet50",
                  "vit_tiny", "vit_small", "vit_medium", "vit_base"]


def stages(name, scale="paper", tmp_path=Path("/nonexistent")):
    ctx = make_context(name, scale, out=tmp_path)
    return ctx, get_experiment(name).stages(ctx)


def configs(name, arm=None, scale="paper"):
    _, st = stages(name, scale)
    return [c for stage in st for a, cs in stage.items() if arm in (None, a) for c in cs]


# ------------------------------------------------------------------------- paper scale = the papers' recipes

def assert_paper_recipe(c, *, out_dim=65536, alpha=1e-10):
    """RT paper App. E: DINO head 2048-2048-bottleneck(256)-2^16, CE at T = 1 (as KL) without centering, AdamW
    1e-3 wd 0, batch 256, alpha = 1e-10, frozen teacher in eval mode, fp32, no augmentation (there is none)."""
    assert (c.head.kind, c.head.hidden_dims, c.head.bottleneck_dim, c.head.out_dim) == ("dino", [2048, 2048], 256, out_dim)
    assert (c.loss.name, c.loss.teacher_temp, c.loss.student_temp, c.loss.center) == ("kl", 1.0, 1.0, False)
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.schedule, c.optim.grad_clip) == \
        ("adamw", 1e-3, 0.0, "constant", None)
    assert c.train.batch_size == 256 and c.train.precision == "fp32"
    assert (c.teacher.mode, c.teacher.train_mode) == ("frozen", False)
    assert c.init.mode == "locality" and c.init.alpha == alpha
    assert c.probe.knn_k == 20


def test_paper_probes_are_table1_with_three_seeds():
    cs = configs("probes")
    assert {(c.data.name, c.model.encoder) for c in cs} == \
        {(d, e) for d in ("cifar10", "cifar100", "stl10", "tinyimagenet") for e in ("resnet18", "vgg11")}
    assert sorted({c.train.seed for c in cs}) == [0, 1, 2] and len(cs) == 24
    for c in cs:
        assert_paper_recipe(c)
        assert c.model.norm == "default" and c.data.image_size == 32 and c.train.epochs == 150


def test_paper_locality_grid_is_e3():
    cs = configs("locality")
    assert sorted({c.init.alpha for c in cs}) == [1e-10, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert {c.model.encoder for c in cs} == {"resnet18", "vgg11"} and {c.data.name for c in cs} == {"cifar10"}
    for c in cs:
        assert_paper_recipe(c, alpha=c.init.alpha)


def test_paper_data_dependence_holds_the_step_count():
    cs = configs("data-dependence")
    sizes = [500, 5000, 50000, 500000, 5000000]
    assert {(c.data.inputs, c.data.n_samples) for c in cs} == {(i, n) for i in ("data", "noise") for n in sizes}
    for c in cs:
        assert_paper_recipe(c)
        assert c.data.name == "cifar5m" and c.model.encoder == "vgg11"
        per_epoch = math.ceil(c.data.n_samples / 256)
        assert c.train.max_steps == 29400 and math.ceil(c.train.epochs * per_epoch - 1e-6) == 29400


def test_paper_transfer_is_tinyimagenet_to_cifar_and_stl():
    ctx, st = stages("transfer")
    cs = [c for s in st for v in s.values() for c in v]
    assert {(c.data.name, c.model.encoder) for c in cs} == {("tinyimagenet", "resnet18"), ("tinyimagenet", "vgg11")}
    assert ctx.params["targets"] == ["tinyimagenet", "cifar10", "cifar100", "stl10"]
    for c in cs:
        assert_paper_recipe(c)


def test_paper_head_ablations_cover_app_b():
    cs = configs("head-ablations", "out_dim")
    # App. B: m from 2^0 to 2^16, the phase transition at the bottleneck width 2^8 inside the grid
    assert sorted({c.head.out_dim for c in cs}) == [2 ** k for k in range(0, 17)]
    for c in cs:
        assert_paper_recipe(c, out_dim=c.head.out_dim)
    # the epoch axes of Fig. 10-12 end at 100
    assert {c.train.epochs for arm in ("norm", "bottleneck", "out_dim") for c in configs("head-ablations", arm)} == {100}
    assert {c.model.norm for c in configs("head-ablations", "norm")} == {"batch", "layer", "group", "instance", "none"}
    parts = {(c.head.wn1, c.head.lin1, c.head.fn1, c.head.wn2, c.head.lin2, c.head.fn2)
             for c in configs("head-ablations", "bottleneck")}
    assert (False, True, True, True, True, False) in parts and len(parts) == 7
    one_layer = [c for c in configs("head-ablations", "bottleneck") if not c.head.lin2]
    assert one_layer and all(c.head.bottleneck_dim == c.head.out_dim == 2 ** 16 for c in one_layer)
    # each encoder's own norm (ResNet18: batch, VGG11: none) is its default run, which every arm shares
    runs = {}
    for arm in ("norm", "bottleneck", "out_dim"):
        for c in configs("head-ablations", arm):
            runs.setdefault(c.run_dir(), []).append(arm)
    assert len([r for r, arms in runs.items() if sorted(arms) == ["bottleneck", "norm", "out_dim"]]) == 2 * 3
    assert len(runs) == 3 * (2 * 5 + 2 * 7 + 2 * 17 - 2 * 2)  # seeds x (the arms' cells less the shared ones)


def test_paper_imp_prunes_to_half_a_percent():
    params = make_context("imp", "paper").params
    # Fig. 8's axis ends near 0.5 % of the weights: 24 rounds of 20 % leave 0.8^24 = 0.47 %
    assert params["fraction"] == 0.2 and params["rounds"] == 24
    assert 0.004 < (1 - params["fraction"]) ** params["rounds"] < 0.006


def test_paper_architectures_are_table5():
    cs = configs("architectures")
    assert sorted({c.model.encoder for c in cs}) == sorted(PAPER_ENCODERS)
    for c in cs:
        assert_paper_recipe(c)
    refs = load_recipe("architectures", "paper").reference
    assert {r["match"]["model.encoder"] for r in refs} == set(PAPER_ENCODERS)


def test_paper_restart_uses_round_one_students_as_teachers():
    ctx, (first, second) = stages("restart")
    r1, r2 = first["round1"], second["round2"]
    assert len(r2) == 2 * len(r1)
    assert {c.train.epochs for c in r1} == {100}  # Fig. 18's first round ends at epoch 100
    by_dir = {str(c.run_dir()): c for c in r1}
    for c in r2:
        parent = by_dir[c.init.teacher_checkpoint]
        assert (c.model.encoder, c.train.seed) == (parent.model.encoder, parent.train.seed)
        assert c.init.mode in ("locality", "copy") and c.train.epochs == 20


def assert_escaping_setting(c, loss):
    """The escaping paper's simplified setup (its Empirical Setup): VGG11 + one linear layer to 512, plain SGD, batch 256, theta_T + 1e-10 theta~."""
    assert (c.model.encoder, c.head.kind, c.head.out_dim, c.data.name) == ("vgg11", "linear", 512, "cifar10")
    assert (c.optim.name, c.optim.momentum, c.optim.weight_decay) == ("sgd", 0.0, 0.0)
    assert (c.init.mode, c.init.epsilon, c.loss.name) == ("neighborhood", 1e-10, loss)
    assert c.train.batch_size == 256 and c.train.precision == "fp32"


def test_paper_escaping_experiments_are_e12_to_e15():
    from randteach.experiments.base import seed_bases
    lr = make_context("lr-range", "paper")
    (c,) = seed_bases(lr)
    assert_escaping_setting(c, "mse")  # Fig. 1a: plain MSE
    assert c.data.n_samples is None and (lr.params["lr_start"], lr.params["lr_end"], lr.params["epochs"]) == (1e-6, 1e6, 5)
    esc = make_context("escape", "paper")
    (c,) = seed_bases(esc)
    assert_escaping_setting(c, "nmse")
    assert c.data.n_samples == 49152 and esc.params["batch_lr"] == esc.params["stabilize_lr"] == 1e4
    assert esc.params["lrs"][0] == 32 and esc.params["lrs"][-1] == 1e5 and 1e4 in esc.params["lrs"]
    assert esc.params["batch_sizes"] == [256, 1024, 4096, 16384, 0] and esc.params["stabilize"]
    # Fig. 1c: 20k steps; Fig. 1d: 6k steps; theta_S of Sec. 3 after 100 epochs of 192 steps, kept for E14
    assert esc.params["steps"] == 20000 and esc.params["group_steps"]["batch_size"] == 6000
    assert esc.params["keep_steps"] == [100 * 49152 // 256]
    signal = make_context("signal", "paper")
    assert signal.params["runs"] == ["step_size/lr10000"]  # E14 analyses E13's eta = 1e4 run
    assert known_params(signal, SIGNAL_PARAMS)["student_step"] == 19200


def test_paper_reference_numbers_are_the_papers_tables():
    """Spot checks against the RT paper's Tab. 1 (linear), Tab. 3 (k-NN) and, from TinyImageNet, Tab. 2 / 4."""
    refs = {tuple(sorted(r["match"].items())): r for r in load_recipe("probes", "paper").reference}
    assert len(refs) == 8 and all("teacher.knn" in r and "student.knn" in r for r in refs.values())
    r18 = refs[(("data.name", "cifar10"), ("model.encoder", "resnet18"))]
    assert (r18["teacher.linear"], r18["student.linear"], r18["input.linear"]) == (35.50, 46.02, 39.02)
    assert (r18["teacher.knn"], r18["student.knn"]) == (37.65, 44.67)
    tin = refs[(("data.name", "tinyimagenet"), ("model.encoder", "vgg11"))]
    assert (tin["teacher.linear"], tin["student.linear"], tin["teacher.knn"], tin["student.knn"]) == (5.25, 12.88, 5.98, 9.23)
    stl = refs[(("data.name", "stl10"), ("model.encoder", "resnet18"))]
    assert (stl["input.linear"], stl["input.knn"]) == (31.51, 28.94)
    moved = {(r["match"]["probe.data"], r["match"]["model.encoder"]): r for r in load_recipe("transfer", "paper").reference}
    assert len(moved) == 6
    assert (moved["cifar100", "vgg11"]["student.linear"], moved["cifar100", "vgg11"]["student.knn"]) == (27.49, 23.95)
    assert (moved["stl10", "resnet18"]["student.linear"], moved["stl10", "resnet18"]["student.knn"]) == (41.42, 38.86)


def test_every_experiment_has_cpu_and_paper_recipes_that_resolve(tmp_path):
    for name in NAMES:
        assert f"{name}.cpu" in recipe_names() and f"{name}.paper" in recipe_names()
        for scale in ("cpu", "paper"):
            ctx = make_context(name, scale, out=tmp_path)
            get_experiment(name).stages(ctx)
            get_experiment(name).post(ctx)


def test_cpu_experiments_share_the_default_run(tmp_path):
    dirs = [{str(c.run_dir()) for c in cs} for cs in
            (configs_cpu(n, tmp_path) for n in ("probes", "locality", "restart", "landscape", "head-ablations"))]
    shared = set.intersection(*dirs[:3])
    assert len(shared) == 3  # the shared recipe at alpha = 1e-10, seeds 0, 1, 2
    assert shared <= dirs[3] and shared <= dirs[4]  # landscape and head-ablations use all three seeds


def configs_cpu(name, tmp_path):
    _, st = stages(name, "cpu", tmp_path)
    return [c for s in st for cs in s.values() for c in cs]


def test_recipe_mistakes_are_user_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"experiment": "locality", "arms": {"a": {"grd": {}}}}))
    with pytest.raises(ConfigError, match="grd"):
        load_recipe("locality", "cpu", bad)
    bad.write_text(yaml.safe_dump({"experiment": "locality", "arms": {"a": {"grid": {"init.alpha": []}}}}))
    with pytest.raises(ConfigError, match="non-empty"):
        load_recipe("locality", "cpu", bad)
    bad.write_text(yaml.safe_dump({"experiment": "locality", "arms": {"a": {"grid": {"init.alpah": [1]}}}}))
    with pytest.raises(ConfigError, match="alpah"):
        make_context("locality", "cpu", out=tmp_path, recipe=bad).configs("a")
    with pytest.raises(ConfigError, match="scale"):
        load_recipe("locality", "huge")
    assert main(["experiment", "probes", "--scale", "paper", "--recipe", str(tmp_path / "none.yaml"),
                 "--dry-run"]) == 2


def test_a_seed_on_the_command_line_is_refused_not_overruled(tmp_path, capsys):
    assert main(["experiment", "probes", "--out", str(tmp_path), "--dry-run", "--train.seed", "5"]) == 2
    assert "choose how many with --seeds N" in capsys.readouterr().err


DISTINCT = {"train.epochs": 7.77, "train.max_steps": 12345, "train.probe_every": 0.77, "train.checkpoint_every": 0.77,
            "train.checkpoint_at": [0.77],
            "train.probe_at": [0.77], "train.log_every": 77, "optim.lr": 0.0777, "optim.schedule": "cosine",
            "optim.lr_end": 77.7, "optim.warmup_steps": 77, "probe.which": ["input"]}


def test_a_key_an_analysis_sets_on_every_run_is_refused_not_overruled(tmp_path, capsys):
    from randteach.analysis.escape import escape_variants, variant_config
    from randteach.analysis.lr_range import range_config
    from randteach.config import build_config, flatten
    derive = {"escape": lambda c: [variant_config(c, v, n=1024, steps=12, probe_every_steps=4, out=tmp_path)
                                   for v in escape_variants()],  # every run of every group
              "lr-range": lambda c: [range_config(c, 1e-6, 1e6, 30, 10, tmp_path)]}
    for name, derived in derive.items():
        for key in get_experiment(name).sets:
            given = build_config("escape", overrides={key: DISTINCT[key]})
            assert all(flatten(c.to_dict())[key] != DISTINCT[key] for c in derived(given)), (name, key)  # overruled
            assert main(["experiment", name, "--out", str(tmp_path), "--dry-run", f"--{key}", str(DISTINCT[key])]) == 2
            assert f"--{key}: the {name} experiment sets it" in capsys.readouterr().err
    assert main(["experiment", "escape", "--out", str(tmp_path), "--dry-run", "--train.max-steps", "5"]) == 2
    assert "--train.max_steps: the escape experiment sets it" in capsys.readouterr().err  # either spelling


def test_a_key_replacing_an_arms_grid_is_named(tmp_path, capsys):
    assert main(["experiment", "locality", "--out", str(tmp_path), "--dry-run", "--init.alpha", "0.3"]) == 0
    assert "note: --init.alpha 0.3 replaces arm " in capsys.readouterr().out


def test_a_slurm_dry_run_says_what_it_would_submit(tmp_path, capsys):
    assert main(["experiment", "locality", "--out", str(tmp_path), "--dry-run", "--launcher", "slurm"]) == 0
    out = capsys.readouterr().out  # it listed the runs only
    runs = int(re.search(r"(\d+) runs in ", out).group(1))
    assert f"would submit {runs} jobs as one job array to slurm (name=randteach-cpu" in out, out
    # --slurm options go over the recipe's slurm: section (the command had none), checked as a sweep's
    assert main(["experiment", "locality", "--out", str(tmp_path), "--dry-run", "--launcher", "slurm",
                 "--slurm", "partition=gpu", "--slurm", "time=1:00:00"]) == 0
    assert "slurm_partition=gpu" in capsys.readouterr().out
    assert main(["experiment", "locality", "--out", str(tmp_path), "--dry-run", "--launcher", "slurm",
                 "--slurm", "cpus_per_task=4.0"]) == 2
    assert "cpus_per_task=4.0: expected a whole number" in capsys.readouterr().err
    assert main(["experiment", "locality", "--out", str(tmp_path), "--dry-run", "--slurm", "partition=gpu"]) == 2
    assert "(partition=gpu) do nothing with --launcher local; add --launcher slurm" in capsys.readouterr().err


def test_table_pairs_gains_and_shows_reference():
    def row(seed, t, s, alpha=0.5):
        return {"run_dir": f"r{seed}", "status": "completed", "summary": {},
                "config": {"init.alpha": alpha, "train.seed": seed},
                "metrics": {"teacher.linear": t, "student.linear": s}}
    rows = [row(0, 0.30, 0.40), row(1, 0.32, 0.41), row(2, 0.34, 0.45)]
    table = summarize(rows, ["init.alpha"])
    assert table[0]["gain.linear_mean"] == pytest.approx(0.1)
    assert table[0]["gain.linear_std"] == pytest.approx(0.01)  # paired: the teacher's spread cancels
    md = markdown(table, ["init.alpha"], [{"match": {"init.alpha": 0.5}, "teacher.linear": 35.5,
                                           "student.linear": 46.02, "source": "Tab. 1"}])
    assert "10.00 ± 1.00" in md and "35.50 / 46.02 / – (Tab. 1)" in md


def test_the_experiment_csv_gives_the_papers_numbers_in_the_units_of_ours(tmp_path):
    from randteach.reports.experiment import write_experiment_csv
    table = [{"data.name": "cifar10", "n": 1, "student.linear_mean": 0.52}]
    refs = [{"match": {"data.name": "cifar10"}, "student.linear": 51.98, "source": "Tab. 1"}]
    row = next(csv.DictReader(open(write_experiment_csv(table, ["data.name"], tmp_path / "t.csv", refs))))
    assert float(row["student.linear_mean"]) == 0.52 and float(row["paper.student.linear"]) == pytest.approx(0.5198)


# ------------------------------------------------------------------------------------ tiny scale, end to end

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


def run_tiny(name, root, **kw):
    out = run_experiment(name, "tiny", out=root, progress=False, workers=0, **kw)
    assert out.finished, out.counts
    text = out.report.read_text()
    assert text.startswith("# ") and "git commit" in text
    return out, text


def test_tiny_probes_then_reuse_and_dry_run(tiny, capsys):
    out, text = run_tiny("probes", tiny)
    assert out.counts == {"completed": 2}
    assert (out.report.parent / "main.csv").exists() and (out.report.parent / "main-vs-epoch.png").exists()
    rows = list(csv.DictReader(open(out.report.parent / "main-runs.csv")))
    assert len(rows) == 2 and all(0 < float(r["student.linear"]) <= 1 for r in rows)
    stamps = {p: p.stat().st_mtime_ns for p in (tiny / "runs").glob("*/summary.json")}
    again, text2 = run_tiny("probes", tiny)
    assert "2 of them finished before this invocation" in text2
    assert {p: p.stat().st_mtime_ns for p in (tiny / "runs").glob("*/summary.json")} == stamps  # nothing re-ran
    assert main(["experiment", "locality", "--scale", "tiny", "--out", str(tiny), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("done ") == 2 and listing.count("new ") == 2 and "init.alpha=0.25" in listing
    assert "sweep: 4 runs, 2 already done, 2 to run on 1 worker process with" in listing  # how they would run


def test_tiny_locality(tiny, monkeypatch):
    # RT Fig. 17: besides the summary vs alpha (right), the KL and the distance from init vs epoch (left, middle)
    from matplotlib.figure import Figure
    drawn = {}
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: (drawn.__setitem__(Path(path).name, fig),
                                                                     real(fig, path, **kw)))
    out, text = run_tiny("locality", tiny)
    assert "| distance from init ‖θ_S − θ_S(0)‖₂ |" in text and "final loss (mean over the last epoch's steps)" in text
    assert (out.report.parent / "alpha-optimization.png").exists()
    assert "\n| 1e-10 | 2 |" in text and "\n| 0.25 | 2 |" in text
    assert "![alpha-optimization-epochs](alpha-optimization-epochs.png)" in text
    kl, dist = drawn["alpha-optimization-epochs.png"].axes  # one column: the tiny recipe varies alpha only
    assert len(kl.lines) == len(dist.lines) == 4  # 2 alphas x 2 seeds, each a line
    logged = {r["dist_init"] for m in (tiny / "runs").glob("*/metrics.jsonl")
              for r in map(json.loads, m.read_text().splitlines()) if r.get("event") == "step"}
    assert {y for line in dist.lines for y in line.get_ydata()} <= logged  # the runs' own records
    assert {line.get_label() for line in kl.lines} >= {"α=1e-10", "α=0.25"}


def test_tiny_data_dependence(tiny):
    out, text = run_tiny("data-dependence", tiny, seeds=1)
    body = text.split("## ")[1]
    assert all(f"| {i} | {n} |" in body for i in ("data", "noise") for n in (128, 256))
    assert (out.report.parent / "data-dependence-vs-data.n_samples.png").exists()
    # the loss over the same last steps of every run, not each run's last epoch (1 to 2 of its 3 steps here)
    assert "loss, mean of steps 1–3" in body and "final loss (last epoch)" not in body


def test_tiny_transfer_probes_targets_and_caches(tiny):
    out, text = run_tiny("transfer", tiny, seeds=1)
    assert "| digits | digits |" in text
    assert "![transfer-bars](transfer-bars.png)" in text and (out.report.parent / "transfer-bars.png").exists()
    # the tiny recipe's two arms are one run: counted once (its rows were listed twice, n = 2 for one seed)
    rows = list(csv.DictReader(open(out.report.parent / "transfer-runs.csv")))
    assert len(rows) == len({(r["run_dir"], r["probe.data"]) for r in rows}) == 1
    cached = list((tiny / "runs").glob("*/probes/transfer-digits-*.json"))
    assert cached
    before = {p: p.stat().st_mtime_ns for p in cached}
    run_tiny("transfer", tiny, seeds=1)
    assert {p: p.stat().st_mtime_ns for p in cached} == before


def test_tiny_head_ablations(tiny):
    out, text = run_tiny("head-ablations", tiny, seeds=1)
    for arm in ("norm", "bottleneck", "out_dim"):
        assert f"## {arm}" in text and (out.report.parent / f"{arm}.csv").exists()
    # the default run serves all three arms: its distillation time counts once in the header
    import json
    ctx = make_context("head-ablations", "tiny", out=tiny, seeds=1)
    listed = [c.run_dir() for stage in get_experiment("head-ablations").stages(ctx) for cs in stage.values() for c in cs]
    runs = set(listed)
    assert len(listed) > len(runs)
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "wall_time_s": 100.0}))
    _, text = run_tiny("head-ablations", tiny, seeds=1)
    assert f"distillation time in its runs (reused ones included): {100 * len(runs)} s" in text


def test_tiny_architectures(tiny):
    out, text = run_tiny("architectures", tiny, seeds=1)
    assert "| mlp |" in text and "| convnet |" in text


def test_tiny_restart(tiny, monkeypatch):
    from matplotlib.figure import Figure
    drawn = {}
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: (drawn.__setitem__(Path(path).name, fig),
                                                                     real(fig, path, **kw)))
    out, text = run_tiny("restart", tiny, seeds=1)
    assert "| copy |" in text and "| locality |" in text and (out.report.parent / "rounds.png").exists()
    # a tiny run's one loss record was a line of one point: an empty panel; short curves are points too
    lines = [line for ax in drawn["rounds.png"].axes for line in ax.lines]
    assert lines and all(line.get_marker() == "o" for line in lines if len(line.get_xdata()) < 20)


def test_restart_round_two_keeps_teachers_of_different_round_one_settings_apart(tmp_path):
    """Round 1 sweeps its epochs, round 2 sets its own: round 2's table is grouped by its teacher's epochs."""
    import json
    from randteach.experiments.restart import second_round_rows
    recipe = tmp_path / "restart.yaml"
    recipe.write_text(yaml.safe_dump({"experiment": "restart", "arms": {
        "round1": {"grid": {"train.epochs": [2, 4]}},
        "round2": {"base": {"train.epochs": 1}, "variants": [{"init.mode": "copy"}]}}}))
    ctx = make_context("restart", "cpu", out=tmp_path / "out", recipe=str(recipe), seeds=2)
    first, second = (stage[arm] for stage, arm in zip(get_experiment("restart").stages(ctx), ("round1", "round2")))
    for c in first + second:
        c.run_dir().mkdir(parents=True)
        (c.run_dir() / "config.yaml").write_text(c.to_yaml())
        (c.run_dir() / "summary.json").write_text(json.dumps({"status": "completed", "config_digest": c.digest()}))
    rows, keys = second_round_rows(ctx, first, second)
    assert keys == ["round1 train.epochs", "init.mode"]
    assert [(e["round1 train.epochs"], e["n"]) for e in summarize(rows, keys)] == [(2, 2), (4, 2)]


def test_epoch_curves_are_the_logged_kl_distance_and_probe(tmp_path):
    """Fig. 17's and 18's rows from a run's log: each record's window mean of the loss, its distance from
    init, and the student's linear probe, against the epoch."""
    from randteach.config import build_config
    from randteach.reports.experiment import epoch_curves
    from randteach.runs.rundir import RunDir
    cfg = build_config("cpu", None, {"out": str(tmp_path / "run")})
    run = RunDir(cfg.run_dir()).create()
    run.log({"event": "step", "step": 10, "epoch": 0.5, "loss": 3e-5, "loss_mean": 4e-5, "dist_init": 1.5})
    run.log({"event": "probe", "step": 10, "epoch": 0.5, "student": {"linear": 0.75}, "teacher": {"linear": 0.7}})
    run.log({"event": "step", "step": 20, "epoch": 1.0, "loss": 2e-5, "dist_init": 2.5})
    # a diverged run's last record: the first non-finite step's loss, gradient norm and lr only
    run.log({"event": "step", "step": 21, "loss": float("nan"), "grad_norm": float("nan"), "lr": 1e-3})
    curves = epoch_curves(cfg.run_dir())
    assert curves["kl"] == ([0.5, 1.0], [4e-5, 2e-5]) and curves["dist_init"] == ([0.5, 1.0], [1.5, 2.5])
    assert curves["linear"] == ([0.5], [75.0])


def test_tiny_landscape(tiny):
    out, text = run_tiny("landscape", tiny)
    assert "## non-local view" in text and "## shared view" in text and "| θ_T | (0, 0) |" in text
    assert (out.report.parent / "seed0" / "shared-affine" / "landscape.npz").exists()
    # the zoom on the teacher: orthogonal, in units of |θ*_S(0) - θ_T|, so θ*_S(0) sits at x = that distance
    assert "## shared view, zoom on the teacher (orthogonal, Fig. 14/16)" in text
    zoom = np.load(out.report.parent / "seed0" / "shared-zoom" / "landscape.npz")
    d = float(zoom["anchors"][1][0])
    np.testing.assert_allclose(zoom["x"], [-0.5 * d, 0.5 * d, 1.5 * d], rtol=1e-9)


def test_tiny_imp_and_lmc(tiny):
    out, text = run_tiny("imp", tiny)
    assert "| 100 |" in text and "| 50 |" in text  # fraction 0.5 per round
    import json
    from randteach.reports.experiment import fmt, mean_std
    accuracy = {}  # (start, seed) -> the dense round's test accuracy, from each seed's imp.json
    for seed_dir in sorted(out.report.parent.glob("seed*")):
        for s in json.loads((seed_dir / "imp.json").read_text())["series"]:
            accuracy[s["start"], seed_dir.name] = s["rounds"][0]["test_accuracy"]
    seeds = {seed for _, seed in accuracy}
    gap = fmt(*mean_std([accuracy["student@0", s] - accuracy["random@0", s] for s in seeds]))
    dense = next(line for line in text.splitlines() if line.startswith("| 100 |"))
    assert "student@0 − random@0, paired over seeds (pp)" in text and dense.endswith(f"| {gap} |")
    assert "![IMP, all checkpoints](imp.png)" in text and (out.report.parent / "imp.png").exists()
    out, text = run_tiny("lmc", tiny)
    assert "| teacher | 1 |" in text and "| student | 1 |" in text
    assert "![LMC, all checkpoints](lmc.png)" in text and (out.report.parent / "lmc.png").exists()


def test_tiny_escape(tiny):
    out, text = run_tiny("escape", tiny)
    assert "| step_size | lr10000 | completed |" in text
    # the settings block showed the base's run length (max_steps 3), which the analysis replaces on each run
    settings = text.split("```yaml")[1].split("```")[0]
    assert "train.max_steps" not in settings and "the analysis sets train.epochs, train.max_steps" in text
    assert "- runs: 1 completed (0 of them finished before" in text  # the analysis's own runs are counted
    assert (out.report.parent / "seed0" / "escape.json").exists()


def test_tiny_lr_range(tiny):
    out, text = run_tiny("lr-range", tiny)
    assert "- runs: 1 completed" in text and "the analysis's own runs in" in text
    assert "| teacher-student |" in text and "| supervised |" in text
    assert (out.report.parent / "seed0" / "lr_range.png").exists()


def test_tiny_signal_on_the_escape_run(tiny):
    out, text = run_tiny("signal", tiny)  # runs the escape experiment first if no earlier test did
    # no runs of its own: no settings block of the recipe's base, which described no run it analyses
    assert "- runs: none of its own" in text and "Settings shared by every run" not in text
    assert (tiny / "escape" / "seed0" / "step_size" / "lr10000" / "collapse.json").exists()
    assert "### signal propagation (Fig. 2)" in text and "| 5 embedding |" in text
    assert (out.report.parent / "seed0" / "step_size" / "lr10000" / "signal.json").exists()


def test_paper_protocol_probes_sit_beside_ours(tmp_path):
    # the reference tables' runs are re-probed with the authors' protocols (AdamW 10-epoch linear probe,
    # unweighted L2 majority k-NN) and shown labelled beside our logistic regression / cosine k-NN
    from randteach.experiments.protocol import with_paper_protocol
    from randteach.reports.experiment import markdown, rows_of, summarize
    from randteach.train.loop import distill
    from tiny import tiny_config
    cfg = tiny_config(tmp_path, train__max_steps=3, train__probe_every=0, probe__n_train=300, probe__n_test=200)
    distill(cfg, progress=False)
    protocol = make_context("probes", "paper").params["paper_protocol"]
    assert protocol == {"probe.linear": "adamw", "probe.knn_weighting": "majority"}
    rows = with_paper_protocol(rows_of([cfg]), protocol)
    m = rows[0]["metrics"]
    for role in ("teacher", "student", "input"):
        assert 0 < m[f"{role}.paper_linear"] <= 1 and 0 < m[f"{role}.paper_knn"] <= 1
    assert m["student.paper_linear"] != m["student.linear"] or m["student.paper_knn"] != m["student.knn"]
    assert len(list((cfg.run_dir() / "probes").glob("paper-protocol-*.json"))) == 1
    text = markdown(summarize(rows, ["model.encoder"]), ["model.encoder"])
    assert "student linear, authors' protocol (AdamW 10 epochs) (%)" in text and "student linear (%)" in text
    assert with_paper_protocol(rows_of([cfg]), None) == rows_of([cfg])


def test_tiny_locality_stacked_matches_the_runs_trained_alone(tmp_path, capsys):
    # --stack --stack-mode vmap (from the command line): the alpha arms of a seed share a structure and train as
    # one vmapped model; alpha = 1e-10 starts in float64 and trains alone. The same tables as run alone (the
    # students within the stack's rounding).
    from randteach.cli import main
    alone, _ = run_tiny("locality", tmp_path / "alone")
    assert main(["experiment", "locality", "--scale", "tiny", "--out", str(tmp_path / "stacked"),
                 "--workers", "1", "--stack", "4", "--stack-mode", "vmap"]) == 0
    err = capsys.readouterr().err
    assert "stack of up to 4" in err and "not stacked:" in err and "float64" in err
    tables = [alone.report.parent, tmp_path / "stacked" / "locality"]
    alone_rows, stacked_rows = (list(csv.DictReader(open(folder / "alpha-runs.csv"))) for folder in tables)
    assert len(alone_rows) == len(stacked_rows) > 2
    for a, s in zip(alone_rows, stacked_rows):
        assert (a["init.alpha"], a["train.seed"]) == (s["init.alpha"], s["train.seed"])
        assert float(s["student.linear"]) == pytest.approx(float(a["student.linear"]), abs=0.02)
    with pytest.raises(UserError, match="--workers 0"):
        run_experiment("locality", "tiny", out=tmp_path / "x", workers=0, stack=2, progress=False)


def test_the_report_shows_command_line_overrides_as_the_runs_hold_them(tmp_path):
    """An override arrives as text ('3'); the report's shared settings show the runs' typed value."""
    out = run_experiment("probes", "tiny", out=tmp_path, progress=False, workers=0,
                         overrides={"train.max_steps": "3", "optim.lr": "2e-3"})
    text = out.report.read_text()
    shared = yaml.safe_load(text.split("```yaml", 1)[1].split("```", 1)[0])
    assert shared["train.max_steps"] == 3 and shared["optim.lr"] == 2e-3


def test_a_bad_stack_mode_is_refused_before_a_dry_run_lists_anything(tmp_path, capsys):
    from randteach.cli import main
    assert main(["experiment", "locality", "--scale", "tiny", "--out", str(tmp_path), "--stack", "2",
                 "--stack-mode", "vamp", "--dry-run"]) == 2
    assert "--stack-mode vamp: expected one of auto, vmap, threads" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_tiny_escape_by_effective_rank_labels_the_collapse_as_a_rank(tmp_path):
    recipe = yaml.safe_load(resources.files("randteach.experiments.recipes").joinpath("escape.cpu.yaml").read_text())
    recipe["params"] = {**recipe.pop("tiny")["params"], "collapse_metric": "erank"}  # a file's tiny: is not read
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    _, text = run_tiny("escape", tmp_path, recipe=str(tmp_path / "recipe.yaml"))
    assert "| collapse: lowest student embedding erank |" in text and "probe every 2 and at steps 1)" in text
    row = next(line for line in text.splitlines() if line.startswith("| step_size | lr10000 | completed |"))
    rank = float(row.split("|")[5].split("(")[0])
    assert 1 <= rank <= 64  # an effective rank of the 64-dim tiny embedding, not a percentage


def test_a_dry_run_says_what_data_is_missing_and_that_there_is_no_gpu(tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this machine, whatever it is
    assert main(["experiment", "transfer", "--scale", "paper", "--out", str(tmp_path), "--dry-run",
                 "--data.root", str(tmp_path / "empty")]) == 0
    out = capsys.readouterr().out
    assert f"note: TinyImageNet-200 is not on disk (searched under {tmp_path / 'empty'}); get it with: randteach " \
        f"data fetch tinyimagenet --data.root {tmp_path / 'empty'}" in out
    assert "note: no GPU here: the paper-scale runs would train on this machine's CPU" in out
    assert main(["experiment", "probes", "--scale", "cpu", "--out", str(tmp_path), "--dry-run"]) == 0
    assert "note:" not in capsys.readouterr().out  # Fashion-MNIST is here, and the cpu scale wants no GPU


def test_the_escape_dry_run_names_the_probe_schedule(tmp_path, capsys):
    assert main(["experiment", "escape", "--scale", "paper", "--out", str(tmp_path), "--dry-run"]) == 0
    assert ("20000 steps each, batch_size 6000, stabilize 6000, probed every 500 and at steps 10, 25, 50, 100, 250; "
            "the student of step 19200 kept (") in capsys.readouterr().out
