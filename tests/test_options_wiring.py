"""Options whose wiring no other test caught: each test checks the effect the option is documented to have
(config.py's help, docs/CONFIGURATION.md) through the path a user takes (build_config / tiny_config, the
model built from a Config, `randteach.distill`, `randteach.probe` of a run), so that it fails if the value
were ignored where it is read."""
import json

import pytest
import torch
from torch import nn

import randteach
from randteach.data import Preprocess, load_dataset
from randteach.errors import UserError
from randteach.models import build_model
from randteach.runs.checkpoint import load_state_dict
from randteach.train.loop import distill

from tiny import tiny_config

TWO_STEPS = {"train__max_steps": 2, "probe__which": "[]"}
ONE_STEP = {**TWO_STEPS, "train__max_steps": 1}
RECORDING = {"model__encoder": "test_options_wiring:recording_conv"}
CALLS: list[tuple[bool, torch.Tensor]] = []  # (gradient on, input) of every RecordingConv forward off the meta device


class RecordingConv(nn.Module):
    """A small conv encoder with adaptive pooling that records what it is given; it refuses inputs under 4 px
    (as an encoder built for some sizes does), also in the shape check on the meta device."""

    def __init__(self, in_channels, image_size):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.embed_dim = 8

    def forward(self, x):
        if x.shape[-1] < 4:
            raise ValueError(f"RecordingConv takes 4 px inputs at least, got {x.shape[-1]} px")
        if x.device.type != "meta":  # meta: the local-crop shape check
            CALLS.append((torch.is_grad_enabled(), x.detach().float().cpu()))
        return nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1)


def recording_conv(in_channels, image_size):
    return RecordingConv(in_channels, image_size)


def student_inputs(cfg) -> list[torch.Tensor]:
    """The batches the student's encoder trained on (its forwards with gradient) in a run of `cfg`."""
    CALLS.clear()
    distill(cfg, progress=False)
    return [x for grad, x in CALLS if grad]


def step_records(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("event") == "step"]


def head_of(tmp_path, **overrides) -> nn.Module:
    return build_model(tiny_config(tmp_path, **overrides), 1, 8, seed=0).head


def features(head: nn.Module, n: int = 16) -> torch.Tensor:
    return torch.randn(n, head.mlp[0].in_features, generator=torch.Generator().manual_seed(0))


def rescaled_rows(linear: nn.Linear) -> torch.Tensor:
    """Multiplies output unit j's weight row by j + 1 (in place); returns the factors."""
    factors = torch.arange(1, linear.out_features + 1, dtype=linear.weight.dtype)
    with torch.no_grad():
        linear.weight.mul_(factors[:, None])
    return factors


# ----------------------------------------------------------------------------------------------------
# head.*: the DINO head built from the Config


def test_head_hidden_dims_sets_the_mlp_widths(tmp_path):
    # head.hidden_dims: the hidden widths of the DINO MLP (Linear + GELU each)
    head = head_of(tmp_path, head__hidden_dims="[32, 24]")
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [32, 24]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert head.lin1.in_features == 24


@torch.no_grad()
def test_head_wn1_weight_normalizes_the_layer_into_the_bottleneck(tmp_path):
    # head.wn1: lin1's rows (one per output unit) are used at unit norm, so rescaling a row changes nothing;
    # without it (the default) the bottleneck moves
    for wn1, invariant in ((True, True), (False, False)):
        head = head_of(tmp_path, head__wn1=wn1)
        x = features(head)
        before = head.bottleneck(x)
        rescaled_rows(head.lin1)
        after = head.bottleneck(x)
        assert torch.allclose(after, before, rtol=1e-4, atol=1e-6) == invariant, wn1
        if not invariant:
            assert (after - before).abs().max() > 1e-2


