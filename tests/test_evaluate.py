"""The evaluation path: the raw-input baseline is probed at the encoders' resolution."""
import pytest
import torch

import randteach.probes.embedding as evaluate
from randteach.data import ImageData
from randteach.errors import UserError

from tiny import tiny_config


def _images(n, side, seed):
    g = torch.Generator().manual_seed(seed)
    return ImageData(torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g),
                     torch.arange(n) % 2, 2, "synthetic")


def test_input_baseline_is_probed_at_the_encoders_resolution(tmp_path, monkeypatch):
    # 16 px images seen by an encoder trained at 8 px (as CIFAR-trained encoders see STL10 at 32 px): the
    # baseline's features are the 8 px images the encoder sees, 3 * 8 * 8 of them, not the native 3 * 16 * 16.
    seen = []
    monkeypatch.setattr(evaluate, "score", lambda train_x, *a, **k: seen.append(train_x.shape) or {})
    prober = evaluate.Prober(tiny_config(tmp_path), 3, 8, torch.device("cpu"),
                             splits=(_images(20, 16, 0), _images(10, 16, 1)), cache_dir=tmp_path / "probe-cache")
    prober.input()
    assert seen == [(20, 3 * 8 * 8)]
    assert prober.features(torch.nn.Flatten())[0].shape == (20, 3 * 8 * 8)  # what an encoder is given


def test_probe_outside_a_run_uses_the_runs_fp32_rules(tmp_path, monkeypatch):
    # `randteach probe` probes with TF32 off (exact_fp32), as the probes inside a run do
    from randteach.probes.run import probe_run
    from randteach.train.loop import distill
    run = distill(tiny_config(tmp_path, train__max_steps=1, train__probe_every=0, probe__which="[]"), progress=False)
    monkeypatch.setenv("RANDTEACH_DATA", str(tmp_path / "data"))  # an empty probe cache: both probes are computed
    seen, embed = [], evaluate.embed

    def recording_embed(*args, **kwargs):  # what an encoder runs under when the probes embed the images
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return embed(*args, **kwargs)
    monkeypatch.setattr(evaluate, "embed", recording_embed)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        probe_run(run.path, ["--probe.which", "[teacher, student]"], progress=False)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert seen == [(False, False)] * 4  # train and test split of teacher and student


def test_probe_results_record_their_settings_and_keep_each_others(tmp_path):
    import json

    from randteach.probes.run import probe_run
    from randteach.train.loop import distill
    run = distill(tiny_config(tmp_path, train__max_steps=1, train__probe_every=0, probe__which="[]",
                              probe__linear="none"), progress=False).path
    probe_run(run, ["--probe.which", "[student]"], progress=False)
    probe_run(run, ["--probe.which", "[input]"], progress=False)  # the same settings: the student is kept
    own = json.loads((run / "probes" / "digits.json").read_text())
    assert set(own["probe"]) == {"student", "input"} and own["settings"]["probe"]["n_train"] is None
    probe_run(run, ["--probe.which", "[input]", "--probe.n_train", "300"], progress=False)
    assert json.loads((run / "probes" / "digits.json").read_text()) == own  # not replaced by a subset's
    (subset,) = [p for p in (run / "probes").glob("digits-*.json")]
    subset = json.loads(subset.read_text())
    assert subset["settings"]["probe"]["n_train"] == 300 and set(subset["probe"]) == {"input"}
    probe_run(run, ["--probe.which", "[student]", "--probe.n_train", "300", "--data.subset_seed", "9"],
              progress=False)  # another subset of 300: a file of its own
    assert len(list((run / "probes").glob("digits-*.json"))) == 2
    for key in ("--data.image_size", "--data.n_samples", "--train.max_steps"):  # settings of another run
        with pytest.raises(UserError, match=f"{key}: `randteach probe` takes --probe.*"):
            probe_run(run, [key, "16"], progress=False)


def test_probe_results_on_other_python_data_of_the_same_name_are_not_merged(tmp_path):
    import json

    from randteach.probes.run import probe_run
    from randteach.train.loop import distill
    run = distill(tiny_config(tmp_path, train__max_steps=1, train__probe_every=0, probe__which="[]",
                              probe__linear="none"), progress=False).path
    splits = [(_images(40, 8, seed), _images(20, 8, seed + 1)) for seed in (0, 2)]
    probe_run(run, ["--probe.which", "[student]"], splits=splits[0], progress=False)
    probe_run(run, ["--probe.which", "[input]"], splits=splits[1], progress=False)
    assert set(json.loads((run / "probes" / "synthetic.json").read_text())["probe"]) == {"input"}
