"""`make bench` harness: it runs end to end on a tiny model, and its arithmetic (palindromic rounds,
ratios, FLOP fractions, verdicts) is right. No timing is asserted."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("randteach_bench_run", BENCH / "run.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_the_demo_workload_takes_steps_and_refuses_an_encoder(bench, tmp_path):
    with pytest.raises(SystemExit, match="--encoder applies to --workload paper"):
        bench.main(["--workload", "demo", "--encoder", "resnet18", "--out", str(tmp_path / "R.md")])
    demo = bench.workload_of(bench.parse_args(["--workload", "demo", "--steps", "3"]), "vgg11")
    assert (demo.encoder, demo.batch, demo.steps, demo.warmup) == ("convnet", 64, 3, 21)  # 20, rounded up to whole windows
    paper = bench.workload_of(bench.parse_args(["--warmup", "4"]), "resnet18")
    assert (paper.encoder, paper.steps, paper.warmup) == ("resnet18", 2, 4)


def test_tiny_benchmark_runs_end_to_end(bench, tmp_path):
    out = tmp_path / "RESULTS.md"
    # a section bench_stacked.py wrote before, and one of an older run.py: the first survives, the second goes
    out.write_text("# Benchmark results\n\n## 1. Distillation step\n\nold\n\n## Stacked runs\n\n| kept |\n")
    results = bench.main(["--tiny", "--rounds", "1", "--variants", "off,bf16,cache", "--out", str(out)])
    text = out.read_text()
    assert "| kept |" in text and "\nold\n" not in text and text.count("## 1. Distillation step") == 1
    for section in ("## Targets", "## 1. Distillation step", "## 2. Probes", "## 3. Landscape",
                    "## 4. GPU", "## Raw measurements", "load average"):
        assert section in text
    for label in ("plain fp32 loop", "ours, all off (fp32)", "bf16 autocast", "teacher cache"):
        assert f"| {label} |" in text
    enc = results["workload"]["encoder"]
    assert f"| distill, all on, x plain fp32 loop ({enc}) | - | >= 2.5x | **not measured** |" in text
    assert "`--tiny`: a smoke test of the script on a tiny model and digits features; the verdicts" in text
    run = results["distill"][0]["results"]
    assert all(run["bf16"]["bf16"]) and not any(run["off"]["bf16"])
    assert results["flops"]["step"] > results["flops"]["teacher_forward"] > results["flops"]["teacher_cached_part"] > 0
    w = results["workload"]
    assert {len(r["step_s"]) for r in run.values()} == {w["warmup"] + w["steps"]}  # every loop: the same steps
    assert results["cache_build"]["images"] == 256
    # the rate itself is a difference of two timings of a tiny model: timing noise can leave none to report
    assert 0 < results["probes"]["linear"]["accuracy"] <= 1 and results["landscape"]["points_per_s_with_setup"] > 0


def test_a_failing_variant_is_reported_and_the_others_measured(bench, tmp_path, monkeypatch):
    # a GPU session cannot afford to lose the whole benchmark to one variant (say CUDA graphs failing)
    monkeypatch.setitem(bench.VARIANTS, "broken", ("a variant that cannot run here", {"train.device": "cuda:999"}))
    out = tmp_path / "RESULTS.md"
    results = bench.main(["--tiny", "--rounds", "2", "--variants", "broken,off", "--distill-only", "--out", str(out)])
    text = out.read_text()
    assert set(results["failed"]) == {"broken"} and "**a variant that cannot run here failed**" in text
    assert all(r["order"] == ["plain", "off"] or r["order"] == ["off", "plain"] for r in results["distill"])
    assert "| ours, all off (fp32) |" in text


def test_a_benchmark_cut_short_keeps_what_it_measured(bench, tmp_path, monkeypatch):
    # a GPU session's time limit ends the run mid-way: the file written between the parts keeps the first
    # encoder's table, marked incomplete
    def second_encoder_cut_short(w, *args, **kwargs):
        if w.encoder == "resnet20":
            raise KeyboardInterrupt("the time limit")
        return real(w, *args, **kwargs)
    real = bench.distill_tables
    monkeypatch.setattr(bench, "distill_tables", second_encoder_cut_short)
    out = tmp_path / "RESULTS.md"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--tiny", "--rounds", "1", "--variants", "off", "--encoder", "convnet,resnet20", "--out", str(out)])
    text = out.read_text()
    assert "**Incomplete**: written after the step tables of convnet;" in text and "| ours, all off (fp32) |" in text


def _fake_run(plain_s, variant_s):
    """Two palindromic rounds of three timed-step lists (warm-up 9 s first) and the other inputs."""
    w = {"warmup": 1, "batch": 100, "steps": 2}
    rounds = []
    for r, order in enumerate((["plain", "cache", "all"], ["all", "cache", "plain"])):
        results = {"plain": {"step_s": [9.0, plain_s[r], plain_s[r]], "peak_rss": 1}}
        for key in ("cache", "all"):
            results[key] = {"step_s": [9.0, variant_s[key][r], variant_s[key][r] + 2], "peak_rss": 2,
                            "bf16": [True] * 3}
        for res in results.values():  # CPU clock: two threads busy all the time, except in round 2's plain
            res["cpu_s"] = [2 * x for x in res["step_s"]]
        if r == 1:
            results["plain"]["cpu_s"] = [18.0, 8.0, 8.0]
        rounds.append({"order": order, "results": results})
    return {"workload": w, "distill": rounds, "flops": {"step": 400.0, "teacher_cached_part": 100.0},
            "matmul_start": {"fp32": 100.0, "bf16": 300.0, "fp32_cpu": 50.0, "bf16_cpu": 150.0},
            "matmul_end": {"fp32": 100.0, "bf16": 500.0, "fp32_cpu": 50.0, "bf16_cpu": 250.0},
            "probes": {"linear": {"median_s": 30.0, "median_cpu_s": 12.0}, "knn": {"median_s": 4.0, "median_cpu_s": 5.5}}}


def test_summary_arithmetic_and_verdicts(bench):
    import bench_report  # on sys.path through the fixture
    results = _fake_run(plain_s=[4.0, 6.0], variant_s={"cache": [3.0, 5.0], "all": [1.0, 3.0]})
    s = bench_report.summarize(results)
    v = s["variants"]
    # per round: the mean of the timed steps (warm-up dropped), then the mean over rounds
    assert v["plain"]["wall"]["s_per_step"] == pytest.approx(5.0)
    assert v["cache"]["wall"]["s_per_step"] == pytest.approx(5.0)     # means 4 and 6
    assert v["all"]["wall"]["s_per_step"] == pytest.approx(3.0)       # means 2 and 4
    assert v["all"]["wall"]["x_plain"] == pytest.approx(5 / 3)
    assert v["all"]["wall"]["images_per_s"] == pytest.approx(100 / 3)
    # the CPU clock is summarized the same way, on its own numbers
    assert v["plain"]["cpu"]["s_per_step"] == pytest.approx((8 + 8) / 2)
    assert v["all"]["cpu"]["x_plain"] == pytest.approx(8 / 6)
    assert v["cache"]["cpu"]["x_off"] is None                        # no "off" variant in this run
    # the cache removes the teacher's part of the FLOPs; the yardstick is the mean of start and end
    assert v["cache"]["step_flops"] == 300.0 and v["plain"]["step_flops"] == 400.0
    # the tuned loops precompute the teacher's outputs: its whole forward is not theirs
    flops = {**results["flops"], "teacher_forward": 120.0}
    assert bench_report._teacher_flops_skipped("tuned-cpu", flops) == 120.0
    assert v["all"]["wall"]["frac_bf16"] == pytest.approx(300 / 3 / 400)
    assert v["all"]["cpu"]["frac_bf16"] == pytest.approx(300 / 6 / 200)
    verdicts = {t["name"]: t["verdict"] for t in s["targets"]}
    assert verdicts == {"distill, all on, x plain fp32 loop": "FAIL",
                        "teacher cache alone, x plain fp32 loop": "FAIL",
                        "linear probe 60,000 x 512": "PASS",
                        "k-NN 10,000 vs 60,000 x 512": "FAIL",
                        "our fastest variant, x the tuned hand-written loop": "not measured",
                        "train.compile (all) x the same without it (fast)": "not measured",
                        "training step (all on) FLOP/s / bf16 matmul FLOP/s": "FAIL"}
    # with the tuned loop and the uncompiled variant measured (tuned 2 s, fast 2.3 s per step; then both 6 s):
    # ours at its fastest against tuned, and all (3 s) against fast
    for tuned_s, fast_s, verdict in (([0.5, 1.5], [0.8, 1.8], "FAIL"), ([4.0, 6.0], [4.0, 6.0], "PASS")):
        results = _fake_run(plain_s=[4.0, 6.0], variant_s={"cache": [3.0, 5.0], "all": [1.0, 3.0]})
        for r, rnd in enumerate(results["distill"]):
            rnd["order"] += ["tuned", "fast"]
            for key, secs in (("tuned", tuned_s), ("fast", fast_s)):
                rnd["results"][key] = {**rnd["results"]["all"], "step_s": [9.0, secs[r], secs[r] + 2]}
                rnd["results"][key]["cpu_s"] = [2 * x for x in rnd["results"][key]["step_s"]]
        got = {t["name"]: t["verdict"] for t in bench_report.summarize(results)["targets"]}
        assert got["our fastest variant, x the tuned hand-written loop"] == verdict
        assert got["train.compile (all) x the same without it (fast)"] == verdict
    # where both tuned loops ran, ours is held to the faster one (here the CPU loop: 0.5 s against tuned's 4 s)
    for r, rnd in enumerate(results["distill"]):
        rnd["order"] += ["tuned-cpu"]
        rnd["results"]["tuned-cpu"] = {**rnd["results"]["all"], "step_s": [9.0, 0.5, 0.5]}
        rnd["results"]["tuned-cpu"]["cpu_s"] = [2 * x for x in rnd["results"]["tuned-cpu"]["step_s"]]
    (row,) = [t for t in bench_report.summarize(results)["targets"] if t["name"].startswith("our fastest")]
    assert row["verdict"] == "FAIL" and "(against tuned-cpu)" in row["shown"], row
