"""Stacked runs (randteach.train.stacked, `randteach sweep --stack K`): each run of a stack ends where the same
run trained alone ends, keeps its own run directory, falls back to a solo run when it cannot be stacked,
and resumes after a SIGKILL."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from randteach.errors import UserError
from randteach.runs.checkpoint import load_checkpoint, load_state_dict, save_checkpoint
from randteach.runs.rundir import RunDir
from randteach.runs.sweep import expand, load_sweep, run_sweep
from randteach.train.loop import distill
from randteach.train.stacked import stack_groups, train_stacked, why_not_stackable

from tiny import TINY, tiny_config

# 20 steps, k-NN probes of the student on small probe subsets: seconds per run.
FAST = {"train__max_steps": 20, "train__probe_every": 0, "probe__linear": "none", "probe__which": "[student]",
        "probe__n_train": 200, "probe__n_test": 100}
# alpha >= 0.1: a run at alpha = 1e-10 starts in float64 and therefore trains alone (tested below).
VARIED = [{"train__seed": 0, "init__alpha": 0.5, "optim__lr": 1e-3},
          {"train__seed": 1, "init__alpha": 0.1, "optim__lr": 3e-3, "optim__weight_decay": 0.05},
          {"train__seed": 2, "init__alpha": 1.0, "optim__lr": 5e-4}]
RTOL = 1e-5


def assert_same_student(a: Path, b: Path, rtol: float = RTOL) -> None:
    """||theta_a - theta_b|| <= rtol ||theta_a|| over all the student's parameters (a zero-initialized bias
    of 8 entries alone can sit at a few 1e-5 relative after 20 Adam steps)."""
    sa, sb = load_state_dict(a), load_state_dict(b)
    assert sa.keys() == sb.keys()
    diff = torch.cat([(sa[k] - sb[k]).flatten() for k in sa]).norm()
    err = float(diff / torch.cat([sa[k].flatten() for k in sa]).norm())
    assert err <= rtol, f"relative difference {err:.2e}"


@pytest.mark.parametrize("optim", [{"optim__name": "adamw"}, {"optim__name": "sgd", "optim__momentum": 0.9},
                                   {"optim__name": "adamw", "train__teacher_cache": "true"},
                                   # group norms (folded into the channels in a stack); SGD, since Adam's
                                   # per-weight normalization lifts the rounding of a deeper net to ~5e-5 in 20 steps
                                   # (batches of 32: the two ResNet20 cases were a tenth of the suite's time)
                                   {"optim__name": "sgd", "optim__momentum": 0.9, "model__encoder": "resnet20",
                                    "model__norm": "group", "train__batch_size": 32},
                                   # batch norm: each run's batch statistics and running averages (compared too)
                                   {"optim__name": "sgd", "optim__momentum": 0.9, "model__encoder": "resnet20",
                                    "train__batch_size": 32}])
def test_each_run_of_a_stack_matches_the_same_run_trained_alone(tmp_path, optim):
    stacked = [tiny_config(tmp_path / f"stack{i}", **FAST, **optim, **v) for i, v in enumerate(VARIED)]
    summaries = train_stacked(stacked, mode="vmap")
    assert [s["status"] for s in summaries] == ["completed"] * 3
    for i, (cfg, v) in enumerate(zip(stacked, VARIED)):
        solo = distill(tiny_config(tmp_path / f"solo{i}", **FAST, **optim, **v), progress=False)
        run = RunDir(cfg.run_dir())
        assert_same_student(solo.path, run.path)
        solo_state, stacked_state = load_state_dict(solo.path), load_state_dict(run.path)
        # batch norm's running averages, buffer by buffer (each run's own: another run's differ at O(1));
        # normalizing by batch statistics lifts the stack's last-bit differences, measured up to 2e-5
        for name in [k for k in solo_state if "running_" in k or "num_batches" in k]:
            a, b = stacked_state[name].double(), solo_state[name].double()
            assert (a - b).norm() <= 1e-4 * b.norm(), name
        for name in ("teacher.pt", "student_init.pt", "last.pt", "student.pt"):
            assert (run.checkpoints / name).is_file()
        assert load_state_dict(run.path, "teacher").keys() == load_state_dict(solo.path, "teacher").keys()
        steps = [r for r in run.records() if "loss" in r]
        solo_steps = [r for r in RunDir(solo.path).records() if "loss" in r]
        assert [r["step"] for r in steps] == [r["step"] for r in solo_steps] == list(range(1, 21))
        assert steps[-1]["lr"] == solo_steps[-1]["lr"] == float(v["optim__lr"])
        # the KL (the default loss) is a difference of fp32 sums near ln(m): absolute rounding about 1e-7
        assert steps[0]["loss"] == pytest.approx(solo_steps[0]["loss"], rel=1e-5, abs=1e-6)
        assert len(run.probes()) == 2 and summaries[i]["config_digest"] == cfg.digest()
        # A checkpoint holds this run's tensors only, not the whole stack.
        assert load_checkpoint(run.checkpoints / "student.pt")["model"]["head.lin2.weight"].untyped_storage().nbytes() \
            == 64 * 16 * 4


@pytest.mark.parametrize("encoder", [{"model__encoder": "mlp"}, {"model__encoder": "vgg11"},
                                     {"model__encoder": "vit_tiny"}])  # ResNets: the test above
def test_every_encoder_family_stacks_to_its_solo_run_under_sgd(tmp_path, encoder):
    # SGD passes rounding differences on as they are (Adam's per-weight normalization lifts them in the first
    # steps of a deep net), so the stacked layers themselves must match to float precision.
    common = {**FAST, "train__max_steps": 5, "probe__which": "[]", "optim__name": "sgd", "optim__momentum": 0.9,
              "init__alpha": 0.5, **encoder}
    train_stacked([tiny_config(tmp_path / f"stack{i}", **common, train__seed=i) for i in range(2)], mode="vmap")
    solo = distill(tiny_config(tmp_path / "solo", **common, train__seed=1), progress=False)
    stacked = Path(tiny_config(tmp_path / "stack1", **common, train__seed=1).run_dir())
    assert_same_student(solo.path, stacked, 1e-6)
    assert RunDir(stacked).probes() == RunDir(solo.path).probes() == []  # probe.which [] logs no probe record


def test_clipping_divergence_and_windowed_logging_in_a_stack_follow_the_solo_runs(tmp_path):
    # One run clips its gradients, one diverges (lr 1e30: the parameters overflow within a few steps), one's
    # first update leaves non-finite weights behind a finite loss and gradient (lr 1e39, above float32's range:
    # found at step 1, not at the NaN loss of step 2), records are written every 5 steps: each run's records,
    # status, reason and diverged step are those of its solo twin.
    varied = [{"train__seed": 0, "init__alpha": 0.5, "optim__grad_clip": 1e-3},
              {"train__seed": 1, "init__alpha": 0.5, "optim__lr": 1e30},
              {"train__seed": 2, "init__alpha": 0.5},
              {"train__seed": 3, "init__alpha": 0.5, "optim__lr": 1e39}]
    common = {**FAST, "train__log_every": 5}
    summaries = train_stacked([tiny_config(tmp_path / f"stack{i}", **common, **v) for i, v in enumerate(varied)],
                              mode="vmap")
    assert (summaries[3]["reason"], summaries[3]["diverged_step"]) == ("non-finite parameters", 1)
    for i, v in enumerate(varied):
        solo = distill(tiny_config(tmp_path / f"solo{i}", **common, **v), progress=False)
        stacked_run = RunDir(tiny_config(tmp_path / f"stack{i}", **common, **v).run_dir())
        for key in ("status", "steps", "diverged_step", "reason"):
            assert summaries[i].get(key) == solo.summary.get(key), key
        mine, theirs = ([r for r in RunDir(p).records() if r.get("event") == "step"] for p in (stacked_run.path, solo.path))
        assert [r["step"] for r in mine] == [r["step"] for r in theirs]
        for a, b in zip(mine, theirs):
            for key in ("loss", "grad_norm", "loss_mean"):
                x, y = a.get(key), b.get(key)
                if isinstance(y, float):  # non-finite values are logged as strings ("nan", "inf")
                    assert x == pytest.approx(y, rel=1e-4), (i, a["step"], key)
                else:
                    assert x == y, (i, a["step"], key)
        if summaries[i]["status"] == "completed":
            assert_same_student(solo.path, stacked_run.path)
    assert [s["status"] for s in summaries] == ["completed", "diverged", "completed", "diverged"]
    clipped = [r["grad_norm"] for r in RunDir(tiny_config(tmp_path / "stack0", **common, **varied[0]).run_dir()).steps()]
    assert min(clipped) > 1e-3  # the norms logged are before clipping, and clipping was active on every step


def test_runs_with_equal_optimizer_settings_share_one_step_with_each_runs_own_arithmetic(tmp_path):
    from randteach.optim import build_optimizer
    from randteach.train.stacked import _Group, _group_step
    cfgs = [tiny_config(tmp_path / f"r{i}", **FAST, train__seed=i, init__alpha=0.5, optim__lr=lr)
            for i, lr in enumerate([1e-3, 1e-3, 3e-3, 1e-3])]
    g = _Group(cfgs)
    assert [[r.cfg.train.seed for r in members] for _, members in g.optimizers] == [[0, 1, 3], [2]]
    g.runs[3].status = "diverged"  # a finished run: the shared step must leave its parameters alone
    before = [{n: p.detach().clone() for n, p in r.student.named_parameters()} for r in g.runs]
    _group_step(g)
    for k, r in enumerate(g.runs[:3]):  # each run's own optimizer, stepped alone on a copy: bitwise the same
        twin = {n: p.clone().requires_grad_() for n, p in before[k].items()}
        for n, p in twin.items():
            p.grad = r.student.get_parameter(n).grad.clone()
        build_optimizer(r.cfg.optim, twin.values()).step()
        assert all(torch.equal(p, twin[n]) for n, p in r.student.named_parameters())
        assert r.optimizer.state_dict()["state"].keys() == set(range(len(twin)))  # its own entries only
    assert all(torch.equal(p, before[3][n]) for n, p in g.runs[3].student.named_parameters())


def test_a_solo_resume_continues_a_stacked_checkpoint(tmp_path):
    # last.pt of a stacked run has the solo format: `distill --resume` finishes a run that a stack began.
    half = [tiny_config(tmp_path / f"stack{i}", **{**FAST, "train__max_steps": 10}, **v)
            for i, v in enumerate(VARIED[:2])]
    train_stacked(half, mode="vmap")
    cfg = tiny_config(tmp_path / "stack0", **FAST, **VARIED[0])
    (Path(cfg.run_dir()) / "summary.json").unlink()
    last = Path(cfg.run_dir()) / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["config_digest"] == half[0].digest()  # what a solo resume checks
    # as a 20-step stack stopped at step 10 leaves it
    save_checkpoint({**load_checkpoint(last), "config_digest": cfg.digest()}, last)
    edited = tiny_config(tmp_path / "stack0", **FAST, **{**VARIED[0], "optim__lr": 0.5})
    (Path(cfg.run_dir()) / "config.yaml").write_text(edited.to_yaml())
    with pytest.raises(UserError, match="config.yaml was changed after the run started"):  # as a solo run's
        distill(edited, resume=True, progress=False)
    (Path(cfg.run_dir()) / "config.yaml").write_text(cfg.to_yaml())
    assert distill(cfg, resume=True, progress=False).summary["steps"] == 20
    solo = distill(tiny_config(tmp_path / "solo", **FAST, **VARIED[0]), progress=False)
    assert_same_student(solo.path, Path(cfg.run_dir()))


def test_runs_that_differ_in_structure_or_use_unstackable_features_are_grouped_apart(tmp_path):
    far = {"init__alpha": 0.5}
    cfgs = [tiny_config(tmp_path / "a", **VARIED[0]), tiny_config(tmp_path / "b", **VARIED[1]),
            tiny_config(tmp_path / "c", model__width=16, **far), tiny_config(tmp_path / "d", **VARIED[2]),
            tiny_config(tmp_path / "e", teacher__mode="ema", **far),
            tiny_config(tmp_path / "f", model__encoder="resnet20", **far),
            tiny_config(tmp_path / "g", model__encoder="resnet20", model__norm="layer", **far),
            tiny_config(tmp_path / "h", **{**VARIED[0], "init__alpha": 1e-10})]
    groups, alone = stack_groups(cfgs, 2, "vmap")
    assert groups == [[0, 1], [2], [3], [4], [5], [6], [7]]
    assert set(alone) == {4, 7} and "teacher.mode=ema" in alone[4]
    assert why_not_stackable(cfgs[5], "vmap") is None and why_not_stackable(cfgs[6], "vmap") is None  # batch, layer norm
    bf16 = tiny_config(tmp_path / "i", train__precision="bf16", **far)
    assert "--train.precision fp32" in why_not_stackable(bf16, "vmap")
    # the stacked step feeds each run its images as they are: an augmented run trains alone (stacked, its
    # augmentation was silently skipped)
    assert "data.augment=flip-crop" in why_not_stackable(tiny_config(tmp_path / "j", data__augment="flip-crop",
                                                                      train__teacher_cache=False, **far), "vmap")
    with pytest.raises(Exception, match="cannot be stacked"):
        train_stacked([cfgs[4]], mode="vmap")


@pytest.mark.parametrize("init, stackable", [
    ({"init__alpha": 1e-10}, False), ({"init__alpha": 1e-4}, False), ({"init__alpha": 0.01}, True),
    ({"init__mode": "neighborhood", "init__epsilon": 1e-10}, False),
    ({"init__mode": "neighborhood", "init__epsilon": 0.1}, True),
    ({"init__alpha": 1e-10, "train__float64_until_distance": 0}, True),   # fp32 start asked for: stacks
    ({"init__mode": "independent"}, True)])
def test_a_run_that_starts_in_float64_trains_alone(tmp_path, init, stackable):
    # A stack holds one dtype, so a student within float64 reach of its teacher would lose its 1e-10
    # residue to fp32 rounding in a stack, and with it the escape its solo run makes.
    why = why_not_stackable(tiny_config(tmp_path / "r", **init), "vmap")
    assert (why is None) == stackable
    if not stackable:
        assert "float64" in why


def test_a_run_that_starts_in_float64_and_its_solo_twin_agree_in_a_stacked_sweep(tmp_path):
    # The alpha = 1e-10 run of a stacked sweep is trained alone, in float64 at first, so it is the solo run.
    # The solo twin runs in a sweep worker too: a student this close to its teacher amplifies any rounding
    # difference, and a worker's thread count (the cores per worker) may differ from this process's.
    path = _write_sweep(tmp_path, SWEEP_BASE, grid={"init.alpha": [1e-10, 0.5]}, seeds=[0])
    assert [r["status"] for r in run_sweep(expand(load_sweep(path)), stack=2, stack_mode="vmap")] == ["completed"] * 2
    near = next(c for c in expand(load_sweep(path)) if c.init.alpha == 1e-10)
    (solo,) = run_sweep([tiny_config(tmp_path / "solo", **FAST, init__alpha=1e-10)])
    assert_same_student(Path(solo["run_dir"]), Path(near.run_dir()))
    assert any(r.get("event") == "precision" for r in RunDir(near.run_dir()).records())


def _write_sweep(tmp_path, base: dict, **spec) -> Path:
    doc = {"preset": "cpu", "name": "s", "base": base, "out": str(tmp_path / "runs"), **spec}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# alpha = 0.5: stackable (a run at alpha = 1e-10 starts in float64 and trains alone)
SWEEP_BASE = {**TINY, **{k.replace("__", "."): v for k, v in FAST.items()}, "init.alpha": 0.5}


def test_sweep_stack_trains_stackable_runs_together_and_the_rest_alone(tmp_path, capsys):
    path = _write_sweep(tmp_path, SWEEP_BASE, grid={"teacher.mode": ["frozen", "ema"]}, seeds=[0, 1])
    results = run_sweep(expand(load_sweep(path)), stack=4, stack_mode="vmap")
    err = capsys.readouterr().err
    assert [r["status"] for r in results] == ["completed"] * 4
    assert "as 1 stack of up to 4 (vmap) and 2 runs alone" in err   # the two frozen runs together, each EMA run alone
    assert err.count("not stacked:") == 2 and "teacher.mode=ema" in err
    assert "note: on a CPU a vmap stack pays only" in err          # the measured advice, once
    from randteach.cli import main
    assert main(["report", str(tmp_path / "runs")]) == 0          # stacked and solo runs read alike
    assert "| frozen |" in (tmp_path / "runs" / "report.md").read_text()


def test_killed_stacked_sweep_resumes_every_run_from_its_own_checkpoint(tmp_path):
    # SIGKILL of the whole sweep (parent and worker: nothing can checkpoint on the way out) once a
    # checkpoint exists; the re-run resumes each run from its last.pt and ends where solo runs end.
    base = {**SWEEP_BASE, "train.max_steps": 20, "train.checkpoint_every": 0.2, "init.alpha": 0.5}
    path = _write_sweep(tmp_path, base, seeds=[0, 1, 2])
    root = tmp_path / "runs"
    log = open(tmp_path / "s.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "randteach.cli", "sweep", str(path), "--stack", "3"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while not list(root.glob("*/checkpoints/last.pt")):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "s.log").read_text()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = {p.parent.parent: int(load_checkpoint(p)["step"]) for p in root.glob("*/checkpoints/last.pt")}
    assert any(step < 20 for step in killed_at.values())

    results = run_sweep(expand(load_sweep(path)), stack=3)
    assert [r["status"] for r in results] == ["completed"] * 3
    for cfg in expand(load_sweep(path)):
        run = RunDir(cfg.run_dir())
        assert [r["step"] for r in run.records() if "loss" in r] == list(range(1, 21))   # each step logged once
        solo = cfg
        solo.out = str(tmp_path / "solo" / Path(cfg.run_dir()).name)
        assert_same_student(distill(solo, progress=False).path, run.path)


@pytest.mark.parametrize("args, message", [(["--stack", "0"], "--stack must be at least 1"),
                                           (["--stack", "2", "--launcher", "slurm"], "--launcher local only"),
                                           (["--stack", "2", "--stack-mode", "vamp"],
                                            "--stack-mode vamp: expected one of auto, vmap, threads"),
                                           (["--stack-mode", "vmap"], "add --stack K (K > 1)"),
                                           (["--workers", "2", "--launcher", "slurm"],
                                            "--workers works with --launcher local only")])
def test_bad_stack_option_is_a_clear_error(tmp_path, capsys, args, message):
    from randteach.cli import main
    path = _write_sweep(tmp_path, SWEEP_BASE, seeds=[0, 1])
    assert main(["sweep", str(path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()                      # nothing started


def _hold_lock(run: Path, seconds: float) -> subprocess.Popen:
    """A real second process that holds `run`'s lock for `seconds` (as another sweep training it would)."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; from randteach.runs.rundir import run_lock\n"
                               f"with run_lock({str(run)!r}, create=True):\n    print('held', flush=True); "
                               f"time.sleep({seconds})"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("stacked", [False, True])
