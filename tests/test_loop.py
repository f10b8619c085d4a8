"""The training loop's own promises: device-side metrics equal a direct per-step computation, a record
every train.log_every steps carries that step's values, divergence is found at its exact step, and the
fast-path options refuse what they cannot do."""
import math
import sys

import pytest
import torch

from randteach.config import ConfigError
from randteach.errors import UserError
from randteach.init import parameter_distance, parameter_norm, total_grad_norm
from randteach.losses import distill_loss
from randteach.optim import build_optimizer
from randteach.runs.checkpoint import load_checkpoint, load_state_dict
from randteach.runs.rundir import RunDir
from randteach.train.distributed import Dist
from randteach.train.loop import distill
from randteach.train.setup import build_teacher_and_student, epoch_order, load_training_inputs, seeds
from randteach.train.state import Plan, TrainState, check_every_rank_has_rows, check_sync_bn_chunks

from tiny import tiny_config

SHORT = dict(init__mode="independent", train__max_steps=6, data__n_samples=200, probe__which="[]",
             train__probe_every=0, train__checkpoint_every=0, train__batch_size=64, optim__name="sgd", optim__lr=0.5)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _run(tmp_path, name, **overrides):
    cfg = tiny_config(tmp_path, out=str(tmp_path / name), **{**SHORT, **overrides})
    return cfg, distill(cfg, progress=False), RunDir(cfg.run_dir()).steps()


def _direct_steps(cfg, n_steps):
    """The distillation step written out by hand: the values the loop must log."""
    torch.manual_seed(cfg.train.seed)
    inputs, preprocess, data, size = load_training_inputs(cfg)
    teacher, student = build_teacher_and_student(cfg, data.images.shape[1], size)
    init = [p.detach().clone() for p in student.parameters()]
    teacher.requires_grad_(False)
    optimizer = build_optimizer(cfg.optim, student.parameters())
    out, batch, per_epoch = [], cfg.train.batch_size, math.ceil(len(inputs) / cfg.train.batch_size)
    for step in range(n_steps):
        epoch, offset = divmod(step, per_epoch)
        x = preprocess(inputs[epoch_order(len(inputs), seeds(cfg)["data"], epoch)[offset * batch:(offset + 1) * batch]])
        optimizer.zero_grad()
        loss = distill_loss(cfg.loss.name, student(x), teacher(x).detach())
        loss.backward()
        grad = float(total_grad_norm(student.parameters()))
        optimizer.step()
        dist_init = math.sqrt(sum(float((p.detach() - q).double().pow(2).sum()) for p, q in zip(student.parameters(), init)))
        out.append({"loss": float(loss.detach()), "grad_norm": grad, "dist_teacher": parameter_distance(student, teacher),
                    "dist_init": dist_init})
    return out


def test_device_metrics_equal_a_direct_per_step_computation(tmp_path):
    cfg, _, steps = _run(tmp_path, "every", train__log_every=1)
    assert [s["step"] for s in steps] == list(range(1, 7)) and all(s["event"] == "step" for s in steps)
    for logged, direct in zip(steps, _direct_steps(cfg, 6)):
        for k, v in direct.items():
            assert logged[k] == pytest.approx(v, rel=1e-5), k


def test_a_record_every_log_every_steps_carries_that_steps_values(tmp_path):
    _, _, every = _run(tmp_path, "every", train__log_every=1)
    _, result, sparse = _run(tmp_path, "sparse", train__log_every=4)
    assert [s["step"] for s in sparse] == [4, 6]                   # every 4th step and the last
    by_step = {s["step"]: s for s in every}
    for s in sparse:
        for k in ("loss", "grad_norm", "dist_teacher", "dist_init", "lr"):
            assert s[k] == by_step[s["step"]][k], k                # same computation, read later
    assert sparse[0]["loss_mean"] == pytest.approx(sum(by_step[i]["loss"] for i in range(1, 5)) / 4, rel=1e-12)
    assert sparse[1]["loss_mean"] == pytest.approx((by_step[5]["loss"] + by_step[6]["loss"]) / 2, rel=1e-12)
    # final_loss: the mean of the last epoch (4 steps per epoch: steps 5 and 6), not one batch's loss
    assert result.summary["final_loss"] == pytest.approx((by_step[5]["loss"] + by_step[6]["loss"]) / 2, rel=1e-12)


