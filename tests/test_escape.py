import json
from pathlib import Path

import pytest
import torch
import yaml

from randteach.analysis.escape import escape_variants, find_collapse, keep_collapse_checkpoint, run_escape
from randteach.config import config_from_dict
from randteach.errors import UserError
from randteach.runs.checkpoint import load_checkpoint
from randteach.runs.rundir import RunDir
from randteach.train.loop import distill

from tiny import tiny_config

# the escaping paper's simplified setting, tiny: conv net + one linear layer to 64, plain SGD, N-MSE,
# student at theta_T + 1e-10 theta_fresh
# The 1e-10 residue is held in float64 until the student has left (the float64 start, precision.py), so the
# escape follows the formula on any CPU. Pinned to the CPU to keep the suite's device fixed (CUDA: tests/test_gpu.py).
ESCAPE = dict(head__kind="linear", head__out_dim=64, init__mode="neighborhood", init__epsilon=1e-10, train__device="cpu",
              loss__name="nmse", optim__name="sgd", optim__lr=1e4, optim__momentum=0, train__precision="fp32",
              data__n_samples=256, probe__n_train=300, probe__n_test=200, probe__knn_k=0,
              probe__which="[teacher, student]")


def test_escape_sweep_end_to_end(tmp_path):
    cfg = tiny_config(tmp_path, **ESCAPE)
    r = run_escape(cfg, tmp_path / "escape", steps=12, probe_every_steps=4, lrs=(10.0, 1e4), batch_sizes=(),
                   stabilize=False, progress=False)
    assert [run["label"] for run in r["runs"]] == ["lr10", "lr10000"]
    saved = json.loads((tmp_path / "escape" / "escape.json").read_text())
    assert saved["runs"][1]["steps"]["step"] == list(range(1, 13))
    assert (tmp_path / "escape" / "escape_step_size.png").stat().st_size > 0
    for run in r["runs"]:
        assert run["status"] == "completed"
        assert [p["step"] for p in run["probes"]] == [0, 4, 8, 12]
        assert len(run["steps"]["grad_norm"]) == 12
        c = run["collapse"]
        assert c["step"] in (4, 8, 12) and c["checkpoint_step"] == c["step"]
        assert c["value"] == min(p["student"]["linear"] for p in run["probes"][1:])
        kept = load_checkpoint(f"{run['run']}/checkpoints/collapse.pt")
        assert kept["step"] == c["step"]
        assert json.loads((tmp_path / "escape" / "step_size" / run["label"] / "collapse.json").read_text())["step"] \
            == c["step"]
    small, large = (run["steps"]["dist_teacher"][-1] for run in r["runs"])
    assert large > 100 * small  # eta = 1e4 throws the student off the teacher; eta = 10 does not

    # exact=True: a deterministic re-run stopped at the collapse step reproduces the saved checkpoint bitwise
    run = r["runs"][1]
    c = config_from_dict(yaml.safe_load(RunDir(run["run"]).config_path.read_text()))
    exact = keep_collapse_checkpoint(c, run["run"], {"step": 8, "metric": "probe"}, exact=True)
    assert exact["how"].startswith("deterministic")
    rerun = load_checkpoint(f"{run['run']}/checkpoints/collapse.pt")["model"]
    saved8 = load_checkpoint(f"{run['run']}/checkpoints/student_step8.pt")["model"]
    assert all(torch.equal(rerun[k], saved8[k]) for k in saved8)

    # a second call redoes nothing: same runs, same collapse points; pruning keeps only what matters
    again = run_escape(cfg, tmp_path / "escape", steps=12, probe_every_steps=4, lrs=(10.0, 1e4), batch_sizes=(),
                       stabilize=False, prune_checkpoints=True, progress=False)
    assert [x["collapse"]["step"] for x in again["runs"]] == [x["collapse"]["step"] for x in r["runs"]]
    assert again["runs"][0]["collapse"] == r["runs"][0]["collapse"]
    for x in again["runs"]:
        ckpts = Path(x["run"]) / "checkpoints"
        assert not list(ckpts.glob("student_step*.pt")) and (ckpts / "collapse.pt").exists()


def test_keep_steps_saves_those_students_and_pruning_spares_them(tmp_path):
    # ESC Sec. 3 takes theta_S "after 100 epochs", a step of the run the cadence does not save
    cfg = tiny_config(tmp_path, **ESCAPE)
    r = run_escape(cfg, tmp_path / "escape", steps=8, probe_every_steps=4, lrs=(1e4,), batch_sizes=(),
                   stabilize=False, prune_checkpoints=True, keep_steps=[6], progress=False)
    ckpts = Path(r["runs"][0]["run"]) / "checkpoints"
    assert [p.name for p in ckpts.glob("student_step*.pt")] == ["student_step6.pt"]
    assert load_checkpoint(ckpts / "student_step6.pt")["step"] == 6 and r["keep_steps"] == [6]
    with pytest.raises(UserError, match="keep_steps are optimizer steps"):
        run_escape(cfg, tmp_path / "bad", steps=8, probe_every_steps=4, lrs=(1e4,), batch_sizes=(), stabilize=False,
                   keep_steps=[0.5], progress=False)