@torch.no_grad()
def test_head_wn2_false_leaves_the_last_layer_unnormalized(tmp_path):
    # head.wn2 (default true): the last layer's rows at unit norm, gain fixed at 1; false: the plain linear
    # layer, whose output unit j scales with its weight row
    z = torch.nn.functional.normalize(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    head = head_of(tmp_path, head__wn2=True)
    before = head.last(z)
    rescaled_rows(head.lin2)
    assert torch.allclose(head.last(z), before, rtol=1e-4, atol=1e-6)
    head = head_of(tmp_path, head__wn2=False)
    before = head.last(z)
    factors = rescaled_rows(head.lin2)
    torch.testing.assert_close(head.last(z), before * factors, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_head_fn2_l2_normalizes_the_output(tmp_path):
    # head.fn2: every output vector has unit L2 norm (off, the default: here norms near 2)
    x = features(head_of(tmp_path))
    norms = head_of(tmp_path, head__fn2=True)(x).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=1e-5)
    assert (head_of(tmp_path)(x).norm(dim=-1) - 1).abs().min() > 0.1


@torch.no_grad()
def test_head_lin1_false_feeds_the_last_hidden_layer_to_the_bottleneck(tmp_path):
    # head.lin1=false: no linear layer into the bottleneck; the MLP's last hidden layer (24 wide) is it
    head = head_of(tmp_path, head__hidden_dims="[24]", head__lin1=False)
    assert head.lin1 is None and head.bottleneck_dim == 24
    assert head.bottleneck(features(head)).shape == (16, 24)
    assert head.lin2.in_features == 24
    assert head_of(tmp_path, head__hidden_dims="[24]").bottleneck(features(head)).shape == (16, 16)  # the default


@torch.no_grad()
def test_head_lin2_false_makes_the_bottleneck_the_output(tmp_path):
    # head.lin2=false: no last layer to out_dim (64 here); the 16-wide bottleneck is the output
    head = head_of(tmp_path, head__lin2=False, head__wn2=False)
    assert head.lin2 is None and head.out_dim == 16
    assert head(features(head)).shape == (16, 16)
    assert head_of(tmp_path, head__wn2=False)(features(head)).shape == (16, 64)  # the default


# ----------------------------------------------------------------------------------------------------
# init.epsilon: the neighborhood init of a run


def test_init_epsilon_scales_the_fresh_draw_added_to_the_teacher(tmp_path):
    # init.mode=neighborhood: the student starts at theta_T + epsilon * theta_fresh; an independent run of
    # the same seeds starts at theta_fresh itself
    eps = 0.05
    near = distill(tiny_config(tmp_path / "near", **ONE_STEP, init__mode="neighborhood", init__epsilon=eps),
                   progress=False).path
    indep = distill(tiny_config(tmp_path / "indep", **ONE_STEP, init__mode="independent"), progress=False).path
    teacher, student = load_state_dict(near, "teacher"), load_state_dict(near, "student_init")
    fresh = load_state_dict(indep, "student_init")
    assert all(torch.equal(teacher[k], load_state_dict(indep, "teacher")[k]) for k in teacher)
    params = [n for n, _ in build_model(tiny_config(tmp_path), 1, 8, seed=0).named_parameters()]
    offset = torch.cat([(student[k].double() - teacher[k].double()).flatten() for k in params])
    draw = torch.cat([fresh[k].double().flatten() for k in params])
    assert torch.linalg.vector_norm(offset - eps * draw) <= 1e-3 * eps * torch.linalg.vector_norm(draw)
    # init.epsilon_draw normal: each weight's own eps ~ N(0, eps^2) (the escaping paper's draw)
    drawn = distill(tiny_config(tmp_path / "drawn", **ONE_STEP, init__mode="neighborhood", init__epsilon=eps,
                                init__epsilon_draw="normal"), progress=False).path
    student = load_state_dict(drawn, "student_init")
    used = draw.abs() > 1e-3  # the zero-initialized biases carry no eps
    ratio = (torch.cat([(student[k].double() - teacher[k].double()).flatten() for k in params]) / draw)[used]
    assert abs(ratio.std().item() - eps) < 0.1 * eps and abs(ratio.mean().item()) < 0.1 * eps, ratio


# ----------------------------------------------------------------------------------------------------
# data.*: what the encoder is given in a run


def _nearest_image_distance(batch: torch.Tensor) -> torch.Tensor:
    """For each input of `batch`, the distance to the nearest normalized digits training image."""
    digits = load_dataset("digits", "train")
    images = Preprocess.fit(digits)(digits.images).flatten(1)
    return torch.cdist(batch.flatten(1).double(), images.double()).min(1).values


def test_data_inputs_noise_trains_on_gaussian_noise_not_the_images(tmp_path):
    # data.inputs: "data" distills on the (normalized) images; "noise" on Gaussian noise of their shape
    images = student_inputs(tiny_config(tmp_path / "data", **TWO_STEPS, **RECORDING))
    noise = student_inputs(tiny_config(tmp_path / "noise", **TWO_STEPS, **RECORDING, data__inputs="noise"))
    assert len(images) == len(noise) == 2 and images[0].shape == noise[0].shape == (64, 1, 8, 8)
    assert _nearest_image_distance(images[0]).max() < 1e-4       # every input is a training image
    assert _nearest_image_distance(noise[0]).min() > 1.0         # none is
    x = torch.cat(noise)
    assert abs(x.mean()) < 0.1 and 0.9 < x.std() < 1.1          # N(0, 1): data.noise_std's default


def test_data_inputs_noise_also_replaces_float_images_given_from_python(tmp_path):
    # float images from the Python API are used as given; with inputs=noise they are replaced by noise too
    digits = load_dataset("digits", "train")
    images = Preprocess.fit(digits)(digits.images)
    CALLS.clear()
    randteach.distill(encoder=recording_conv, train=(images, digits.labels), progress=False, out=str(tmp_path / "run"),
                      **{"data.inputs": "noise", "train.max_steps": 2, "probe.which": [], "train.batch_size": 64,
                         "train.teacher_cache": False})
    x = torch.cat([x for grad, x in CALLS if grad])
    assert x.shape == (128, 1, 8, 8) and _nearest_image_distance(x).min() > 1.0 and 0.9 < x.std() < 1.1


def test_data_noise_std_is_the_noise_inputs_standard_deviation(tmp_path):
    # data.noise_std: the standard deviation of the Gaussian-noise inputs (in normalized units)
    x = torch.cat(student_inputs(tiny_config(tmp_path, **TWO_STEPS, **RECORDING, data__inputs="noise",
                                             data__noise_std=3.0)))
    assert x.numel() == 2 * 64 * 64 and abs(x.mean()) < 0.3 and 2.7 < x.std() < 3.3


def test_data_image_size_is_the_side_the_encoder_sees(tmp_path):
    # data.image_size: images padded/resized to this side (digits are 8 px; 12 zero-pads them)
    batches = student_inputs(tiny_config(tmp_path, **TWO_STEPS, **RECORDING, data__image_size=12))
    assert [x.shape[-2:] for x in batches] == [(12, 12)] * 2
    border = torch.ones(12, 12, dtype=torch.bool)
    border[2:-2, 2:-2] = False  # the 2 px added around each image: one constant pixel value ...
    assert batches[0][..., border].std() < 1e-6 and batches[0][..., ~border].std() > 0.5  # ... around the digits


def test_data_local_crop_size_is_the_side_of_the_local_crops(tmp_path):
    # data.local_crop_size: the student's local crops have this side (the default on 8 px digits: 3 px, which
    # this encoder refuses: the run is refused before training, pointing to data.local_crop_size)
    dino = {**TWO_STEPS, **RECORDING, "data__augment": "dino", "data__local_crops": 2}
    with pytest.raises(UserError, match="3 px local crops.*--data.local_crop_size"):
        student_inputs(tiny_config(tmp_path / "default", **dino))
    batches = student_inputs(tiny_config(tmp_path / "five", **dino, data__local_crop_size=5))
    # per step: the 2 global views (8 px, batched), then the 2 local crops (5 px, batched)
    assert [tuple(x.shape) for x in batches] == [(128, 1, 8, 8), (128, 1, 5, 5)] * 2


# ----------------------------------------------------------------------------------------------------
# probe.*: the probe of a run (`randteach.probe(RUN)`), counted by the images the student's encoder embeds


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probed")
    return distill(tiny_config(tmp, **ONE_STEP, **RECORDING), progress=False).path


def probed_sizes(run, **overrides) -> list[int]:
    """The batch sizes the student's encoder embedded in `randteach.probe(run, **overrides)`."""
    CALLS.clear()
    result = randteach.probe(run, probe__which="[student]", **overrides)
    assert "student" in result
    return [len(x) for grad, x in CALLS]


def test_probe_n_train_and_n_test_subsample_the_probe_splits(recorded_run):
    # probe.n_train / probe.n_test: the probe fits on a stratified subset of this many training images and
    # scores on one of this many test images (digits: 1437 and 360 in all)
    assert sum(probed_sizes(recorded_run)) == 1437 + 360
    assert sum(probed_sizes(recorded_run, probe__n_train=200)) == 200 + 360
    assert sum(probed_sizes(recorded_run, probe__n_test=50)) == 1437 + 50


def test_probe_data_probes_on_another_data_set(recorded_run, tmp_path, write_cifar10):
    # probe.data: probe on this data set instead of data.name (transfer): here a small CIFAR-10 of 5 x 8
    # training and 8 test images, brought to the run's 8 px and one channel (digits: 1437 + 360 images)
    write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=8)
    CALLS.clear()
    randteach.probe(recorded_run, probe__which="[student]", probe__data="cifar10", probe__linear="none",
                    probe__knn_k=5, data__root=str(tmp_path))
    assert sum(len(x) for grad, x in CALLS) == 40 + 8
    assert {tuple(x.shape[1:]) for grad, x in CALLS} == {(1, 8, 8)}