def test_loss_mean_keeps_the_steps_read_between_records(tmp_path):
    """A checkpoint every half epoch (2 steps) reads the window between the records at steps 4 and 6: every
    step still counts in the next record's loss_mean."""
    _, _, every = _run(tmp_path, "every", train__log_every=1)
    by_step = {s["step"]: s["loss"] for s in every}
    _, _, sparse = _run(tmp_path, "sparse", train__log_every=4, train__checkpoint_every=0.5)
    assert [s["step"] for s in sparse] == [4, 6]
    assert sparse[0]["loss_mean"] == pytest.approx(sum(by_step[i] for i in range(1, 5)) / 4, rel=1e-12)
    assert sparse[1]["loss_mean"] == pytest.approx((by_step[5] + by_step[6]) / 2, rel=1e-12)


class _Killed(Exception):
    pass


def _killed_after_checkpoint(monkeypatch, step: int, start) -> None:
    """Runs `start()` until the checkpoint of `step` is written, then ends it as a kill would."""
    state_module = sys.modules["randteach.train.state"]  # where the loop writes its checkpoints
    real_save = state_module.save_checkpoint

    def save_then_die(payload, path):
        real_save(payload, path)
        if payload.get("step") == step:
            raise _Killed

    monkeypatch.setattr(state_module, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        start()
    monkeypatch.undo()


def test_a_run_killed_mid_epoch_resumes_its_loss_sums(tmp_path, monkeypatch):
    """Killed right after the checkpoint of step 5 (the first of epoch 1): the resumed run's final loss is
    still the mean of steps 5 and 6, and its last record's loss_mean still counts step 5."""
    _, ref, ref_steps = _run(tmp_path, "ref", train__log_every=3, train__checkpoint_every=0.25)
    _killed_after_checkpoint(monkeypatch, 5, lambda: _run(tmp_path, "cut", train__log_every=3,
                                                          train__checkpoint_every=0.25))
    cfg, resumed, steps = _run(tmp_path, "cut", train__log_every=3, train__checkpoint_every=0.25)
    assert resumed.summary["final_loss"] == ref.summary["final_loss"]
    assert [(s["step"], s["loss_mean"]) for s in steps] == [(s["step"], s["loss_mean"]) for s in ref_steps]


@pytest.mark.parametrize("log_every", [1, 7])
def test_divergence_is_found_at_its_exact_step(tmp_path, log_every):
    # SGD at 1e12 with MSE: the loss overflows after a few steps; the step must not depend on log_every.
    _, result, steps = _run(tmp_path, f"d{log_every}", optim__lr=1e12, loss__name="mse", train__max_steps=40,
                            train__epochs=20, train__checkpoint_every=1 / 4, train__log_every=log_every)
    s = result.summary
    assert s["status"] == "diverged" and s["reason"] == "non-finite loss or gradient"
    _, _, reference = _run(tmp_path, "ref", optim__lr=1e12, loss__name="mse", train__max_steps=40, train__epochs=20,
                           train__log_every=1)
    first_bad = next(r["step"] for r in reference if not math.isfinite(float(r["loss"])) or
                     not math.isfinite(float(r["grad_norm"])))
    assert s["diverged_step"] == first_bad and s["steps"] == first_bad - 1
    assert not math.isfinite(float(steps[-1]["loss"])) or not math.isfinite(float(steps[-1]["grad_norm"]))
    assert steps[-1]["step"] == first_bad
    last = load_checkpoint(result.path / "checkpoints" / "last.pt")    # the last checkpoint is a finite one
    assert last["step"] < first_bad and all(torch.isfinite(v).all() for v in last["student"].values())


@pytest.mark.parametrize("log_every", [1, 5])
def test_non_finite_parameters_are_a_divergence_on_record(tmp_path, log_every):
    # a step size beyond float32's range: the first step's loss and gradient are finite, its update is not.
    # At log_every 5 the distances are read at step 5 only: step 2's NaN loss was recorded as the divergence.
    _, result, steps = _run(tmp_path, "p", init__mode="independent", optim__name="sgd", optim__lr=1e39,
                            train__log_every=log_every)
    s = result.summary
    assert (s["status"], s["reason"], s["diverged_step"], s["steps"]) == ("diverged", "non-finite parameters", 1, 1)
    last = steps[-1]  # non-finite values are logged as the strings "nan", "inf"
    assert last["step"] == 1 and math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"])
    if log_every == 1:
        assert not math.isfinite(float(last["dist_teacher"]))


def test_cuda_graphs_needs_compile_and_a_cuda_device(tmp_path):
    with pytest.raises(ConfigError, match="train.compile"):
        tiny_config(tmp_path, train__cuda_graphs=True)
    with pytest.raises(UserError, match="CUDA"):
        distill(tiny_config(tmp_path, train__device="cpu", train__compile=True, train__cuda_graphs=True, **{
            k: v for k, v in SHORT.items()}), progress=False)


def test_sync_bn_is_refused_off_cuda():
    with pytest.raises(UserError, match="sync_bn"):
        Dist(rank=0, world=2).wrap(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)), sync_bn=True)


