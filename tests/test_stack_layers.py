"""The layers that keep a stack's runs side by side in the channels (randteach.train.stack_layers): the replaced
layer's values and gradients outside vmap, each run's own values under vmap, and no copy of the activations."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.profiler import profile

from randteach.models.small import ConvNet
from randteach.train.stack_layers import fold_runs_into_channels
from randteach.train.stacked import _side_by_side

LAYERS = [lambda: nn.MaxPool2d(2, ceil_mode=True), lambda: nn.MaxPool2d(3, stride=2, padding=1),
          lambda: nn.AvgPool2d(2), lambda: nn.AdaptiveAvgPool2d(1), lambda: nn.AdaptiveAvgPool2d((2, 3)),
          lambda: nn.GroupNorm(2, 6), lambda: nn.GroupNorm(1, 6), lambda: nn.GroupNorm(3, 6, affine=False),
          lambda: nn.Conv2d(6, 4, 3, padding=1), lambda: nn.Conv2d(6, 6, 3, stride=2, groups=2, bias=False),
          lambda: nn.BatchNorm2d(6), lambda: nn.BatchNorm2d(6, affine=False), lambda: nn.ReLU()]


def randomized(layer: nn.Module, seed: int) -> nn.Module:
    """`layer` with random parameters and floating-point buffers (a batch norm's running statistics: variances
    positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        for b in layer.buffers():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)
    return layer


