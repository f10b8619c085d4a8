"""The CUDA path of the loop: skipped where there is no GPU (CI has none); run on a GPU machine with
`python -m pytest tests/test_gpu.py` (and the whole suite with RANDTEACH_TEST_DEVICE=cuda)."""
import pytest
import torch

from randteach.precision import uses_bf16
from randteach.runs.checkpoint import load_checkpoint
from randteach.runs.rundir import RunDir
from randteach.train.loop import distill

from tiny import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHORT = {"train__max_steps": 6, "train__probe_every": 0, "probe__which": "[]", "init__mode": "independent"}


def _losses(tmp_path, name, **overrides):
    cfg = tiny_config(tmp_path, **{**SHORT, "out": str(tmp_path / name), **overrides})
    result = distill(cfg, progress=False)
    assert result.summary["status"] == "completed"
    return result, [r["loss"] for r in RunDir(result.path).records() if "loss" in r]


def test_cuda_run_follows_the_cpu_run(tmp_path):
    # cuDNN convolutions may use TF32, so agreement is to ~1e-2, not bitwise.
    _, cpu = _losses(tmp_path, "cpu", train__device="cpu")
    result, gpu = _losses(tmp_path, "gpu", train__device="cuda")
    assert result.summary["device"].startswith("cuda")
    assert result.summary["gpu"]["name"] == torch.cuda.get_device_name() and result.summary["gpu"]["visible_devices"]
    assert "gpu" not in _losses(tmp_path, "cpu2", train__device="cpu")[0].summary
    assert gpu == pytest.approx(cpu, rel=1e-2)


def test_cuda_probes_and_checkpoints(tmp_path):
    cfg = tiny_config(tmp_path, train__device="cuda", train__epochs=1, train__probe_every=1)
    result = distill(cfg, progress=False)
    s = result.summary
    for role in ("teacher", "student", "input"):
        assert 0.5 < s["probe"][role]["linear"] <= 1.0
    # the checkpoints a CUDA run writes load back and hold the final step's student
    ckpts = result.path / "checkpoints"
    last, student = load_checkpoint(ckpts / "last.pt"), load_checkpoint(ckpts / "student.pt")
    assert last["step"] == student["step"] == s["steps"] > 0
    assert all(torch.equal(student["model"][k].cpu(), v.cpu()) for k, v in last["student"].items())
    teacher = load_checkpoint(ckpts / "teacher.pt")["model"]
    assert teacher.keys() == student["model"].keys()
    assert any(not torch.equal(teacher[k].cpu(), student["model"][k].cpu()) for k in teacher)  # it trained


def test_cuda_teacher_cache_and_data_on_device_change_no_result(tmp_path):
    _, plain = _losses(tmp_path, "plain", train__device="cuda", train__data_on_device="false")
    _, fast = _losses(tmp_path, "fast", train__device="cuda", train__data_on_device="true",
                      train__teacher_cache="true", data__root=str(tmp_path / "root"))
    assert fast == pytest.approx(plain, rel=1e-2)


def test_cuda_auto_precision_is_bf16_and_escapes(tmp_path):
    assert uses_bf16("auto", torch.device("cuda"))
    escape = {"model__encoder": "mlp", "model__width": 64, "head__kind": "linear", "head__out_dim": 32,
              "init__mode": "neighborhood", "init__epsilon": 1e-10, "loss__name": "nmse", "optim__name": "sgd",
              "optim__lr": 1e4, "train__max_steps": 8}
    result, losses = _losses(tmp_path, "auto", train__device="cuda", train__precision="auto", **escape)
    assert result.summary["precision"] == "bf16"
    assert losses[0] < 1e-10 and max(losses) > 1e-3
    records = list(RunDir(result.path).records())
    assert any(r["bf16"] for r in records if "loss" in r)
    # the float64 start ended before bf16 began (precision.py)
    switch = [r["step"] for r in records if r.get("event") == "precision"]
    assert len(switch) == 1 and min(r["step"] for r in records if r.get("bf16")) > switch[0]


def test_cuda_compile_follows_eager(tmp_path):
    _, eager = _losses(tmp_path, "eager", train__device="cuda")
    _, compiled = _losses(tmp_path, "compiled", train__device="cuda", train__compile="true")
    assert compiled == pytest.approx(eager, rel=1e-2)


def test_cuda_graphs_follow_eager_through_the_last_partial_batch(tmp_path):
    # CUDA graphs record static shapes: the epoch's last batch (8 of 200 images) runs eager between graph
    # replays of the full batches, over three epochs, with metrics read every 5 steps
    partial = {"data__n_samples": 200, "train__batch_size": 48, "train__epochs": 3, "train__max_steps": 15,
               "train__log_every": 5}
    _, eager = _losses(tmp_path, "eager", train__device="cuda", train__precision="bf16", **partial)
    _, graphs = _losses(tmp_path, "graphs", train__device="cuda", train__precision="bf16", train__compile="true",
                        train__cuda_graphs="true", **partial)
    assert len(graphs) == len(eager) and graphs == pytest.approx(eager, rel=2e-2)


def test_cuda_conv_student_within_1e_10_leaves_its_teacher_in_fp32(tmp_path):
    # At eps = 1e-10 only a few dozen of the tiny net's weights differ from the teacher's, and the outputs are
    # bitwise equal on most batches: the student leaves on the first batch where rounding lets a difference
    # through (step 5 on the development CPU). 60 steps leave room for the GPU's different rounding.
    _, losses = _losses(tmp_path, "eps", train__device="cuda", train__precision="fp32", init__mode="neighborhood",
                        init__epsilon=1e-10, head__kind="linear", head__out_dim=32, loss__name="nmse",
                        optim__name="sgd", optim__lr=1e4, train__max_steps=60)
    assert losses[0] < 1e-10 and max(losses) > 1e-3


def test_cuda_linear_probe_matches_the_cpu_one():
    # The probe's GPU path is the same L-BFGS (on the host) with the objective on the device of the features.
    from randteach.probes.linear_knn import linear_probe
    g = torch.Generator().manual_seed(0)
    centers = 0.3 * torch.randn(10, 256, generator=g)
    y = torch.randint(0, 10, (24_000,), generator=g)
    x = (centers[y] + torch.randn(24_000, 256, generator=g)).relu()
    args = (x[:20_000], y[:20_000], x[20_000:], y[20_000:])
    assert linear_probe(*args, device="cuda") == pytest.approx(linear_probe(*args), abs=0.003)


def test_cuda_logistic_regression_keeps_the_solver_on_the_host_and_returns_to_the_device():
    from randteach.probes.linear_knn import fit_logistic_regression
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2_000, 32, generator=g), torch.randint(0, 4, (2_000,), generator=g)
    on_gpu = fit_logistic_regression(x.cuda(), y.cuda(), 4)
    on_cpu = fit_logistic_regression(x, y, 4)
    assert on_gpu.weight.device.type == "cuda" and on_gpu.bias.device.type == "cuda"
    torch.testing.assert_close(on_gpu.weight.cpu(), on_cpu.weight, rtol=1e-3, atol=1e-4)
