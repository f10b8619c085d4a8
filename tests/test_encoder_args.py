"""model.encoder_args: keyword arguments of an import-path factory, from the CLI (JSON), YAML and sweeps."""
import functools
import subprocess
import sys

import pytest
from torch import nn

from randteach.config import ConfigError, build_config, parse_overrides
from randteach.runs.sweep import load_sweep
from randteach.train.setup import build_teacher_and_student

BASE = {"model.encoder": "test_encoder_args:widened", "head.kind": "linear", "head.out_dim": "8"}


class Widened(nn.Module):
    def __init__(self, in_channels, image_size, hidden, depth, bias):
        super().__init__()
        layers, width = [nn.Flatten()], in_channels * image_size ** 2
        for _ in range(depth):
            layers += [nn.Linear(width, hidden, bias=bias), nn.ReLU()]
            width = hidden
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def widened(in_channels, image_size, hidden=4, depth=1, bias=True):
    """A factory that takes arguments of its own (as timm.create_model does)."""
    return Widened(in_channels, image_size, hidden, depth, bias)


def test_json_arguments_reach_the_factory():
    cfg = build_config("cpu", None, {**BASE, "model.encoder_args": '{"hidden": 24, "depth": 3, "bias": false}'})
    assert cfg.model.encoder_args == {"hidden": 24, "depth": 3, "bias": False}
    teacher, student = build_teacher_and_student(cfg, 1, 8)
    linears = [m for m in teacher.encoder.modules() if isinstance(m, nn.Linear)]
    assert teacher.embed_dim == 24 and len(linears) == 3 and all(m.bias is None for m in linears)
    default = build_teacher_and_student(build_config("cpu", None, BASE), 1, 8)[0]
    assert default.embed_dim == 4  # without arguments the factory's defaults hold


def test_arguments_change_the_run_address_and_default_keeps_it():
    plain = build_config("cpu", None, BASE)
    assert plain.digest() == build_config("cpu", None, {**BASE, "model.encoder_args": "{}"}).digest()
    assert plain.digest() != build_config("cpu", None, {**BASE, "model.encoder_args": '{"hidden": 5}'}).digest()


def forwarding(**kwargs):
    """Like timm.create_model: every keyword goes on to a model class that takes no image_size."""
    return Widened(in_channels=1, image_size=8, **kwargs)


def test_a_forwarding_factory_gets_only_the_users_arguments():
    cfg = build_config("cpu", None, {**BASE, "model.encoder": "test_encoder_args:forwarding",
                                     "model.encoder_args": '{"hidden": 5, "depth": 1, "bias": true}'})
    assert build_teacher_and_student(cfg, 1, 8)[0].embed_dim == 5


def test_yaml_mapping_and_dotted_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  encoder: test_encoder_args:widened\n  encoder_args: {hidden: 7, depth: 2}\n")
    assert build_config(None, f).model.encoder_args == {"hidden": 7, "depth": 2}
    dotted = build_config("cpu", None, {**BASE, "model.encoder_args.hidden": "9"})
    assert dotted.model.encoder_args == {"hidden": 9}
    # both spellings on one command line merge, in order: a key given twice keeps its later value
    args = parse_overrides(["--model.encoder_args", '{"hidden": 7, "depth": 2}', "--model.encoder_args.depth", "3"])
    assert build_config("cpu", None, {**BASE, **args}).model.encoder_args == {"hidden": 7, "depth": 3}
    args = parse_overrides(["--model.encoder_args.depth", "3", "--model.encoder_args", '{"hidden": 7, "depth": 2}'])
    assert build_config("cpu", None, {**BASE, **args}).model.encoder_args == {"hidden": 7, "depth": 2}
    args = parse_overrides(["--model.encoder_args.depth", "3", "--model.encoder_args", '{"depth": 6}',
                            "--model.encoder_args.depth", "4"])  # given again: applied at its later place
    assert build_config("cpu", None, {**BASE, **args}).model.encoder_args == {"depth": 4}


def test_sweep_grid_over_an_argument(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text("name: s\npreset: cpu\nbase: {model.encoder: 'test_encoder_args:widened'}\n"
                 "grid: {model.encoder_args.hidden: [3, 6]}\n")
    spec = load_sweep(f)
    assert spec.grid == {"model.encoder_args.hidden": [3, 6]}
    cfg = build_config(spec.preset, None, {**spec.base, "model.encoder_args.hidden": 6})
    assert build_teacher_and_student(cfg, 1, 8)[0].embed_dim == 6


@pytest.mark.parametrize("bad", ["{hidden: 3", "[1, 2]", "3", '{"in_channels": 3}'])
def test_bad_json_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="model.encoder_args"):
        build_config("cpu", None, {**BASE, "model.encoder_args": bad})


def test_unknown_argument_of_a_builtin_encoder_is_refused():
    cfg = build_config("cpu", None, {"model.encoder": "convnet", "model.encoder_args": '{"depth": 3}'})
    with pytest.raises(ConfigError, match="takes no option"):
        build_teacher_and_student(cfg, 1, 8)


def needs_depth(in_channels, image_size, depth):
    return Widened(in_channels, image_size, 4, depth, True)


def _with_depth(factory):
    @functools.wraps(factory)  # the signature shown is the factory's, which still asks for depth
    def wrapper(*args, **kwargs):
        return factory(*args, depth=1, **kwargs)
    return wrapper


depth_supplied = _with_depth(needs_depth)


def test_a_wrapper_that_supplies_an_argument_its_signature_asks_for_still_works():
    cfg = build_config("cpu", None, {**BASE, "model.encoder": "test_encoder_args:depth_supplied"})
    assert build_teacher_and_student(cfg, 1, 8)[0].embed_dim == 4


@pytest.mark.parametrize("encoder, args", [("test_encoder_args:needs_depth", "{}"),  # a required argument missing
                                           ("test_encoder_args:widened", '{"layers": 2}'),  # one it does not take
                                           ("json:dumps", "{}")])  # not an encoder factory at all
def test_a_factory_that_cannot_take_the_arguments_is_a_clear_error(encoder, args):
    cfg = build_config("cpu", None, {**BASE, "model.encoder": encoder, "model.encoder_args": args})
    with pytest.raises(ConfigError, match=f"{encoder}' cannot be called with the arguments .*--model.encoder_args"):
        build_teacher_and_student(cfg, 1, 8)
    assert build_teacher_and_student(build_config("cpu", None, {
        **BASE, "model.encoder": "test_encoder_args:needs_depth", "model.encoder_args": '{"depth": 2}'}), 1, 8)


def test_cli_prints_the_arguments():
    out = subprocess.run([sys.executable, "-m", "randteach.cli", "config", "--preset", "cpu",
                          "--model.encoder", "test_encoder_args:widened",
                          "--model.encoder_args", '{"hidden": 11}'], capture_output=True, text=True, check=True)
    assert "encoder_args:\n    hidden: 11" in out.stdout