def test_a_sweep_waits_for_a_run_another_process_trains_instead_of_failing_it(tmp_path, capsys, stacked):
    """Two sweeps or experiments sharing runs: the second waits for the first's run, then takes it as left
    (here: nothing was written, so it trains it), where it used to report it "failed"."""
    from randteach.runs.sweep import run_one, run_stacked
    cfgs = [tiny_config(tmp_path / f"r{i}", **FAST, **v) for i, v in enumerate(VARIED[:2])]
    holder = _hold_lock(Path(cfgs[1].run_dir()), 3)
    t0 = time.perf_counter()
    results = run_stacked(cfgs) if stacked else [run_one(cfgs[1])]
    holder.wait(timeout=30)
    assert all(r["status"] == "completed" for r in results), results
    assert time.perf_counter() - t0 >= 2  # it waited for the holder
    assert "waiting:" in capsys.readouterr().err and "in use by another randteach process" not in str(results)


@pytest.mark.parametrize("mode", ["vmap", "threads"])
def test_a_run_another_process_holds_leaves_the_rest_of_its_stack_training(tmp_path, mode):
    """A real second process holds one run's lock: that run is reported and left untouched (nothing written
    into its folder), the other runs of the stack train."""
    from randteach.runs.sweep import record_failure
    cfgs = [tiny_config(tmp_path / f"r{i}", **FAST, **v) for i, v in enumerate(VARIED[:2])]
    busy = Path(cfgs[1].run_dir())
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from randteach.runs.rundir import run_lock\n"
                               f"with run_lock({str(busy)!r}, create=True):\n    print('held', flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        free, taken = train_stacked(cfgs, mode=mode)
        assert free["status"] == "completed"
        assert taken["status"] == "failed" and "in use by another randteach process" in taken["error"]
        record_failure(cfgs[1], taken["error"])  # as a sweep records a failed run
        assert sorted(p.name for p in busy.iterdir()) == [".lock"]
    finally:
        holder.communicate("", timeout=30)


