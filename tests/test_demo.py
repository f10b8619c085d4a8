"""The demo command: its closing sentence is computed from the probe numbers, and the command runs end to end."""
import subprocess
import sys

from randteach.cli import demo_verdict


def _probe(student, teacher, pixels):
    return {"student": dict(zip(("linear", "knn"), student)), "teacher": dict(zip(("linear", "knn"), teacher)),
            "input": dict(zip(("linear", "knn"), pixels))}


def test_verdict_states_the_gains_in_points():
    s = demo_verdict(_probe((0.8712, 0.8650), (0.8400, 0.8500), (0.8403, 0.8569)))
    assert s.startswith("The student beats its random teacher (+3.12 pp linear and +1.50 pp k-NN)")
    assert "against raw pixels it is above them on both probes (+3.09 pp linear and +0.81 pp k-NN)" in s


def test_verdict_says_plainly_when_the_claim_fails():
    s = demo_verdict(_probe((0.8208, 0.7865), (0.8238, 0.8172), (0.8403, 0.8569)))
    assert s.startswith("The student does not beat its random teacher (-0.30 pp linear and -3.07 pp k-NN)")
    assert "against raw pixels it is below them on both probes (-1.95 pp linear and -7.04 pp k-NN)" in s
    mixed = demo_verdict(_probe((0.83, 0.80), (0.82, 0.81), (0.84, 0.85)))
    assert "on one probe only (+1.00 pp linear and -1.00 pp k-NN)" in mixed
    assert demo_verdict({}).startswith("No student and teacher probes")


def test_demo_command_ends_with_the_table_and_the_sentence(tmp_path):
    out = tmp_path / "demo"
    tiny = ["--data.name", "digits", "--model.encoder", "convnet", "--model.width", "4", "--head.hidden_dims", "[32]",
            "--head.bottleneck_dim", "8", "--head.out_dim", "32", "--train.epochs", "1", "--train.batch_size", "128",
            "--probe.max_iter", "30", "--data.root", str(tmp_path / "root")]
    proc = subprocess.run([sys.executable, "-m", "randteach.cli", "--quiet", "demo", "--out", str(out), *tiny],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| teacher |" in proc.stdout and "The student" in proc.stdout
    report = (out / "report.md").read_text()
    assert report.rstrip().splitlines()[-1].startswith("The student")
    assert (out / "probes.png").exists()


def test_a_demo_folder_of_another_config_is_kept_aside_not_refused(tmp_path, capsys):
    """An earlier version's demo (the cross-entropy default) in runs/demo: `make demo` must run, and keep it."""
    import json
    from randteach.cli import set_aside_another_run
    from randteach.config import build_config
    out = tmp_path / "demo"
    out.mkdir()
    (out / "config.yaml").write_text(build_config("cpu", None, {"loss.name": "ce", "out": str(out)}).to_yaml())
    (out / "summary.json").write_text(json.dumps({"status": "completed"}))
    cfg = build_config("cpu", None, {"out": str(out)})
    set_aside_another_run(out, cfg)
    assert not out.exists() and json.loads((tmp_path / "demo-previous-1" / "summary.json").read_text())
    assert "kept it as" in capsys.readouterr().out
    same = tmp_path / "same"
    same.mkdir()
    (same / "config.yaml").write_text(cfg.to_yaml())
    (same / "summary.json").write_text(json.dumps({"status": "completed"}))
    set_aside_another_run(same, build_config("cpu", None, {"out": str(same)}))
    assert same.exists() and not (tmp_path / "same-previous-1").exists()