@pytest.mark.parametrize("make", LAYERS)
def test_a_folded_layer_outside_vmap_is_the_layer_it_replaces(make):
    layer = randomized(make().double(), 0)
    folded = fold_runs_into_channels(copy.deepcopy(layer))
    assert type(folded) is not type(layer) and isinstance(folded, type(layer))
    x = torch.randn(3, 6, 7, 9, dtype=torch.float64, requires_grad=True)
    assert torch.equal(folded(x), layer(x))
    params = tuple(folded.parameters())
    assert torch.autograd.gradcheck(lambda x, *p: functional_call(folded, dict(zip(["weight", "bias"], p)), (x,)),
                                    (x, *[p.detach().requires_grad_() for p in params]))


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("layout", ["contiguous", "runs in the channels"])
@pytest.mark.parametrize("training", [True, False])
def test_under_vmap_each_run_gets_its_own_layer_of_its_own_input(make, layout, training):
    torch.manual_seed(0)
    k = 4
    layers = [randomized(make(), seed).train(training) for seed in range(k)]
    params, buffers = stack_module_state(layers)
    folded = fold_runs_into_channels(copy.deepcopy(layers[0]).to("meta"))
    batches = [torch.randn(5, 6, 8, 8, requires_grad=True) for _ in range(k)]
    x = _side_by_side(batches, channels_last=layout != "contiguous")
    out = vmap(lambda p, b, x: functional_call(folded, (p, b), (x,)))(params, buffers, x)
    expected = torch.stack([layer(b) for layer, b in zip(layers, batches)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, stacked in buffers.items():  # a batch norm's running statistics, updated in training
        torch.testing.assert_close(stacked, torch.stack([dict(m.named_buffers())[name] for m in layers]))
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad(out, [*batches, *params.values()], cotangent)
    want = torch.autograd.grad(expected, [*batches, *[p for m in layers for p in m.parameters()]], cotangent)
    n_params = len(params)
    torch.testing.assert_close(grads[:k], want[:k], rtol=1e-5, atol=1e-5)
    for i, g in enumerate(grads[k:]):  # the stacked parameter i holds run r's parameter i at [r]
        torch.testing.assert_close(g, torch.stack(want[k + i::n_params]), rtol=1e-5, atol=1e-5)


def test_an_unbatched_input_is_shared_by_every_run():
    layers = [randomized(nn.GroupNorm(2, 6), seed) for seed in range(3)]
    params, buffers = stack_module_state(layers)
    folded = fold_runs_into_channels(copy.deepcopy(layers[0]).to("meta"))
    x = torch.randn(5, 6, 4, 4)
    out = vmap(lambda p, b: functional_call(folded, (p, b), (x,)))(params, buffers)
    torch.testing.assert_close(out, torch.stack([layer(x) for layer in layers]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: nn.GroupNorm(2, 6), lambda: nn.Conv2d(6, 4, 3, padding=1)])
def test_unbatched_parameters_are_shared_by_every_run(make):
    torch.manual_seed(0)
    layer = randomized(make(), 0)
    folded = fold_runs_into_channels(copy.deepcopy(layer))
    x = torch.randn(3, 5, 6, 4, 4)  # 3 runs' inputs, one layer for all
    torch.testing.assert_close(vmap(folded)(x), torch.stack([layer(b) for b in x]), rtol=1e-5, atol=1e-5)


def test_inputs_side_by_side_are_the_stacked_batches_and_feed_a_grouped_convolution_without_a_copy():
    batches = [torch.randn(5, 3, 8, 8) for _ in range(4)]
    x = _side_by_side(batches, channels_last=True)
    assert torch.equal(x, torch.stack(batches))
    grouped = x.movedim(0, 1).flatten(1, 2)  # what vmap hands a convolution over 4 weight sets
    assert grouped._base is not None and grouped.is_contiguous(memory_format=torch.channels_last)


def profiled_stack(modules: list[nn.Module], in_channels: int, fold: bool, backward: bool):
    """The profile, with input shapes, of one vmapped forward (and backward) of the stacked `modules` (the
    first one's code, folded or not) on a channels-last batch of 5 images of 8 px per module."""
    params, buffers = stack_module_state(modules)
    model = copy.deepcopy(modules[0]).to("meta")
    if fold:
        fold_runs_into_channels(model)
    x = _side_by_side([torch.randn(5, in_channels, 8, 8) for _ in modules], channels_last=True)
    with profile(record_shapes=True) as prof:
        out = vmap(lambda p, b, x: functional_call(model, (p, b), (x,)))(params, buffers, x)
        if backward:
            out.sum().backward()
    return prof


def activation_ops(prof, names: tuple[str, ...]) -> dict[str, list]:
    """The input shapes of the operations `names` on feature maps (4 or more dimensions, the batch's 5 among
    them) in `prof`: not the weights' copies into the grouped layout, nor the (5, 4 * 32) pooled features."""
    ops: dict[str, list] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        shape = e.input_shapes[0] if e.input_shapes else []
        if e.key in names and len(shape) >= 4 and 5 in shape:
            ops.setdefault(e.key, []).extend([shape] * e.count)
    return ops


def stacked_convnet_copies(fold: bool) -> int:
    """Copies of feature maps in one vmapped forward and backward of 4 stacked convnets."""
    prof = profiled_stack([ConvNet(1, 8) for _ in range(4)], 1, fold, backward=True)
    return len(activation_ops(prof, ("aten::copy_",)).get("aten::copy_", []))


def test_folded_layers_keep_a_stacked_convnet_free_of_activation_copies():
    # Without folding, vmap's pooling rule copies the activations at each of the three max-pools.
    assert stacked_convnet_copies(fold=True) == 0 < stacked_convnet_copies(fold=False)


def test_relus_of_a_folded_module_run_out_of_place():
    net = fold_runs_into_channels(ConvNet(1, 8))
    relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_convolutions_return_channels_last_outputs_when_asked_even_from_one_channel(channels_last):
    conv = fold_runs_into_channels(nn.Conv2d(1, 4, 3, padding=1), channels_last=channels_last)
    y = conv(torch.randn(2, 1, 6, 6).contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


def batch_norm_relu_ops(fold: bool) -> dict[str, list]:
    """The operations on feature maps of one vmapped training forward of 4 stacked batch norms + ReLUs."""
    layers = [randomized(nn.Sequential(nn.BatchNorm2d(6), nn.ReLU()), seed) for seed in range(4)]
    prof = profiled_stack(layers, 6, fold, backward=False)
    return activation_ops(prof, ("aten::native_batch_norm", "aten::clamp_min", "aten::mul", "aten::add"))


def test_a_stacked_batch_norm_and_relu_run_once_each_over_the_runs_channels():
    # vmap's own rules: the batch norm's affine scale and shift as separate passes, the ReLU on 5-d runs-first data
    assert batch_norm_relu_ops(fold=True) == {"aten::native_batch_norm": [[5, 24, 8, 8]],
                                              "aten::clamp_min": [[5, 24, 8, 8]]}
    assert batch_norm_relu_ops(fold=False) != batch_norm_relu_ops(fold=True)


def test_a_stacked_batch_norm_updates_running_statistics_stacked_in_any_dimension():
    layers = [randomized(nn.BatchNorm2d(6), seed) for seed in range(3)]
    params, buffers = stack_module_state(layers)
    buffers = {k: v.T.contiguous().T if v.dim() == 2 else v for k, v in buffers.items()}  # (3, 6), runs not outermost
    folded = fold_runs_into_channels(copy.deepcopy(layers[0]).to("meta"))
    x = torch.randn(3, 5, 6, 4, 4)
    out = vmap(lambda p, b, x: functional_call(folded, (p, b), (x,)))(params, buffers, x)
    torch.testing.assert_close(out, torch.stack([m(b) for m, b in zip(layers, x)]), rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(buffers[name], torch.stack([getattr(m, name) for m in layers]))


def test_a_stacked_batch_norm_in_training_refuses_one_running_average_for_all_runs():
    folded = fold_runs_into_channels(nn.BatchNorm2d(6))
    with pytest.raises(ValueError, match="running means"):
        vmap(folded)(torch.randn(3, 5, 6, 4, 4))
    folded.eval()  # evaluation only reads them: every run normalizes with the one set
    torch.testing.assert_close(vmap(folded)(torch.randn(3, 5, 6, 4, 4)).shape, torch.Size([3, 5, 6, 4, 4]))


def test_a_folded_batch_norm_checks_its_input_as_nn_batchnorm2d_does():
    folded = fold_runs_into_channels(nn.BatchNorm2d(4))
    for call in (lambda: folded(torch.randn(4, 4, 4)), lambda: vmap(folded)(torch.randn(3, 4, 4, 4))):
        with pytest.raises(ValueError, match="expected 4D input"):
            call()


@pytest.mark.parametrize("shape", [(3,), (3, 5), (3, 5, 7), (5, 3, 7, 2), (3, 5, 6, 4, 4)])
@pytest.mark.parametrize("in_dim", [0, -1])
def test_a_folded_relu_under_vmap_is_relu_of_any_shape(shape, in_dim):
    x = torch.randn(shape)
    torch.testing.assert_close(vmap(fold_runs_into_channels(nn.ReLU()), in_dims=in_dim)(x),
                               vmap(torch.relu, in_dims=in_dim)(x))


def test_a_folded_relu_outside_vmap_has_relus_second_derivatives():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    folded = fold_runs_into_channels(copy.deepcopy(net))
    x = torch.randn(5, 4, requires_grad=True)

    def input_gradient_penalty(model):
        grad, = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        # the first three parameters: the last bias does not reach the input gradient
        return torch.autograd.grad(grad.pow(2).sum(), list(model.parameters())[:3])

    for mine, want in zip(input_gradient_penalty(folded), input_gradient_penalty(net)):
        torch.testing.assert_close(mine, want)