# Side by side on threads (`--stack-mode threads`, the default on a CPU): runs a vmap stack cannot take too.
SIDE_BY_SIDE = [{"train__seed": 0, "init__alpha": 0.5, "optim__lr": 1e-3, "optim__grad_clip": 1e-3},
                {"train__seed": 1, "init__alpha": 1e-10},                    # starts in float64
                {"train__seed": 2, "init__alpha": 0.5, "optim__lr": 1e30},   # diverges
                {"train__seed": 3, "init__alpha": 1.0, "data__augment": "flip-crop", "train__teacher_cache": "false"}]


@pytest.fixture
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_runs_side_by_side_are_bitwise_their_solo_runs_on_one_thread(tmp_path, two_torch_threads):
    # Two torch threads: two lanes of one thread each, every run's steps on one of them. Each run is its solo
    # run with one torch thread, bit for bit: students, logged losses, gradient norms and probes, status, diverged step.
    common = {**FAST, "probe__which": "[student, input]", "train__log_every": 5}
    cfgs = [tiny_config(tmp_path / f"side{i}", **common, **v) for i, v in enumerate(SIDE_BY_SIDE)]
    assert all(why_not_stackable(c, "threads") is None for c in cfgs)
    summaries = train_stacked(cfgs, mode="threads")
    assert torch.get_num_threads() == 2  # the lanes' thread count is not left behind
    assert [s["torch_threads"] for s in summaries] == [1] * 4  # what each run's arithmetic ran with
    torch.set_num_threads(1)
    for i, (cfg, v) in enumerate(zip(cfgs, SIDE_BY_SIDE)):
        solo = distill(tiny_config(tmp_path / f"solo{i}", **common, **v), progress=False)
        for key in ("status", "steps", "diverged_step"):
            assert summaries[i].get(key) == solo.summary.get(key), (i, key)
        mine, theirs = (RunDir(p).records() for p in (cfg.run_dir(), solo.path))
        strip = lambda records: [{k: r[k] for k in r if k != "time"} for r in records]  # noqa: E731
        assert strip(mine) == strip(theirs), i
        if solo.summary["status"] == "completed":
            a, b = load_state_dict(solo.path), load_state_dict(cfg.run_dir())
            assert all(torch.equal(a[k], b[k]) for k in a), i
            last = load_checkpoint(Path(cfg.run_dir()) / "checkpoints" / "last.pt")
            assert torch.equal(last["rng"]["torch"], load_checkpoint(solo.path / "checkpoints" / "last.pt")["rng"]["torch"])
    assert [s["status"] for s in summaries] == ["completed", "completed", "diverged", "completed"]
    assert any(r.get("event") == "precision" for r in RunDir(cfgs[1].run_dir()).records())


