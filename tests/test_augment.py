"""Opt-in augmentation: each operation against a direct computation on small tensors, the recipes'
determinism (per seed, whatever the micro-batching), and the switch in the distillation loop."""

import pytest
import torch
import torch.nn.functional as F

from randteach.config import ConfigError, build_config
from randteach.data.augment import (GREY_WEIGHTS, Augment, blur, grey, jitter, resized_crop, solarize, uniform)
from randteach.runs.rundir import RunDir
from randteach.train.loop import distill

from tiny import tiny_config


def test_uniform_is_a_pure_function_of_its_key():
    idx = torch.arange(20000)
    u = uniform(3, 7, idx, 0)
    assert u.dtype == torch.float32 and 0 <= float(u.min()) and float(u.max()) < 1
    assert torch.equal(u, uniform(3, 7, idx, 0))
    assert torch.equal(u[5:9], uniform(3, 7, idx[5:9], 0))             # per sample, not per batch
    for other in (uniform(4, 7, idx, 0), uniform(3, 8, idx, 0), uniform(3, 7, idx, 1)):
        assert (other != u).float().mean() > 0.99
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.002


def test_resized_crop_takes_the_box_it_is_given():
    x = torch.arange(2 * 64, dtype=torch.float32).view(2, 1, 8, 8)
    half = torch.full((2,), 0.5)
    out = resized_crop(x, half, half, torch.tensor([-0.5, 0.5]), torch.tensor([-0.5, 0.5]),
                       torch.tensor([False, True]), 4)
    torch.testing.assert_close(out[0, 0], x[0, 0, :4, :4])            # top-left quadrant
    torch.testing.assert_close(out[1, 0], x[1, 0, 4:, 4:].flip(-1))   # bottom-right, mirrored
    one = torch.ones(2)
    shifted = resized_crop(x, one, one, torch.tensor([2 / 8, 0.0]), torch.zeros(2), torch.tensor([False, False]), 8,
                           mode="nearest")
    torch.testing.assert_close(shifted[0, 0, :, :7], x[0, 0, :, 1:])  # one pixel to the left, zero fill
    assert (shifted[0, 0, :, 7] == 0).all()


def test_flip_crop_is_pad_4_crop_and_flip():
    aug = Augment("flip-crop", seed=1, mean=[0.0], std=[1.0])
    x = torch.rand(16, 1, 8, 8)
    idx = torch.arange(16)
    out = aug(x, 5, idx)
    padded = F.pad(x, (4, 4, 4, 4))
    u = [uniform(1, 5, idx, d) for d in range(3)]
    for i in range(16):
        dx, dy = int(u[0][i] * 9) - 4, int(u[1][i] * 9) - 4
        ref = padded[i, :, 4 + dy:12 + dy, 4 + dx:12 + dx]
        if u[2][i] < 0.5:
            ref = ref.flip(-1)
        torch.testing.assert_close(out[i], ref, msg=f"sample {i}")
    assert not torch.equal(out, x)


def test_grey_jitter_solarize_match_their_formulas():
    x = torch.rand(3, 3, 5, 5)
    g = (x * torch.tensor(GREY_WEIGHTS).view(1, 3, 1, 1)).sum(1, keepdim=True)
    torch.testing.assert_close(grey(x), g)
    one = torch.ones(3)
    b = torch.tensor([0.6, 1.0, 1.4])
    torch.testing.assert_close(jitter(x, b, one, one), (x * b.view(3, 1, 1, 1)).clamp(0, 1))
    c = torch.tensor([0.6, 1.0, 1.4])
    m = g.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(jitter(x, one, c, one), ((x - m) * c.view(3, 1, 1, 1) + m).clamp(0, 1))
    s = torch.zeros(3)
    torch.testing.assert_close(jitter(x, one, one, s), g.expand_as(x))  # saturation 0: grey
    torch.testing.assert_close(solarize(torch.tensor([0.2, 0.5, 0.9])), torch.tensor([0.2, 0.5, 0.1]))