def test_log_every_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="log_every"):
        tiny_config(tmp_path, train__log_every=0)


def _recording_compile(monkeypatch) -> list:
    """torch.compile through dynamo and AOTAutograd with the aot_eager backend (no inductor C++ build, which
    takes minutes on this CPU); returns the list the compiled FX graphs are appended to."""
    import functools
    from torch._dynamo import lookup_backend
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=recording))
    torch._dynamo.reset()
    return graphs


def test_compile_makes_one_graph_per_function_whatever_the_epochs(tmp_path, monkeypatch):
    # On a CPU train.compile compiles the loss and the teacher's head. Their compiled forms
    # run at the full batch's shapes only (200 images in batches of 64: three full batches and one of 8 per
    # epoch, the latter eager), so one graph each for any number of epochs; no graph holds a convolution (the
    # encoders stay eager there); losses equal eager's.
    counts = {}
    for epochs in (1, 3):
        graphs = _recording_compile(monkeypatch)
        _, _, compiled = _run(tmp_path, f"c{epochs}", train__compile=True, train__log_every=1, train__max_steps=1000,
                              train__epochs=epochs)
        counts[epochs] = len(graphs)
    torch._dynamo.reset()
    _, _, eager = _run(tmp_path, "eager", train__log_every=1, train__max_steps=1000, train__epochs=3)
    assert counts[1] == counts[3] == 2   # the loss (forward and backward in one graph), the teacher's head
    assert not any("conv" in str(n.target) for gm in graphs for n in gm.graph.nodes)
    assert [s["loss"] for s in compiled] == pytest.approx([s["loss"] for s in eager], rel=1e-4)


@pytest.mark.parametrize("overrides", [
    {"train__precision": "fp32"},
    {"train__precision": "bf16", "train__teacher_cache": "true"},
    {"train__precision": "bf16", "model__encoder": "vit_tiny"},
    {"train__precision": "bf16", "data__augment": "dino", "data__local_crops": 2},   # several views
])
def test_the_gpu_compile_scope_traces_whole_and_follows_eager(tmp_path, overrides):
    # On a GPU train.compile compiles the teacher's outputs and the student's loss whole. With fullgraph=True
    # (an error at any graph break) on the CPU's aot_eager backend: one graph each, eager's loss and gradients.
    from randteach.train.state import TrainState
    from randteach.train.loop import _attach_teacher_cache
    from randteach.train.step import _cached_targets, _views, _whole_step_compiled, build_step_functions
    cfg = tiny_config(tmp_path, **{**SHORT, "data__root": str(tmp_path / "root"), **overrides})
    state = TrainState.create_or_resume(cfg, RunDir(cfg.run_dir()).create(), Dist(), torch.device("cpu"))
    _attach_teacher_cache(state, progress=False)  # with train.teacher_cache, as the loop does
    fns = build_step_functions(state)
    rows = torch.arange(64)
    teacher_views, student_views = _views(state, rows)
    bf16 = cfg.train.precision == "bf16"

    def loss_and_grads(teacher_out, student_loss):
        state.student.zero_grad(set_to_none=True)
        t = teacher_out(torch.cat(teacher_views), _cached_targets(state, rows), bf16)
        loss = student_loss(student_views, list(t.split(len(rows))), bf16)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in state.student.parameters()]

    eager = loss_and_grads(fns.teacher_out, fns.student_loss)
    torch._dynamo.reset()
    whole = _whole_step_compiled(fns, lambda fn: torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False))
    compiled = loss_and_grads(*whole)
    torch._dynamo.reset()
    assert float(compiled[0]) == pytest.approx(float(eager[0]), rel=1e-6)
    # bf16: aot_eager's decomposed backward rounds a few bf16 products differently (measured: up to 3e-3)
    worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(compiled[1], eager[1]))
    assert worst <= (1e-2 if bf16 else 1e-6)


