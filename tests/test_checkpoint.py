import os
import pickle

import pytest
import torch

from randteach.errors import CheckpointError
from randteach.runs.checkpoint import load_checkpoint, load_state_dict, save_checkpoint


def test_round_trip(tmp_path):
    sd = torch.nn.Linear(3, 2).state_dict()
    save_checkpoint({"model": sd, "step": 7}, tmp_path / "a.pt")
    back = load_checkpoint(tmp_path / "a.pt")
    assert back["step"] == 7
    torch.testing.assert_close(back["model"]["weight"], sd["weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp file left behind


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.pt"
    torch.save({"format": "randteach-checkpoint-v1", "model": _Evil()}, bad)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(bad)
    assert not (tmp_path / "PWNED").exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not (tmp_path / "PWNED").exists()


class _Unsafe:
    """A class a checkpoint could name: loading it safely refuses to import and run it."""


def test_foreign_and_missing(tmp_path):
    torch.save({"weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a randteach checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "garbage.pt").write_text("garbage\n")
    with pytest.raises(CheckpointError, match="refused without running it: .+; write it again") as refused:
        load_checkpoint(tmp_path / "garbage.pt")
    assert "weights_only" not in str(refused.value)  # torch's advice to run the file's code is not passed on
    torch.save({"format": "x", "obj": _Unsafe()}, tmp_path / "object.pt")
    with pytest.raises(CheckpointError, match="refused without running it: .+_Unsafe") as refused:
        load_checkpoint(tmp_path / "object.pt")
    assert "safe_globals" not in str(refused.value) and "weights_only" not in str(refused.value)
    with pytest.raises(CheckpointError, match="not a randteach run folder"):
        load_state_dict(tmp_path)
    (tmp_path / "config.yaml").write_text("name: run\n")  # a run that never started: start it
    with pytest.raises(CheckpointError, match="no checkpoints/student.pt.*never got that far.*--config") as never:
        load_state_dict(tmp_path)
    assert "--probe.* setting" in str(never.value)  # a probe error would stop the same config again
    (tmp_path / "summary.json").write_text('{"status": "failed", "error": "UserError: k-NN needs k <= 10"}')
    with pytest.raises(CheckpointError, match="it stopped on: UserError: k-NN needs k <= 10; start it again"):
        load_state_dict(tmp_path)  # the error a sweep recorded is named
    (tmp_path / "summary.json").write_text("[1]")  # a damaged summary: the advice stands without it
    with pytest.raises(CheckpointError, match="never got that far .+: start it again"):
        load_state_dict(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")  # one that was interrupted: resume it
    with pytest.raises(CheckpointError, match="no checkpoints/student.pt.*is the run finished.*--resume"):
        load_state_dict(tmp_path)


def test_a_runs_resume_state_serves_as_its_student_or_teacher_checkpoint(tmp_path, capsys):
    # last.pt (the state of a run under way) was "no model weights" to probe / finetune / landscape while signal
    # read its student: now every analysis reads it as the run's student (or, asked for, its teacher).
    from randteach.cli import main
    from randteach.train.loop import distill
    from tiny import tiny_config
    run = distill(tiny_config(tmp_path, train__max_steps=3, probe__which="[]"), progress=False).path
    last = run / "checkpoints" / "last.pt"
    for role in ("student", "teacher"):
        expected = load_state_dict(run / "checkpoints" / f"{role}.pt")
        got = load_state_dict(last, role)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert main(["--quiet", "probe", str(run), "--checkpoint", str(last), "--probe.linear", "none"]) == 0
    assert f"on digits, student {last}; saved under {run / 'probes'}" in capsys.readouterr().out  # what, and where
    save_checkpoint({"role": "note", "text": "no weights"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="holds no model weights; expected a model checkpoint"):
        load_state_dict(tmp_path / "other.pt")