def test_runs_side_by_side_step_on_lanes_of_their_share_of_the_torch_threads(tmp_path, two_torch_threads,
                                                                              monkeypatch):
    # Two torch threads, two runs: every step runs off the calling thread, with one torch thread.
    from randteach.train import loop
    seen = []
    step = loop.Training.step

    def noted(self):
        seen.append((threading.current_thread() is threading.main_thread(), torch.get_num_threads()))
        return step(self)
    monkeypatch.setattr(loop.Training, "step", noted)
    cfgs = [tiny_config(tmp_path / f"r{i}", **{**FAST, "probe__which": "[]"}, **v) for i, v in enumerate(VARIED[:2])]
    assert [s["status"] for s in train_stacked(cfgs, mode="threads")] == ["completed"] * 2
    assert seen == [(False, 1)] * 40


def test_a_side_by_side_stack_stops_every_run_on_sigterm_and_resumes_each(tmp_path):
    # SIGTERM to a sweep training two runs side by side and holding a third: the two checkpoint and end
    # "interrupted", the third, not begun, is "pending"; the re-run finishes all, each step logged once.
    base = {**SWEEP_BASE, "train.max_steps": 400, "train.epochs": 1000, "train.log_every": 1}
    path = _write_sweep(tmp_path, base, seeds=[0, 1, 2])
    root = tmp_path / "runs"
    log = open(tmp_path / "s.log", "ab")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "randteach.cli", "sweep", str(path), "--stack", "3",
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    while sum(1 for m in root.glob("*/metrics.jsonl") if m.stat().st_size > 0) < 2:
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "s.log").read_text()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 3, (tmp_path / "s.log").read_text()
    summaries = [s for s in (RunDir(d).summary() for d in sorted(root.iterdir()) if d.is_dir()) if s]
    assert [s["status"] for s in summaries] == ["interrupted"] * 2 and summaries[0]["steps"] < 400
    text = (tmp_path / "s.log").read_text()
    assert "side by side: 3 runs on 2 threads of 1 torch thread each\n" in text
    assert "2 interrupted, 1 pending" in text, text
    results = run_sweep(expand(load_sweep(path)), stack=3, workers=1)
    assert [r["status"] for r in results] == ["completed"] * 3
    for r in results:
        assert [s["step"] for s in RunDir(r["run_dir"]).steps()] == list(range(1, 401))  # each step logged once


