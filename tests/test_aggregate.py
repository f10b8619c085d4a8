"""Reports: collect summaries once each, group by the swept key, mean ± std over seeds against numpy."""
import csv
import json
import math

import numpy as np
import pytest

from randteach.cli import main
from randteach.config import build_config
from randteach.errors import UserError
from randteach.reports.groups import GIVEN, collect, group, seed_paths, varying_keys, write_group_report
from randteach.runs.rundir import RunDir

ALPHAS = (1e-10, 0.5, 1.0)
SEEDS = (0, 1, 2)


def fake_run(root, alpha, seed, status="completed", **summary):
    """A run directory as distill writes it: config.yaml, metrics.jsonl with probe events, summary.json."""
    cfg = build_config("cpu", None, {"name": "fake", "init.alpha": alpha, "train.seed": seed})
    cfg.out = str(root / f"fake-{cfg.digest()}")
    run = RunDir(cfg.run_dir()).create()
    run.config_path.write_text(cfg.to_yaml())
    rng = np.random.default_rng([int(alpha * 100), seed])
    probes = {}
    for epoch in (0, 1, 2):
        probes = {role: {"linear": float(rng.uniform(0.2, 0.9)), "knn": float(rng.uniform(0.2, 0.9))}
                  for role in ("teacher", "student", "input")}
        run.log({"event": "probe", "step": 10 * epoch, "epoch": epoch, **probes})
    run.write_summary({"status": status, "steps": 20, "probe": probes, "final_loss": float(rng.uniform(1, 2)),
                       "wall_time_s": 1.0, "config_digest": cfg.digest(), **summary})
    return run.path, probes


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "sweep"
    finals = {(a, s): fake_run(root, a, s)[1] for a in ALPHAS for s in SEEDS}
    fake_run(root, 0.5, 7, status="diverged", diverged_step=3, reason="non-finite loss or gradient")
    fake_run(root, 0.5, 8, status="failed", error="RuntimeError: boom")
    (root / ".submitit").mkdir()
    (root / ".submitit" / "summary.json").write_text("{}")   # not a run: hidden folders are skipped
    return root, finals


def test_group_by_the_swept_key_matches_numpy(runs):
    root, finals = runs
    rows = collect([root, next(root.glob("fake-*"))])     # overlapping dirs: every run once
    assert len(rows) == 11 and len({r["run_dir"] for r in rows}) == 11
    assert varying_keys(rows) == ["init.alpha"]            # train.seed is averaged over, never grouped on
    table = group(rows)
    assert [e["init.alpha"] for e in table] == list(ALPHAS)
    for e in table:
        a = e["init.alpha"]
        assert e["n"] == 3
        assert (e["diverged"], e["failed"], e["unfinished"]) == ((1, 1, 0) if a == 0.5 else (0, 0, 0))
        for role in ("teacher", "student", "input"):
            for kind in ("linear", "knn"):
                vals = np.array([finals[(a, s)][role][kind] for s in SEEDS])
                assert e[f"{role}.{kind}_mean"] == pytest.approx(vals.mean(), abs=1e-12)
                assert e[f"{role}.{kind}_std"] == pytest.approx(vals.std(ddof=1), abs=1e-12)


def test_one_seed_has_no_std_and_explicit_keys_are_checked(runs):
    root, _ = runs
    rows = [r for r in collect([root]) if r["config"]["train.seed"] == 0]
    (entry, *_) = group(rows, ["init.alpha"])
    assert entry["n"] == 1 and math.isnan(entry["student.linear_std"])
    assert len(group(collect([root]), [])) == 1            # no keys: one group of everything
    with pytest.raises(UserError, match="init.alfa"):
        group(rows, ["init.alfa"])