def _escape(tmp_path, precision, bf16_after=1e-3):
    cfg = tiny_config(tmp_path, **{**ESCAPE, "train__max_steps": 8, "train__precision": precision,
                                   "train__bf16_after_distance": bf16_after, "probe__which": "[]",
                                   "train__probe_every": 0, "out": str(tmp_path / precision)})
    distill(cfg, progress=False)
    steps = [r for r in RunDir(cfg.run_dir()).records() if "loss" in r]
    teacher = load_checkpoint(cfg.run_dir() / "checkpoints" / "teacher.pt")["model"]
    norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in teacher.values())))
    return steps, norm


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sgd_nmse_at_1e4_leaves_the_teacher(tmp_path, precision):
    # Escaping paper Sec. 2: from theta_T + 1e-10 theta~, SGD at eta = 1e4 on the (mean) N-MSE throws the
    # student off its teacher. The first gradient is the residue's (non-zero), held in float64 until the
    # student has left; under bf16 the loop also stays in fp32 until then, so the escape is the same.
    steps, teacher_norm = _escape(tmp_path, precision)
    assert steps[0]["loss"] < 1e-10 and steps[0]["dist_teacher"] < 1e-6 * teacher_norm
    assert steps[0]["grad_norm"] > 0
    assert max(s["loss"] for s in steps) > 1e-2
    assert steps[-1]["dist_teacher"] > 1e-2 * teacher_norm
    if precision == "bf16":
        assert not steps[0]["bf16"] and steps[-1]["bf16"]


def test_collapse_point_and_variants():
    probes = [{"step": 0, "student": {"linear": 0.8}}, {"step": 10, "student": {"linear": 0.5}},
              {"step": 20, "student": {"linear": 0.4}}, {"step": 30, "student": {"linear": 0.7}}]
    c = find_collapse(probes)
    assert (c["step"], c["value"], c["drop"], c["recovery"]) == (20, 0.4, pytest.approx(0.4), pytest.approx(0.3))
    assert find_collapse([], [{"step": 0, "erank": 9.0}, {"step": 5, "erank": 2.0}], "erank")["step"] == 5
    assert find_collapse(probes[:1]) is None
    v = escape_variants(lrs=(32,), batch_sizes=(256, 0), stabilize=True, warmup_steps=100)
    assert [x.label for x in v] == ["lr32", "batch256", "full-batch", "mse", "mse+warmup100", "ndmse",
                                    "ndmse+warmup100", "nmse", "nmse+warmup100"]
    assert v[2].overrides["train.batch_size"] == 0 and v[4].overrides["optim.schedule"] == "warmup"
    several = escape_variants(lrs=(), batch_sizes=(), stabilize_losses=("nmse",), warmup_steps=[100, 400])
    assert [(x.label, x.overrides.get("optim.warmup_steps")) for x in several] == [
        ("nmse", None), ("nmse+warmup100", 100), ("nmse+warmup400", 400)]


def test_group_steps_sets_each_groups_length(tmp_path):
    # the paper's step-size sweep runs 20k steps, its batch-size sweep 6k: one length per group
    cfg = tiny_config(tmp_path, **{**ESCAPE, "probe__which": "[]"})
    r = run_escape(cfg, tmp_path / "escape", steps=4, probe_every_steps=2, lrs=(1e4,), batch_sizes=(0,),
                   stabilize=False, group_steps={"batch_size": 2}, progress=False)
    lengths = {run["group"]: (run["max_steps"], run["steps"]["step"][-1]) for run in r["runs"]}
    assert lengths == {"step_size": (4, 4), "batch_size": (2, 2)}
    with pytest.raises(Exception, match="unknown groups"):
        run_escape(cfg, tmp_path / "bad", steps=4, probe_every_steps=2, group_steps={"nope": 3}, progress=False)


def test_early_probes_probe_and_keep_a_checkpoint_before_the_cadence(tmp_path):
    # ESC Fig. 1b: the loss spikes within three steps and the collapse follows; a sparse cadence steps over it
    cfg = tiny_config(tmp_path, **ESCAPE)
    r = run_escape(cfg, tmp_path / "escape", steps=8, probe_every_steps=4, lrs=(1e4,), batch_sizes=(0,),
                   stabilize=False, early_probes=(1, 2, 20), progress=False)
    for run in r["runs"]:  # batch 64 and the full batch: one step is another share of an epoch
        assert [p["step"] for p in run["probes"]] == [0, 1, 2, 4, 8]
        saved = sorted(int(p.stem.removeprefix("student_step")) for p in
                       (Path(run["run"]) / "checkpoints").glob("student_step*.pt"))
        assert saved == [1, 2, 4]
    assert r["early_probes"] == [1, 2, 20]
    with pytest.raises(Exception, match="whole numbers from 1"):
        run_escape(cfg, tmp_path / "bad", steps=4, probe_every_steps=2, early_probes=(0.5,), progress=False)
    with pytest.raises(Exception, match="whole numbers from 1"):
        run_escape(cfg, tmp_path / "bad", steps=4, probe_every_steps=2, early_probes=("ten",), progress=False)


def test_checkpoint_at_saves_the_student_at_those_epochs(tmp_path):
    cfg = tiny_config(tmp_path, **{**ESCAPE, "probe__which": "[]", "train__batch_size": 64,
                                   "train__checkpoint_every": 0, "train__checkpoint_at": "[0.25, 1.0]",
                                   "train__max_steps": 5})
    run = RunDir(distill(cfg, progress=False).path)  # 256 images, 4 steps an epoch
    assert sorted(p.name for p in run.checkpoints.glob("student_step*.pt")) == ["student_step1.pt",
                                                                                "student_step4.pt"]