@pytest.mark.parametrize("mode", ["auto", "threads", "vmap"])
def test_sweep_stack_mode_reaches_the_stacks(tmp_path, mode):
    # alpha = 1e-10 starts in float64: a vmap stack cannot hold it, a stack side by side can (auto: side by side
    # on a CPU). From the command line to the worker: each stacked run's summary says how it was trained, and the
    # worker says so as it starts (one torch thread here: the runs of a stack side by side train one by one).
    path = _write_sweep(tmp_path, SWEEP_BASE, grid={"init.alpha": [1e-10, 0.5]}, seeds=[0, 1])
    done = subprocess.run([sys.executable, "-m", "randteach.cli", "sweep", str(path), "--stack", "2", "--stack-mode",
                           mode], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = done.stderr
    assert done.returncode == 0, err
    assert ("not stacked:" in err and "float64" in err) == (mode == "vmap"), err
    assert ("stacked: 2 runs as one vmapped model" in err) == (mode == "vmap"), err
    assert ("side by side: 2 runs on 1 thread of 1 torch thread each (one after another)" in err) \
        == (mode != "vmap"), err
    far = [c for c in expand(load_sweep(path)) if c.init.alpha == 0.5]
    how = "vmap" if mode == "vmap" else "threads"
    assert [RunDir(c.run_dir()).summary()["stack"]["mode"] for c in far] == [how, how]


@pytest.mark.parametrize("mode", ["threads", "vmap"])
def test_a_run_that_cannot_start_in_a_stack_leaves_the_others_training(tmp_path, mode):
    # One run cannot start (its teacher checkpoint does not exist): it alone is recorded failed, with its error
    # (a vmap stack that raises trains its runs alone; it used to record the one error for every run, each time).
    from randteach.runs.sweep import run_stacked
    cfgs = [tiny_config(tmp_path / "ok", **FAST, **VARIED[0]),
            tiny_config(tmp_path / "bad", **FAST, **VARIED[1], init__teacher_checkpoint=str(tmp_path / "none.pt"))]
    ok, bad = run_stacked(cfgs, mode)
    assert ok["status"] == "completed" and bad["status"] == "failed" and "none.pt" in bad["error"]
    assert RunDir(cfgs[1].run_dir()).summary()["status"] == "failed"


def test_a_finished_run_leaves_its_threads_to_the_others(tmp_path, two_torch_threads):
    # Two torch threads, two runs of which one has finished: the other trains on one lane of both threads.
    cfgs = [tiny_config(tmp_path / f"r{i}", **{**FAST, "probe__which": "[]"}, **v) for i, v in enumerate(VARIED[:2])]
    torch.set_num_threads(1)
    distill(cfgs[0], progress=False)
    torch.set_num_threads(2)
    done, trained = train_stacked(cfgs, mode="threads")
    assert "stack" not in done and trained["stack"] == {"mode": "threads", "runs": 2, "lanes": 1, "torch_threads": 2}


def test_a_signal_side_by_side_stops_the_training_runs_and_leaves_the_waiting_ones(tmp_path, two_torch_threads,
                                                                                  monkeypatch):
    # Three runs on two lanes; a real SIGTERM to this process at the first run's fourth step: the two training
    # runs checkpoint and end "interrupted", the third has not begun and is "pending" (then resumes as new).
    from randteach.train import loop
    step = loop.Training.step

    def signalling(self):
        if self.state.cfg.train.seed == 0 and self.state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self)
    monkeypatch.setattr(loop.Training, "step", signalling)
    common = {**FAST, "probe__which": "[]", "train__max_steps": 300, "train__epochs": 1000}
    cfgs = [tiny_config(tmp_path / f"r{i}", **common, train__seed=i, init__alpha=0.5) for i in range(3)]
    summaries = train_stacked(cfgs, mode="threads")
    assert [s["status"] for s in summaries] == ["interrupted", "interrupted", "pending"], summaries
    assert summaries[2]["signal"] == "SIGTERM" and summaries[0]["steps"] < 300
    assert (Path(cfgs[0].run_dir()) / "checkpoints" / "last.pt").exists()
    assert not (Path(cfgs[2].run_dir()) / "checkpoints" / "last.pt").exists()