def test_report_writes_csv_markdown_and_plots(runs, capsys):
    root, finals = runs
    assert main(["report", str(root)]) == 0
    assert "| init.alpha | n |" in capsys.readouterr().out
    for name in ("report.csv", "runs.csv", "report.md", "probe_vs_init.alpha.png", "probe_vs_epoch.png"):
        assert (root / name).stat().st_size > 0
    with open(root / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["init.alpha"], r["n"]) for r in table] == [("1e-10", "3"), ("0.5", "3"), ("1.0", "3")]
    student = np.array([finals[(1.0, s)]["student"]["linear"] for s in SEEDS])
    assert float(table[2]["student.linear_mean"]) == pytest.approx(student.mean())
    with open(root / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 11
    md = (root / "report.md").read_text()
    assert "11 runs" in md and "n − 1" in md and "RuntimeError: boom" in md
    assert "non-finite at step 3: non-finite loss or gradient (20 steps counted;" in md
    assert f"{100 * student.mean():.2f} ± {100 * student.std(ddof=1):.2f}" in md


def test_report_of_nothing_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_a_plot_with_many_lines_names_each_role_once():
    from randteach.reports.groups import LEGEND_COMBOS, _line_label
    few = [_line_label("student", ["optim.lr"], (1e-3,), i, LEGEND_COMBOS) for i in range(2)]
    assert few == ["student optim.lr=0.001"] * 2
    many = [_line_label("student", ["optim.lr"], (1e-3,), i, LEGEND_COMBOS + 1) for i in range(3)]
    assert many == ["student", "_nolegend_", "_nolegend_"]


def test_a_cell_averaging_fewer_runs_than_its_row_says_how_many(tmp_path, capsys):
    """One seed's student k-NN is missing (overflowing features) and one's student linear is NaN: the cells
    average the finite values and name their count; the other cells of the row average all three."""
    from randteach.reports.groups import markdown_table, metric_names
    root = tmp_path / "sweep"
    _, finals = fake_run(root, 0.5, 0)
    fake_run(root, 0.5, 1, probe={**finals, "student": {"linear": float("nan")}})
    fake_run(root, 0.5, 2, probe={**finals, "student": {"linear": 0.5}})
    rows = collect([root])
    (e,) = group(rows, [])
    assert e["n"] == 3 and e["student.knn_n"] == 1 and e["student.linear_n"] == 2 and e["teacher.knn_n"] == 3
    assert e["student.linear_mean"] == pytest.approx((finals["student"]["linear"] + 0.5) / 2)
    text = markdown_table([e], [], metric_names(rows))
    assert text.count("(n = 2)") == 1 and text.count("(n = 1)") == 1


def test_keys_outside_a_runs_address_do_not_split_its_seeds(runs):
    """Seeds of one setting logged differently or read from another data.root are one group."""
    root, _ = runs
    rows = collect([root])
    for i, r in enumerate(rows):
        r["config"].update({"train.log_every": 1 + i % 2, "data.root": f"/node{i % 3}/data", "log.wandb": i % 2 == 0})
    assert varying_keys(rows) == ["init.alpha"] and [e["n"] for e in group(rows)] == [3, 3, 3]


def _checkpoint_rows(paths: dict[int, str | None], lr: float = 1e-3) -> list[dict]:
    return [{"run_dir": f"{lr}-{seed}-{path}", "status": "completed", "metrics": {}, "summary": {},
             "config": {"train.seed": seed, "init.teacher_checkpoint": path, "optim.lr": lr}}
            for seed, path in paths.items()]


def test_a_seed_path_per_run_is_not_a_grouping_key(tmp_path):
    """Restart's round-2 runs name each seed's round-1 student as their teacher: one group, not one per seed."""
    rows = seed_paths(_checkpoint_rows({i: f"runs/round1-{i}" for i in range(3)}))
    assert varying_keys(rows) == [] and group(rows)[0]["n"] == 3


def test_runs_with_a_checkpoint_are_grouped_apart_from_those_without():
    """Restart's round 1 (a random teacher) and round 2 (each seed's round-1 student) with otherwise equal
    settings: two groups of three seeds, not one group of six with each seed twice."""
    rows = seed_paths(_checkpoint_rows({i: None for i in range(3)}) +
                      _checkpoint_rows({i: f"runs/round1-{i}" for i in range(3)}))
    assert varying_keys(rows) == ["init.teacher_checkpoint"]
    assert [(e["init.teacher_checkpoint"], e["n"]) for e in group(rows)] == [(None, 3), (GIVEN, 3)]


def test_a_swept_checkpoint_is_grouped_by_its_path():
    """Two teachers, each distilled with three seeds: one group per teacher (the path is a swept axis)."""
    rows = seed_paths([r for path in ("runs/a", "runs/b") for r in _checkpoint_rows({i: path for i in range(3)})])
    assert varying_keys(rows) == ["init.teacher_checkpoint"]
    assert [(e["init.teacher_checkpoint"], e["n"]) for e in group(rows)] == [("runs/a", 3), ("runs/b", 3)]
    other_lr = seed_paths(_checkpoint_rows({0: "runs/a"}) + _checkpoint_rows({0: "runs/b"}, lr=2e-3))
    assert varying_keys(other_lr) == ["optim.lr"], "paths that differ only with another key are not an axis"


def test_one_sweep_of_a_pool_that_sweeps_a_checkpoint_leaves_the_others_per_seed_paths_grouped():
    """A restart round 2 (lr 1e-3, each seed its own teacher) reported together with a sweep over two teachers
    (lr 2e-3): one group for the first, one per teacher for the second."""
    rows = seed_paths(_checkpoint_rows({i: f"runs/round1-{i}" for i in range(3)}) +
                      [r for path in ("runs/a", "runs/b") for r in _checkpoint_rows({0: path, 1: path}, lr=2e-3)])
    assert [(e["optim.lr"], e["init.teacher_checkpoint"], e["n"]) for e in group(rows)] == \
        [(1e-3, GIVEN, 3), (2e-3, "runs/a", 2), (2e-3, "runs/b", 2)]


def test_an_experiment_table_counts_runs_without_a_summary_as_unfinished(tmp_path):
    from randteach.reports.experiment import markdown, rows_of, summarize
    root = tmp_path / "sweep"
    configs = []
    for seed in SEEDS:
        cfg = build_config("cpu", None, {"name": "fake", "init.alpha": 0.5, "train.seed": seed})
        cfg.out = str(root / f"fake-{cfg.digest()}")
        configs.append(cfg)
    for seed in SEEDS[:2]:
        fake_run(root, 0.5, seed)
    rows = rows_of(configs)
    assert [r["status"] for r in rows] == ["completed", "completed", "pending"]
    (e,) = table = summarize(rows, ["init.alpha"])
    assert (e["n"], e["unfinished"]) == (2, 1)
    assert "| 0 / 0 / 1 |" in markdown(table, ["init.alpha"])


def test_a_run_two_configs_share_is_reported_under_each_ones_values(tmp_path):
    # model.norm none is the conv net's own: one network, one run, whose config.yaml says one of the two
    from randteach.reports.experiment import rows_of
    root = tmp_path / "sweep"
    fake_run(root, 0.5, 0)
    configs = []
    for norm in ("default", "none"):
        cfg = build_config("cpu", None, {"name": "fake", "init.alpha": 0.5, "train.seed": 0, "model.norm": norm})
        cfg.out = str(root / f"fake-{cfg.digest()}")
        configs.append(cfg)
    assert configs[0].run_dir() == configs[1].run_dir()
    rows = rows_of(configs)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert [r["config"]["model.norm"] for r in rows] == ["default", "none"]
    configs[1].train.log_every = 7  # outside the address: the row keeps what the run did
    assert rows_of(configs)[1]["config"]["train.log_every"] != 7


def test_a_group_that_mixes_settings_or_repeats_a_seed_is_named(runs, tmp_path):
    """Grouped by nothing, the three alphas' runs share each seed: the report says the group is no seed
    spread, and which key differs inside it."""
    root, _ = runs
    text = write_group_report([root], out=tmp_path / "r", group_by=[]).read_text()
    assert "**Groups that mix settings**" in text and "init.alpha differs inside it" in text
    assert "seed 0, 1, 2 occurs more than once" in text
    by_alpha = write_group_report([root], out=tmp_path / "a", group_by=["init.alpha"]).read_text()
    assert "Groups that mix settings" not in by_alpha


def _drawn(monkeypatch) -> list:
    """The figures the report functions close after saving, kept to read what they drew."""
    from randteach.reports.run import pyplot
    figures = []
    monkeypatch.setattr(pyplot(), "close", figures.append)
    return figures


def test_plots_mark_a_point_over_fewer_seeds_with_its_count(tmp_path, monkeypatch):
    from randteach.experiments.locality import plot_optimization
    from randteach.reports.groups import plot_vs_key
    point = lambda alpha, n: {"init.alpha": alpha, "n": 3, "student.linear_mean": 0.8, "student.linear_std": 0.01,
                              "student.linear_n": n, "final_loss_mean": 1.0, "final_loss_std": 0.1,
                              "final_loss_n": n, "dist_init_mean": 2.0, "dist_init_std": 0.1, "dist_init_n": 3}
    table = [point(0.0, 3), point(0.5, 2)]
    figures = _drawn(monkeypatch)
    plot_vs_key(table, ["init.alpha"], "init.alpha", tmp_path / "vs.png")
    plot_optimization(table, [], tmp_path / "optimization.png")
    texts = [[t.get_text() for t in ax.texts] for fig in figures for ax in fig.axes]
    assert texts == [["n=2"], ["n=2"], []]  # probe accuracy; final loss; distance (all three seeds)
    assert (tmp_path / "vs.png").exists() and (tmp_path / "optimization.png").exists()


def test_each_probe_protocol_has_its_own_axis_label(tmp_path, monkeypatch):
    from randteach.reports.groups import plot_vs_key
    table = [{"init.alpha": a, "n": 2, **{f"student.{k}_{s}": v for k in ("linear", "paper_linear", "paper_knn")
                                           for s, v in (("mean", 0.5), ("std", 0.1), ("n", 2))}} for a in (0.5, 1.0)]
    figures = _drawn(monkeypatch)
    plot_vs_key(table, ["init.alpha"], "init.alpha", tmp_path / "vs.png")
    assert [ax.get_ylabel() for ax in figures[0].axes] == [
        "final linear probe accuracy (%)", "final linear, authors' protocol (AdamW 10 epochs) probe accuracy (%)",
        "final k-NN, authors' protocol (L2 majority vote) probe accuracy (%)"]


def test_bars_show_each_groups_final_probes_and_the_papers_numbers(tmp_path, monkeypatch):
    from randteach.reports.groups import plot_bars
    entry = lambda name, t, s: {"data.name": name, "n": 2, "teacher.linear_mean": t, "teacher.linear_std": 0.01,
                                "student.linear_mean": s, "student.linear_std": 0.02}
    table = [entry("cifar10", 0.35, 0.46), entry("stl10", 0.30, 0.40)]
    figures = _drawn(monkeypatch)
    plot_bars(table, ["data.name"], tmp_path / "bars.png", [{"student.linear": 46.02}, None])
    (ax,) = figures[0].axes
    heights = [round(b.get_height(), 6) for b in ax.patches]
    assert heights == [35.0, 30.0, 46.0, 40.0]  # teacher bars, then student bars, in percent
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cifar10", "stl10"]
    (paper,) = [line for line in ax.lines if line.get_label() == "paper"]
    assert list(paper.get_ydata()) == [46.02] and paper.get_xdata()[0] == pytest.approx(0.2)  # on cifar10's student
    assert (tmp_path / "bars.png").stat().st_size > 0


def test_the_probe_curves_legend_stays_short_with_many_groups(tmp_path, monkeypatch):
    from randteach.reports.groups import LEGEND_COMBOS, plot_vs_epoch
    run = [fake_run(tmp_path, 0.1 * (i + 1), 0)[0] for i in range(LEGEND_COMBOS + 1)][0]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "teacher"}) + "\n"
                                               for r in records))  # the first group probed no teacher
    figures = _drawn(monkeypatch)
    plot_vs_epoch(collect([tmp_path]), ["init.alpha"], tmp_path / "curves.png")
    for ax in figures[0].axes:  # one entry per role (its first group's colour), not one per group
        assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["input", "student", "teacher"]


