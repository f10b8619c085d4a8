"""Options with no other test that fails if they are ignored: each, changed from its default, changes what a
two-step run trains (the student, or the teacher for the keys that set the teacher)."""
import pytest
import torch

from randteach.runs.checkpoint import load_checkpoint, load_state_dict
from randteach.train.loop import distill

from tiny import tiny_config

TWO_STEPS = {"train__max_steps": 2, "probe__which": "[]", "init__alpha": 0.5}

# key: (changed value, the settings under which it acts, the checkpoint it changes)
CASES = {
    "optim.betas": ("[0.5, 0.9]", {}, "student"),
    "optim.grad_clip": ("1e-6", {}, "student"),
    "loss.teacher_temp": ("0.5", {}, "student"),
    "loss.student_temp": ("0.5", {}, "student"),
    "init.variance_preserving": ("false", {}, "student_init"),
    "init.fresh_seed": ("7", {}, "student_init"),
    "init.teacher_seed": ("7", {}, "teacher"),
    "data.subset_seed": ("5", {"data__n_samples": 256}, "student"),
    "teacher.ema_momentum": ("0.5", {"teacher__mode": "ema", "init__mode": "independent"}, "last_teacher"),
    # batch-norm statistics are per micro-batch, so chunks of 16 train a different student than one of 64
    "train.micro_batch": ("16", {"model__norm": "batch"}, "student"),
    "teacher.train_mode": ("true", {"model__norm": "batch"}, "student"),
    "loss.center_momentum": ("0.5", {"loss__center": "true"}, "student"),
    "optim.min_lr": ("5e-4", {"optim__schedule": "cosine"}, "student"),
    "optim.lr_end": ("10", {"optim__schedule": "exponential"}, "student"),
}


def _weights(run, which: str) -> dict:
    if which == "last_teacher":
        return load_checkpoint(run / "checkpoints" / "last.pt")["teacher"]
    return load_state_dict(run, which)


@pytest.mark.parametrize("key", sorted(CASES))
def test_the_option_changes_what_trains(tmp_path, key):
    value, setting, which = CASES[key]
    runs = []
    for name, extra in (("default", {}), ("changed", {key.replace(".", "__"): value})):
        cfg = tiny_config(tmp_path / name, **{**TWO_STEPS, **setting, **extra})
        runs.append(_weights(distill(cfg, progress=False).path, which))
    a, b = runs
    assert any(not torch.equal(a[k], b[k]) for k in a), key


def test_the_checkpoint_keys_load_the_run_they_name(tmp_path):
    """init.checkpoint starts the student from a run's final student; init.teacher_checkpoint makes that
    student the teacher (the papers' iterated distillation)."""
    first = distill(tiny_config(tmp_path / "first", **TWO_STEPS), progress=False).path
    trained = load_state_dict(first, "student")
    resumed = tiny_config(tmp_path / "resumed", **TWO_STEPS, init__mode="checkpoint", init__checkpoint=str(first))
    next_generation = tiny_config(tmp_path / "next", **TWO_STEPS, init__teacher_checkpoint=str(first))
    for cfg, which in ((resumed, "student_init"), (next_generation, "teacher")):
        loaded = load_state_dict(distill(cfg, progress=False).path, which)
        assert all(torch.equal(loaded[k], trained[k]) for k in trained) and loaded.keys() == trained.keys(), which