def test_the_compiled_teacher_gets_the_cached_rows_not_the_whole_table(tmp_path):
    # a tensor a compiled function reads becomes a graph input, which CUDA graphs copy at every replay: the
    # teacher cache's table (N x bottleneck) must stay outside, only the batch's rows go in
    from randteach.train.state import TrainState
    from randteach.train.loop import _attach_teacher_cache
    from randteach.train.step import _cached_targets, _views, _whole_step_compiled, build_step_functions
    cfg = tiny_config(tmp_path, **{**SHORT, "data__root": str(tmp_path / "root"), "train__teacher_cache": "true"})
    state = TrainState.create_or_resume(cfg, RunDir(cfg.run_dir()).create(), Dist(), torch.device("cpu"))
    _attach_teacher_cache(state, progress=False)  # with train.teacher_cache, as the loop does
    fns = build_step_functions(state)
    inputs = []

    def backend(gm, example_inputs):
        inputs.extend(x.shape for x in example_inputs if isinstance(x, torch.Tensor))
        return gm.forward

    torch._dynamo.reset()
    teacher_out, _ = _whole_step_compiled(fns, lambda fn: torch.compile(fn, backend=backend, fullgraph=True))
    rows = torch.arange(40)  # a shape no weight of the head has
    teacher_out(torch.cat(_views(state, rows)[0]), _cached_targets(state, rows), False)
    torch._dynamo.reset()
    assert state.targets is not None and (40, state.targets.shape[1]) in inputs and state.targets.shape not in inputs


def test_compile_waits_for_the_final_precision(tmp_path, monkeypatch):
    # A locality run at alpha = 1e-10 under bf16: the float64 start, then fp32 until the bf16 gate opens, then
    # bf16. The compiled forms run in the last phase only: still one graph per compiled function.
    graphs = _recording_compile(monkeypatch)
    _, summary, steps = _run(tmp_path, "phases", train__compile=True, train__log_every=1, train__precision="bf16",
                             init__mode="locality", init__alpha=1e-10, optim__name="adamw", optim__lr=1e-2,
                             train__max_steps=12, data__n_samples=256)
    assert summary.summary["status"] == "completed"
    assert not steps[0]["bf16"] and steps[-1]["bf16"]   # all three phases happened
    assert len(graphs) == 2                              # the loss and the teacher's head: once each




def test_centering_is_one_update_per_step_whatever_the_micro_batches(tmp_path):
    """DINO's center: every micro-batch centered by the step's center, one update from the whole batch, so
    train.micro_batch changes nothing but rounding (it moved the student 5e-2 when each chunk updated it)."""
    opts = dict(loss__center="true", train__log_every=1)
    students = []
    for name, micro in (("whole", None), ("micro", 16)):
        cfg, result, _ = _run(tmp_path, name, train__micro_batch=micro, **opts)
        students.append(load_state_dict(result.path))
    a, b = students
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    assert float(diff) <= 1e-6 * float(torch.cat([a[k].flatten() for k in a]).norm())
    center = torch.load(result.path / "checkpoints" / "last.pt", weights_only=False)["center"]
    assert center is not None and float(center.abs().max()) > 0


def test_sync_bn_refuses_micro_batches_that_differ_in_number_between_processes(tmp_path):
    # batch 256 over 3 processes: shards of 85 and 86 rows; micro 85 cuts them into 1 and 2 chunks, and
    # SyncBatchNorm's per-forward collectives would then hang (its collectives need CUDA, so the check is
    # tested directly)
    def plan(batch, micro, n=1024):
        return Plan.of(tiny_config(tmp_path, train__batch_size=batch, train__micro_batch=micro), n)
    with pytest.raises(UserError, match=r"shards of 85 and 86 images, cut into 1 and 2 micro-batches.*"
                                        r"--train.micro_batch 86"):
        check_sync_bn_chunks(plan(256, 85), 3)
    for batch, micro, world in ((256, 86, 3), (256, 32, 2), (256, 43, 3), (255, 85, 3)):
        check_sync_bn_chunks(plan(batch, micro), world)
    with pytest.raises(UserError, match="a batch of 4 images.*--train.micro_batch 85"):  # the last batch: 1, 2 rows
        check_sync_bn_chunks(plan(255, 1, n=259), 3)
    short = Plan.of(tiny_config(tmp_path, train__batch_size=255, train__micro_batch=1, train__max_steps=1), 259)
    check_sync_bn_chunks(short, 3)  # a run that ends before the epoch's last batch