def test_a_group_report_never_overwrites_a_runs_own_report(tmp_path, capsys):
    run, _ = fake_run(tmp_path / "runs", 0.5, 0)
    (run / "report.md").write_text("the run's own report")
    assert main(["--quiet", "report", str(run)]) == 0
    assert (run / "report.md").read_text() == "the run's own report"
    assert (tmp_path / "runs" / f"report-{run.name}" / "report.md").read_text().startswith("# Report")  # beside it
    assert main(["--quiet", "report", str(run), "--out", str(run)]) == 2
    assert "is a run folder" in capsys.readouterr().err and (run / "report.md").read_text() == "the run's own report"


def test_a_report_of_runs_named_one_by_one_has_a_folder_of_its_own(tmp_path, capsys):
    # it wrote report.md, two CSVs and the figures straight into runs/, among the run folders
    runs = [fake_run(tmp_path / "runs", alpha, 0)[0] for alpha in (0.25, 0.5)]
    assert main(["--quiet", "report", *map(str, runs)]) == 0
    assert (tmp_path / "runs" / "report" / "report.md").exists() and not (tmp_path / "runs" / "report.md").exists()
    assert main(["--quiet", "report", str(tmp_path / "runs")]) == 0  # the folder itself: its report, in it
    assert (tmp_path / "runs" / "report.md").exists()


