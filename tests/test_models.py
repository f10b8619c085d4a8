"""Encoders, heads and build_model: parameter counts against the random-teacher paper's Table 5,
shapes, norms, init, the L2 bottleneck against numpy, seeding, import-path encoders.

Large encoders are built on the meta device (shapes and counts without allocating or initializing).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from randteach.config import ENCODERS, ConfigError, HeadConfig, build_config, own_norm
from randteach.models import (DINOHead, DistillModel, LinearHead, build_encoder, build_head, build_model,
                              count_parameters, unit_row_linear)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


HEAVY = {"vgg13", "vgg16", "vgg19", "vgg13_bn", "vgg16_bn", "vgg19_bn", "resnet34", "resnet50",
         "vit_small", "vit_medium", "vit_base"}
EMBED = {"flatten": None, "mlp": 512, "convnet": 128, "resnet18": 512, "resnet34": 512, "resnet50": 2048,
         "resnet20": 64, "resnet56": 64, "vit_tiny": 192, "vit_small": 384, "vit_medium": 512, "vit_base": 768,
         **{v: 512 for v in ENCODERS if v.startswith("vgg")}}


def meta_encoder(name, **kw):
    with torch.device("meta"):
        return build_encoder(name, **kw)


# ----------------------------------------------------------------- parameter counts

def conv(c_in, c_out, k, bias):
    return k * k * c_in * c_out + (c_out if bias else 0)


def vgg_count(cfg, c_in=3):
    n = 0
    for v in cfg:
        if v != "M":
            n += conv(c_in, v, 3, True)
            c_in = v
    return n


def resnet_basic_count(blocks, widths, c_in=3, stem_k=3):
    """Conv weights + BN (2 per channel) of a BasicBlock ResNet with 1x1-projection shortcuts."""
    n = conv(c_in, widths[0], stem_k, False) + 2 * widths[0]
    c = widths[0]
    for i, (nb, w) in enumerate(zip(blocks, widths)):
        for j in range(nb):
            n += conv(c, w, 3, False) + conv(w, w, 3, False) + 4 * w
            if c != w:
                n += conv(c, w, 1, False) + 2 * w
            c = w
    return n


M_ = "M"
VGG11 = [64, M_, 128, M_, 256, 256, M_, 512, 512, M_, 512, 512, M_]
VGG13 = [64, 64, M_, 128, 128, M_, 256, 256, M_, 512, 512, M_, 512, 512, M_]
VGG16 = [64, 64, M_, 128, 128, M_, 256, 256, 256, M_, 512, 512, 512, M_, 512, 512, 512, M_]
VGG19 = [64, 64, M_, 128, 128, M_] + [256] * 4 + [M_] + [512] * 4 + [M_] + [512] * 4 + [M_]

# Table 5 of Random Teachers are Good Teachers (3 x 32 x 32 inputs, encoder without head)
TABLE5 = {"vgg11": 9_220_480, "vgg13": 9_404_992, "vgg16": 14_714_688, "vgg19": 20_024_384,
          "resnet20": 271_824, "resnet56": 855_120, "resnet18": 11_168_832, "resnet34": 21_276_992,
          "resnet50": 23_500_352}


@pytest.mark.parametrize("name", sorted(TABLE5))
def test_table5_parameter_counts(name):
    assert count_parameters(meta_encoder(name)) == TABLE5[name]


def test_counts_match_direct_formulas():
    for name, cfg in [("vgg11", VGG11), ("vgg13", VGG13), ("vgg16", VGG16), ("vgg19", VGG19)]:
        assert vgg_count(cfg) == TABLE5[name] == count_parameters(meta_encoder(name))
    assert resnet_basic_count([2, 2, 2, 2], [64, 128, 256, 512]) == TABLE5["resnet18"]
    assert resnet_basic_count([3, 4, 6, 3], [64, 128, 256, 512]) == TABLE5["resnet34"]
    # ResNet20/56: Table 5 includes the 1x1 projection shortcuts (option B, 2 x (conv + BN));
    # He et al.'s parameter-free option A would give 2,752 fewer (the "0.27M" of their Table 6).
    for n, name in [(3, "resnet20"), (9, "resnet56")]:
        count = resnet_basic_count([n] * 3, [16, 32, 64])
        assert count == TABLE5[name]
        option_a = count - (conv(16, 32, 1, False) + 64 + conv(32, 64, 1, False) + 128)
        assert TABLE5[name] - option_a == 2_752
    # VGG with batch-norm: 2 parameters per conv channel more
    assert count_parameters(meta_encoder("vgg11_bn")) == TABLE5["vgg11"] + 2 * sum(v for v in VGG11 if v != "M")


def test_resnet_imagenet_stem_matches_torchvision_count():
    # torchvision resnet18/50: 11,689,512 / 25,557,032 parameters, minus the 1000-way fc layer
    r18, r50 = meta_encoder("resnet18", image_size=96), meta_encoder("resnet50", image_size=96)
    assert count_parameters(r18) == 11_689_512 - (512 * 1000 + 1000)
    assert count_parameters(r50) == 25_557_032 - (2048 * 1000 + 1000)
    assert any(isinstance(m, nn.MaxPool2d) for m in r18.modules())
    assert r18.stem[0].kernel_size == (7, 7) and r18.stem[0].stride == (2, 2)
    small = meta_encoder("resnet18", image_size=64)
    assert small.stem[0].kernel_size == (3, 3) and small.stem[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.modules())


# Table 5's ViT rows (594,048; 2,072,832; 3,550,208; 7,684,608) are not those of 12-block ViTs with
# patch 8: they are exactly the count of the authors' code, which repeated ONE block object 12 times
# (counted once) and whose ViT factories default to patch size 16 (4 patches at 32x32), although the
# text says patch 8. Our ViTs have 12 distinct blocks and patch 8 at 32x32.
TABLE5_VIT = {"vit_tiny": 594_048, "vit_small": 2_072_832, "vit_medium": 3_550_208, "vit_base": 7_684_608}
VIT_DIMS = {"vit_tiny": 192, "vit_small": 384, "vit_medium": 512, "vit_base": 768}


def vit_count(d, depth=12, c=3, patch=8, side=32):
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    n_tokens = (side // patch) ** 2 + 1
    return depth * block + (c * patch * patch * d + d) + d + n_tokens * d + 2 * d


@pytest.mark.parametrize("name", sorted(TABLE5_VIT))
def test_vit_counts_and_table5_explained(name):
    d = VIT_DIMS[name]
    ours = meta_encoder(name)
    assert count_parameters(ours) == vit_count(d)
    p16 = meta_encoder(name, patch_size=16)
    one_block = count_parameters(p16) - 11 * count_parameters(p16.blocks[0])
    assert one_block == vit_count(d, depth=1, patch=16) == TABLE5_VIT[name]


# ----------------------------------------------------------------- shapes

@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("channels,side", [(3, 32), (1, 28), (1, 32)])
def test_encoder_shapes(name, channels, side):
    heavy = name in HEAVY
    enc = meta_encoder(name, in_channels=channels, image_size=side) if heavy else \
        build_encoder(name, in_channels=channels, image_size=side)
    x = torch.randn(2, channels, side, side, device="meta" if heavy else "cpu")
    y = enc(x)
    expected = EMBED[name] or channels * side * side
    assert enc.embed_dim == expected
    assert y.shape == (2, expected)
    if not heavy:
        assert torch.isfinite(y).all() and y.abs().sum() > 0


def test_vit_default_patch_sizes():
    assert meta_encoder("vit_tiny").patch_size == 8
    assert meta_encoder("vit_tiny", image_size=28).patch_size == 7
    assert meta_encoder("vit_tiny", image_size=64).patch_size == 8
    with pytest.raises(ConfigError, match="patch"):
        meta_encoder("vit_tiny", image_size=32, patch_size=5)


def test_unknown_encoder_and_option_are_user_errors():
    with pytest.raises(ConfigError, match="unknown encoder"):
        build_encoder("resnet99")
    with pytest.raises(ConfigError, match="no option"):
        build_encoder("convnet", patch_size=4)
    with pytest.raises(ConfigError, match="not available"):
        build_encoder("vit_tiny", norm="batch")
    with pytest.raises(ConfigError, match="groups of 8 channels"):
        build_encoder("convnet", norm="group", width=4)


# ----------------------------------------------------------------- norms and init

NORM_TYPES = {"batch": nn.BatchNorm2d, "layer": nn.GroupNorm, "group": nn.GroupNorm,
              "instance": nn.InstanceNorm2d}
NORM_CLASSES = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)


def norm_layers(module):
    return [m for m in module.modules() if isinstance(m, NORM_CLASSES)]


@pytest.mark.parametrize("name", ENCODERS)
def test_own_norm_names_the_norm_an_encoder_builds_by_default(name):
    # the run address hashes model.norm = own_norm(encoder) as 'default': the two must build one network
    kw = {"width": 8} if name in ("convnet", "mlp") else {"image_size": 32} if name.startswith("vit") else {}
    torch.manual_seed(0)
    by_default = build_encoder(name, norm="default", **kw)
    torch.manual_seed(0)
    named = build_encoder(name, norm=own_norm(name), **kw)
    assert repr(named) == repr(by_default)
    assert all(torch.equal(a, b) for a, b in zip(named.state_dict().values(), by_default.state_dict().values()))


@pytest.mark.parametrize("name,n_norm,default", [("convnet", 4, None), ("vgg11", 8, None),
                                                 ("vgg11_bn", 8, "batch"), ("resnet20", 21, "batch")])
@pytest.mark.parametrize("norm", ["default", "batch", "layer", "group", "instance", "none"])
def test_norm_options_give_named_layers_in_the_forward_path(name, n_norm, default, norm):
    enc = build_encoder(name, norm=norm, width=8 if name == "convnet" else 32)
    kind = default if norm == "default" else norm
    layers = norm_layers(enc)
    if kind in (None, "none"):
        assert layers == []
        return
    assert len(layers) == n_norm  # one after every conv (ResNet20: 19 convs + 2 shortcut projections)
    assert all(type(m) is NORM_TYPES[kind] for m in layers)
    if kind == "layer":
        assert all(m.num_groups == 1 for m in layers)
    if kind == "group":  # the paper's GroupNorm8: 8 channels per group
        assert all(m.num_channels == 8 * m.num_groups for m in layers)
        assert len({m.num_groups for m in layers}) > 1  # so not a fixed number of groups
    if kind == "instance":
        assert all(m.affine for m in layers)
    calls = []
    for m in layers:
        m.register_forward_hook(lambda mod, i, o: calls.append(mod))
    enc(torch.randn(2, 3, 32, 32))
    assert len(calls) == len(layers) and {id(m) for m in calls} == {id(m) for m in layers}


def test_he_init():
    torch.manual_seed(0)
    vgg = build_encoder("vgg11")
    w = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)][-1].weight  # last 512 -> 512 conv
    fan_out = w.shape[0] * 9
    assert w.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
    assert all((c.bias == 0).all() for c in vgg.modules() if isinstance(c, nn.Conv2d))
    mlp = build_encoder("mlp")
    lin = mlp.layers[4]
    assert lin.weight.std().item() == pytest.approx(math.sqrt(2 / lin.in_features), rel=0.02)
    bn = [m for m in build_encoder("resnet20").modules() if isinstance(m, nn.BatchNorm2d)]
    assert all((m.weight == 1).all() and (m.bias == 0).all() for m in bn)


def test_vit_init_and_distinct_blocks():
    torch.manual_seed(0)
    vit = build_encoder("vit_tiny")
    assert len(vit.blocks) == 12
    assert len({id(b) for b in vit.blocks}) == 12
    ptrs = [p.data_ptr() for p in vit.parameters()]
    assert len(ptrs) == len(set(ptrs))  # no tensor shared between layers
    with torch.no_grad():
        vit.blocks[0].attn.qkv.weight.add_(1.0)
    assert not torch.equal(vit.blocks[0].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    w = torch.cat([b.mlp[0].weight.flatten() for b in vit.blocks])
    assert w.std().item() == pytest.approx(0.02, rel=0.02)
    assert vit.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)


# ----------------------------------------------------------------- heads

def np_gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def np_unit_rows(w):
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def small_head(seed=0, hidden=(10, 12), **flags):
    torch.manual_seed(seed)
    return DINOHead(6, list(hidden), 5, 7, **flags).double()


def test_dino_head_matches_numpy():
    head = small_head()
    x = torch.randn(4, 6, dtype=torch.float64)
    h = x.numpy()
    for layer in head.mlp:
        if isinstance(layer, nn.Linear):
            h = np_gelu(h @ layer.weight.detach().numpy().T + layer.bias.detach().numpy())
    W, b = head.lin1.weight.detach().numpy().T, head.lin1.bias.detach().numpy()   # W: (in, mid)
    V = np_unit_rows(head.lin2.weight.detach().numpy()).T                          # V~: (mid, out)
    z = h @ W + b
    expected = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ V                  # V~^T (W^T x + b) / ||.||
    assert np.allclose(head(x).detach().numpy(), expected, atol=1e-12)
    assert np.allclose(np.linalg.norm(V, axis=0), 1)
    assert np.abs(expected).max() <= 1 + 1e-12  # cosine similarities


def test_dino_head_without_mlp_is_the_bottleneck_formula():
    torch.manual_seed(1)
    head = DINOHead(6, [], 5, 7).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    W, b = head.lin1.weight.detach().numpy(), head.lin1.bias.detach().numpy()
    z = x.numpy() @ W.T + b
    expected = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ np_unit_rows(head.lin2.weight.detach().numpy()).T
    assert np.allclose(head(x).detach().numpy(), expected, atol=1e-12)


def test_weight_normalization_really_constrains_the_last_layer():
    head = small_head()
    x = torch.randn(4, 6, dtype=torch.float64)
    before = head(x).detach()
    with torch.no_grad():
        head.lin2.weight.mul_(7.0)
        head.lin2.weight[0].mul_(3.0)
    after = head(x).detach()
    assert torch.allclose(before, after, atol=1e-12)  # a skipped normalization would scale outputs by 7
    z = head.bottleneck(x)
    assert torch.allclose(after, z @ nn.functional.normalize(head.lin2.weight, dim=1).T, atol=1e-12)
    raw = small_head(wn2=False)
    raw.load_state_dict(head.state_dict())
    assert torch.allclose(raw(x), z @ head.lin2.weight.T, atol=1e-12) and not torch.allclose(raw(x), after)


def test_wn2_gradient_flows_through_the_normalization():
    head = small_head()
    x = torch.randn(4, 6, dtype=torch.float64)
    head(x).sum().backward()
    g, w = head.lin2.weight.grad, head.lin2.weight.detach()
    # the gradient of a function of w/||w|| is orthogonal to w, row by row
    assert torch.allclose((g * w).sum(1), torch.zeros(7, dtype=torch.float64), atol=1e-12)


def test_unit_row_linear_is_linear_with_unit_rows_in_value_and_gradient():
    torch.manual_seed(3)
    w0, b = torch.randn(7, 5, dtype=torch.float64) * 3, torch.randn(7, dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    outs, grads = [], []
    for fn in (lambda w: unit_row_linear(x, w, b), lambda w: F.linear(x, w / w.norm(dim=1, keepdim=True), b)):
        w = w0.clone().requires_grad_()
        y = fn(w)
        (y * torch.arange(28, dtype=torch.float64).view(4, 7)).sum().backward()
        outs.append(y.detach()), grads.append(w.grad)
    assert torch.allclose(outs[0], outs[1], atol=1e-12) and torch.allclose(grads[0], grads[1], atol=1e-12)


def test_unit_row_linear_gradient_passes_gradcheck_batched_vmapped_and_at_a_zero_row():
    torch.manual_seed(4)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    for x in (torch.randn(5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)):
        assert torch.autograd.gradcheck(unit_row_linear, (x.requires_grad_(), w))
    # stacked runs vmap the head: per-run gradients equal the runs' own
    ws, xs = torch.randn(3, 6, 4, dtype=torch.float64), torch.randn(3, 5, 4, dtype=torch.float64)
    loss = lambda w, x: unit_row_linear(x, w).pow(2).sum()
    direct = lambda w, x: F.linear(x, w / w.norm(dim=1, keepdim=True)).pow(2).sum()
    expected = torch.stack([torch.func.grad(direct)(ws[k], xs[k]) for k in range(3)])
    assert torch.allclose(torch.func.vmap(torch.func.grad(loss))(ws, xs), expected, atol=1e-12)
    # an all-zero row: F.normalize's clamp, output 0, and a finite gradient (its norm's gradient is cut)
    w0 = w.detach().clone()
    w0[2] = 0
    w0.requires_grad_()
    y = unit_row_linear(xs[0], w0)
    y.sum().backward()
    assert torch.equal(y[:, 2].detach(), torch.zeros(5, dtype=torch.float64)) and torch.isfinite(w0.grad).all()


def test_unit_row_linear_under_bf16_autocast_follows_fp32_eager_and_compiled():
    # The head may run under autocast (a user's loop, or the tuned benchmark baseline): the forward's matmul is
    # bf16 there, the gradient comes back in each input's dtype, close to the fp32 one.
    torch.manual_seed(5)
    w0, x = torch.randn(64, 16) * 0.02, torch.randn(8, 16)
    grads = {}
    for mode in ("fp32", "bf16", "bf16-compiled"):
        w = w0.clone().requires_grad_()
        fn = torch.compile(unit_row_linear, backend="aot_eager") if mode == "bf16-compiled" else unit_row_linear
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            y = fn(x if mode == "fp32" else x.bfloat16(), w)  # under autocast the layer before gives bf16
        (y.float() * torch.linspace(-1, 1, 64)).sum().backward()
        assert w.grad.dtype == torch.float32
        grads[mode] = w.grad
    for mode in ("bf16", "bf16-compiled"):
        assert torch.allclose(grads[mode], grads["fp32"], rtol=0.05, atol=0.05 * grads["fp32"].abs().max())


def scale_rows_(linear, factors):
    with torch.no_grad():
        linear.weight.mul_(factors[:, None])


def test_flag_wn1():
    x = torch.randn(4, 6, dtype=torch.float64)
    factors = torch.linspace(0.5, 4, 5, dtype=torch.float64)
    for wn1, invariant in [(True, True), (False, False)]:
        head = small_head(wn1=wn1)
        z = head.bottleneck(x).detach()
        scale_rows_(head.lin1, factors)
        assert torch.allclose(head.bottleneck(x), z, atol=1e-12) == invariant
    assert not torch.allclose(small_head(wn1=True)(x), small_head(wn1=False)(x))


def test_flag_lin1():
    x = torch.randn(4, 6, dtype=torch.float64)
    head = small_head(lin1=False)
    assert head.lin1 is None and head.bottleneck_dim == 12
    assert torch.allclose(head.bottleneck(x), nn.functional.normalize(head.mlp(x), dim=-1))
    assert head.lin2.in_features == 12 and head(x).shape == (4, 7)
    assert small_head(lin1=True).bottleneck(x).shape == (4, 5)
    with pytest.raises(ConfigError, match="wn1"):
        small_head(lin1=False, wn1=True)


def test_flag_fn1():
    x = torch.randn(4, 6, dtype=torch.float64) * 10
    on, off = small_head(fn1=True), small_head(fn1=False)
    assert torch.allclose(on.bottleneck(x).norm(dim=1), torch.ones(4, dtype=torch.float64))
    assert not torch.allclose(off.bottleneck(x).norm(dim=1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(on.bottleneck(x), nn.functional.normalize(off.bottleneck(x), dim=1))


def test_flag_wn2():
    x = torch.randn(4, 6, dtype=torch.float64)
    on, off = small_head(wn2=True), small_head(wn2=False)
    z = on.bottleneck(x)
    assert torch.allclose(off(x), z @ off.lin2.weight.T)
    assert torch.allclose(on(x), z @ nn.functional.normalize(on.lin2.weight, dim=1).T)
    assert not torch.allclose(on(x), off(x))


def test_flag_lin2():
    x = torch.randn(4, 6, dtype=torch.float64)
    head = small_head(lin2=False, wn2=False)
    assert head.lin2 is None and head.out_dim == 5
    assert torch.allclose(head(x), head.bottleneck(x))
    assert small_head(lin2=True).out_dim == 7
    with pytest.raises(ConfigError, match="wn2"):
        small_head(lin2=False, wn2=True)


def test_flag_fn2():
    x = torch.randn(4, 6, dtype=torch.float64)
    on, off = small_head(fn2=True), small_head(fn2=False)
    assert torch.allclose(on(x).norm(dim=1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(on(x), nn.functional.normalize(off(x), dim=1))
    assert not torch.allclose(off(x).norm(dim=1), torch.ones(4, dtype=torch.float64))


def test_dino_head_init():
    torch.manual_seed(0)
    head = DINOHead(64, [256], 64, 256)
    w = torch.cat([head.mlp[0].weight.flatten(), head.lin1.weight.flatten(), head.lin2.weight.flatten()])
    assert w.std().item() == pytest.approx(0.02, rel=0.02)
    assert (head.mlp[0].bias == 0).all() and (head.lin1.bias == 0).all() and head.lin2.bias is None
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) for m in head.modules())


@pytest.mark.parametrize("kind", ["dino", "linear", "none"])
def test_last_of_bottleneck_is_the_head(kind):
    torch.manual_seed(0)
    cfg = HeadConfig(kind=kind, hidden_dims=[32, 32], bottleneck_dim=16, out_dim=64)
    head = build_head(cfg, 24)
    x = torch.randn(5, 24)
    assert torch.allclose(head.last(head.bottleneck(x)), head(x))
    assert head(x).shape == (5, head.out_dim)
    assert head.out_dim == {"dino": 64, "linear": 64, "none": 24}[kind]
    assert head.bottleneck(x).shape == (5, {"dino": 16, "linear": 24, "none": 24}[kind])


def test_linear_head_he_init():
    torch.manual_seed(0)
    head = build_head(HeadConfig(kind="linear", out_dim=512), 512)
    assert isinstance(head, LinearHead) and count_parameters(head) == 512 * 512 + 512
    assert head.linear.weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.02)
    assert (head.linear.bias == 0).all()


# ----------------------------------------------------------------- build_model

def small_config(seed_encoder="convnet"):
    return build_config(model={"encoder": seed_encoder, "width": 8},
                        head={"hidden_dims": [32], "bottleneck_dim": 16, "out_dim": 64})


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    cfg = small_config()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model(cfg, 1, 28, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    b = build_model(cfg, 1, 28, seed=5)
    c = build_model(cfg, 1, 28, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(not torch.equal(sa[k], sc[k]) for k in sa if k.endswith("weight"))
    x = torch.randn(3, 1, 28, 28)
    assert isinstance(a, DistillModel) and a.embed_dim == 32 and a.out_dim == 64
    assert torch.equal(a(x), a.head(a.embed(x))) and a(x).shape == (3, 64)


# ----------------------------------------------------------------- import-path encoders

class WithEmbedDim(nn.Module):
    def __init__(self, in_channels, image_size, hidden=6):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, hidden))
        self.embed_dim = hidden

    def forward(self, x):
        return self.net(x)


def with_embed_dim(in_channels, image_size, **kwargs):
    return WithEmbedDim(in_channels, image_size, **kwargs)


def without_embed_dim():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def not_a_module():
    return 3


def test_import_path_encoder_with_embed_dim_and_options():
    enc = build_encoder(f"{__name__}:with_embed_dim", in_channels=1, image_size=8, hidden=9)
    assert enc.embed_dim == 9 and enc(torch.randn(2, 1, 8, 8)).shape == (2, 9)
    enc = build_encoder(f"{__name__}:WithEmbedDim", in_channels=2, image_size=4)
    assert enc.embed_dim == 6


def test_import_path_encoder_without_embed_dim_is_probed():
    enc = build_encoder(f"{__name__}:without_embed_dim", in_channels=1, image_size=8)
    bn = enc[1]
    assert enc.embed_dim == 4 and enc.training
    assert bn.num_batches_tracked.item() == 0  # the probe pass ran in eval mode
    cfg = build_config(model={"encoder": f"{__name__}:without_embed_dim"}, head={"kind": "none"})
    model = build_model(cfg, 1, 8, seed=0)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 4)


def test_import_path_errors():
    with pytest.raises(ConfigError, match="cannot import"):
        build_encoder("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="cannot import"):
        build_encoder(f"{__name__}:no_such_callable")
    with pytest.raises(ConfigError, match="nn.Module"):
        build_encoder(f"{__name__}:not_a_module")
    with pytest.raises(ConfigError, match="model.norm"):
        build_encoder(f"{__name__}:without_embed_dim", norm="batch")


def test_vgg_width_mult_scales_every_conv():
    quarter = build_encoder("vgg11", 1, 28, width_mult=0.25)
    convs = [m for m in quarter.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 64, 128, 128, 128, 128]
    assert quarter.embed_dim == 128 and quarter(torch.randn(2, 1, 28, 28)).shape == (2, 128)
    half_cfg = [v if v == "M" else v // 2 for v in VGG11]
    assert count_parameters(build_encoder("vgg11", 3, 32, width_mult=0.5)) == vgg_count(half_cfg)
    cfg = build_config("cpu", overrides={"model.encoder": "vgg11", "model.width_mult": "0.5"})
    assert build_model(cfg, 1, 28, 0).encoder.embed_dim == 256  # the config key reaches the encoder
    with pytest.raises(ConfigError, match="width_mult"):
        build_encoder("resnet20", width_mult=0.5)  # would be silently ignored
    with pytest.raises(ConfigError, match="> 0"):
        build_encoder("vgg11", width_mult=0.0)