@pytest.mark.parametrize("local_rank, visible, torchrun, gpu", [
    (0, 8, True, 0), (3, 8, True, 3), (1, 2, True, 1), (2, 2, True, None), (1, 1, True, None), (3, 1, False, 0)])
def test_each_process_takes_its_own_gpu(monkeypatch, local_rank, visible, torchrun, gpu):
    # no GPU here: the count torch would report is stood in for. torchrun's processes share the visible GPUs;
    # a process of another launcher that sees one GPU (srun --gpus-per-task=1) takes it whatever its rank
    from randteach.train.distributed import process_gpu
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    if gpu is None:
        with pytest.raises(UserError, match=f"rank {local_rank} but sees {visible} GPU.*--nproc_per_node {visible}"):
            process_gpu()
    else:
        assert process_gpu() == gpu


def test_a_data_parallel_run_refuses_a_batch_with_fewer_images_than_processes(tmp_path):
    """129 images in batches of 64 leave a last batch of 1: under 2 processes one would get no rows (its
    loss was NaN and the run was called diverged). Refused before training, with a size that works."""
    plan = Plan.of(tiny_config(tmp_path, train__batch_size=64), 129)
    with pytest.raises(UserError, match=r"holds 1 images, fewer than the 2 processes.*--data.n_samples 128"):
        check_every_rank_has_rows(plan, 2)
    check_every_rank_has_rows(plan, 1)
    check_every_rank_has_rows(Plan.of(tiny_config(tmp_path, train__batch_size=64), 130), 2)
    with pytest.raises(UserError, match=r"--train.batch_size 4"):
        check_every_rank_has_rows(Plan.of(tiny_config(tmp_path, train__batch_size=3), 129), 4)


def test_a_resumed_run_keeps_the_starting_teacher_norm_of_its_bf16_gate(tmp_path, monkeypatch):
    """An EMA teacher moves: the gate's scale ||theta_T|| is the start's, also after a resume."""
    opts = dict(teacher__mode="ema", teacher__ema_momentum=0.5, train__checkpoint_every=0.25)
    _killed_after_checkpoint(monkeypatch, 3, lambda: _run(tmp_path, "ema", **opts))
    cfg = tiny_config(tmp_path, out=str(tmp_path / "ema"), **{**SHORT, **opts})
    state = TrainState.create_or_resume(cfg, RunDir(cfg.run_dir()), Dist(), torch.device("cpu"))
    start = load_checkpoint(RunDir(cfg.run_dir()).checkpoints / "teacher.pt")["model"]
    start_norm = float(torch.cat([start[n].flatten().double() for n, _ in state.teacher.named_parameters()]).norm())
    assert state.step == 3 and state.teacher_norm == pytest.approx(start_norm, rel=1e-6)
    assert abs(parameter_norm(state.teacher) - start_norm) > 1e-4 * start_norm  # the teacher itself has moved


def test_a_resume_without_last_pt_is_refused_and_loses_nothing(tmp_path):
    """Resuming cannot continue without checkpoints/last.pt: it used to start over silently and replace the
    run's log; a resume of a folder that does not exist used to train a new run."""
    cfg = tiny_config(tmp_path, out=str(tmp_path / "cut"), **{**SHORT, "train__checkpoint_every": 0.5})
    run = RunDir(cfg.run_dir())
    distill(cfg, progress=False)
    run.summary_path.unlink()  # as if killed after step 6, before its summary
    (run.checkpoints / "last.pt").unlink()
    log = run.metrics_path.read_bytes()
    with pytest.raises(UserError, match=r"no checkpoints/last.pt.*student_init.pt.*without --resume"):
        distill(cfg, resume=True, progress=False)
    assert run.metrics_path.read_bytes() == log and run.summary() is None
    missing = tiny_config(tmp_path, out=str(tmp_path / "typo"), **SHORT)
    with pytest.raises(UserError, match="cannot resume"):
        distill(missing, resume=True, progress=False)
    assert not (tmp_path / "typo").exists()