def test_the_probe_table_of_a_run_and_of_a_run_that_probed_nothing():
    from randteach.reports.run import probe_table
    table = probe_table({"probe": {"teacher": {"linear": 0.5, "knn": 0.25}, "student": {"linear": 0.75}}})
    assert table.splitlines() == ["| model | linear probe (%) | knn probe (%) |", "|---|---|---|",
                                  "| teacher | 50.00 | 25.00 |", "| student | 75.00 | – |"]
    assert probe_table({"probe": {}}).startswith("(nothing probed")
    # stopped (Ctrl-C) before its first probe finished: not "probe.which is empty"
    assert probe_table({"status": "interrupted"}) == "(no probe finished before the run stopped: interrupted)"


def test_a_run_report_without_probe_records_has_no_empty_table_or_plot(tmp_path):
    from randteach.reports.run import write_run_report
    from randteach.train.loop import distill
    from tiny import tiny_config
    run = distill(tiny_config(tmp_path, train__max_steps=1, probe__which="[]"), progress=False).path
    text = write_run_report(run).read_text()
    assert "(no probe records)" in text and "![probe accuracy" not in text and not (run / "probes.png").exists()
    assert "| epoch |  |" not in text


def test_a_legend_of_long_entries_goes_below_its_panel():
    # six keys' values per entry: inside the axes the legend hid the curves and the y axis (head ablations)
    from randteach.reports.groups import place_legend
    from randteach.reports.run import pyplot
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, label in ((left, "student " + ", ".join(f"head.key{i}=False" for i in range(6))), (right, "student")):
        ax.plot([0, 1], [50, 60], label=label)
        ax.set_xlabel("epoch")
        place_legend(ax, 6)
    fig.canvas.draw()
    below = left.get_legend().get_window_extent()
    assert below.y1 < left.xaxis.label.get_window_extent().y0  # under the panel and its x label
    inside = right.get_legend().get_window_extent()
    assert right.get_window_extent().contains(inside.x0, inside.y0)  # short entries stay inside
    plt.close(fig)


def test_a_run_made_before_a_key_existed_is_grouped_with_the_runs_made_after(tmp_path):
    # a sweep run before train.checkpoint_at and data.split existed, then grown by a seed
    root = tmp_path / "sweep"
    for seed in (0, 1, 2):
        fake_run(root, 0.5, seed)
    old = RunDir(next(root.glob("fake-*")))
    lines = old.config_path.read_text().splitlines()
    old.config_path.write_text("\n".join(line for line in lines if not line.lstrip().startswith(
        ("checkpoint_at:", "split:"))) + "\n")
    rows = collect([root])
    assert varying_keys(rows) == [] and [e["n"] for e in group(rows)] == [3]