def test_blur_is_a_normalized_gaussian():
    delta = torch.zeros(2, 1, 21, 21)  # the reflected borders never reach the impulse
    delta[:, :, 10, 10] = 1.0
    sigma = torch.tensor([0.8, 1.3])
    for sigma_max, radius in ((1.3, 4), (1.9, 6)):  # the radius: ceil(3 * sigma_max), for every sample
        out = blur(delta, sigma, sigma_max)
        for i, s in enumerate(sigma.tolist()):
            k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / s) ** 2)
            k = k / k.sum()
            expected = torch.zeros(21, 21)
            expected[10 - radius:11 + radius, 10 - radius:11 + radius] = torch.outer(k, k)
            torch.testing.assert_close(out[i, 0], expected, atol=1e-7, rtol=1e-5)
    flat = torch.full((2, 3, 6, 6), 0.3)
    torch.testing.assert_close(blur(flat, sigma, 1.3), flat)


def test_dino_views_are_deterministic_and_shaped():
    aug = Augment("dino", seed=0, mean=[0.5] * 3, std=[0.25] * 3, local_crops=3)
    x = (torch.rand(8, 3, 32, 32) - 0.5) / 0.25
    idx = torch.arange(100, 108)
    teacher, student = aug.views(x, 2, idx)
    assert len(teacher) == 2 and len(student) == 5 and teacher[0] is student[0]
    assert [v.shape[-1] for v in student] == [32, 32, 14, 14, 14]
    again = aug.views(x, 2, idx)[1]
    assert all(torch.equal(a, b) for a, b in zip(student, again))
    assert not torch.equal(student[0], student[1]) and not torch.equal(student[0], x)
    # micro-batching does not change what a sample gets
    halves = torch.cat([aug(x[:3], 2, idx[:3]), aug(x[3:], 2, idx[3:])])
    torch.testing.assert_close(halves, aug(x, 2, idx))
    pixels = student[0] * 0.25 + 0.5
    assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5


def test_none_is_the_default_and_a_no_op():
    cfg = build_config("cpu")
    assert cfg.data.augment == "none"
    x = torch.rand(2, 1, 4, 4)
    assert Augment("none", 0, [0.0], [1.0])(x, 0, torch.arange(2)) is x


def test_config_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match="teacher_cache false"):
        build_config("cpu", None, {"data.augment": "flip-crop"})  # the cpu preset caches the teacher
    with pytest.raises(ConfigError, match="noise"):
        build_config("cpu", None, {"data.augment": "dino", "data.inputs": "noise", "train.teacher_cache": "false"})


def test_augmented_distillation_differs_and_repeats(tmp_path):
    def losses(name, **kw):
        cfg = tiny_config(tmp_path / name, train__epochs=1, train__device="cpu", train__precision="fp32",
                          probe__which="[]", **kw)
        return [r["loss"] for r in RunDir(distill(cfg, progress=False).path).records() if "loss" in r]
    plain = losses("plain")
    crop = losses("crop", data__augment="flip-crop")
    assert crop != plain and losses("crop-again", data__augment="flip-crop") == crop
    assert losses("dino", data__augment="dino") != crop


def test_multicrop_loss_pairs_every_global_target_with_every_other_view():
    from randteach.data.augment import multicrop_loss
    t = [torch.tensor(1.0), torch.tensor(2.0)]
    s = [torch.tensor(10.0), torch.tensor(20.0), torch.tensor(30.0), torch.tensor(40.0)]
    got = multicrop_loss(t, s, lambda a, b: a * b)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]  # (teacher i, student j), j != i
    assert float(got) == pytest.approx(sum(float(t[i] * s[j]) for i, j in pairs) / 6)


def test_hue_shift_matches_colorsys():
    import colorsys
    from randteach.data.augment import hue_shift
    x = torch.rand(3, 3, 4, 4, dtype=torch.float64)
    x[0, :, 0, 0] = 0.5                        # a grey pixel stays grey
    turns = torch.tensor([0.1, -0.07, 0.5], dtype=torch.float64)
    out = hue_shift(x, turns)
    for i in range(3):
        for yy in range(4):
            for xx in range(4):
                h, s, v = colorsys.rgb_to_hsv(*x[i, :, yy, xx].tolist())
                want = colorsys.hsv_to_rgb((h + float(turns[i])) % 1.0, s, v)
                torch.testing.assert_close(out[i, :, yy, xx], torch.tensor(want, dtype=torch.float64))
    grey_image = torch.rand(2, 1, 3, 3)
    assert hue_shift(grey_image, torch.tensor([0.1, 0.2])) is grey_image
    torch.testing.assert_close(hue_shift(x, torch.zeros(3, dtype=torch.float64)), x)