def test_runs_side_by_side_read_their_data_set_once(tmp_path, two_torch_threads, monkeypatch):
    # Two runs on the same data set side by side: one read (and one copy in memory), where alone each reads it.
    from randteach.data import registry
    reads = []
    load = registry.load_dataset

    def counted(*args, **kw):
        reads.append(args[:2])
        return load(*args, **kw)
    monkeypatch.setattr(registry, "load_dataset", counted)
    cfgs = [tiny_config(tmp_path / f"r{i}", **{**FAST, "probe__which": "[]"}, **v) for i, v in enumerate(VARIED[:2])]
    assert [s["status"] for s in train_stacked(cfgs, mode="threads")] == ["completed"] * 2
    assert reads == [("digits", "train")]
    distill(tiny_config(tmp_path / "alone", **{**FAST, "probe__which": "[]"}, **VARIED[0]), progress=False)
    assert len(reads) == 2  # outside a stack nothing is kept


def test_a_run_side_by_side_stopped_before_it_starts_ends_interrupted_at_step_0(tmp_path):
    # The stop flag set while the run computed its teacher cache: no probe, no step; a resumable checkpoint with
    # a wall time of this run's own (the clock started), and a re-run trains it from there.
    from randteach.train.callbacks import StopFlag
    from randteach.train.loop import opened, solo_loop
    cfg = tiny_config(tmp_path / "r", **FAST, **VARIED[0])
    stop = StopFlag()
    stop.signal = signal.SIGTERM
    with opened(cfg, progress=False, stop=stop) as training:
        status, steps, extra = solo_loop(training)
        summary = training.finish(status, steps, extra).summary
    assert (summary["status"], summary["steps"], extra["signal"]) == ("interrupted", 0, "SIGTERM")
    assert 0 <= load_checkpoint(Path(cfg.run_dir()) / "checkpoints" / "last.pt")["wall_time_s"] < 60
    assert RunDir(cfg.run_dir()).probes() == []
    assert distill(cfg, progress=False).summary["steps"] == 20