# ----------------------------------------------------------------------------------------------------
# train.bf16_after_distance: when a bf16 run leaves fp32


def test_bf16_after_distance_keeps_fp32_until_the_student_is_that_far(tmp_path):
    # train.bf16_after_distance: under bf16, steps run in fp32 until ||theta_S - theta_T|| / ||theta_T||
    # exceeds it (the step records' "bf16"). Independent inits are far apart: over the default 1e-3 from the
    # first step, but under a threshold of twice their relative distance for both steps.
    base = {**TWO_STEPS, "train__precision": "bf16", "init__mode": "independent", "train__device": "cpu"}
    first = distill(tiny_config(tmp_path / "default", **base), progress=False).path
    assert [r["bf16"] for r in step_records(first)] == [True, True]
    teacher, student = load_state_dict(first, "teacher"), load_state_dict(first, "student_init")
    params = [n for n, _ in build_model(tiny_config(tmp_path), 1, 8, seed=0).named_parameters()]
    def norm(sd: dict) -> float:
        return float(torch.sqrt(sum(sd[k].double().square().sum() for k in params)))
    relative = norm({k: student[k] - teacher[k] for k in params}) / norm(teacher)
    assert relative > 0.1
    far = distill(tiny_config(tmp_path / "far", **base, train__bf16_after_distance=2 * relative), progress=False).path
    assert [r["bf16"] for r in step_records(far)] == [False, False]
