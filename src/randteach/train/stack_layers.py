"""Convolutions, pooling, batch and group norms and ReLUs for K runs stacked under vmap, side by side in the channels.

Under `torch.func.vmap` over K runs, a convolution with K weight sets runs as one grouped convolution on a
(B, K*C, H, W) tensor, and its output keeps that arrangement (the K runs side by side in the channel
dimension; in channels-last memory, (B, H, W, K, C)). PyTorch's vmap rules for pooling and group norm
reshape to (K*B, C, H, W) instead, the runs in front of the batch: a copy of the activations at every such
layer, into NCHW order, where a CPU's max-pool is several times slower than in channels-last; its batch
norm rule adds each run's scale and shift in separate elementwise passes, and its ReLU writes a new tensor
with the runs in front (both several times slower than one pass over the values where they lie:
`benchmarks/profile_stacked.py`). The layers here apply the op they replace, per channel or per group of
channels, to the (B, K*C, ...) arrangement itself: each run's values follow the replaced layer's formula,
only the copies go. Outside vmap they are the layer they replace.

`fold_runs_into_channels(module)` swaps them in for nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
nn.BatchNorm2d, nn.GroupNorm and nn.ReLU (out of place), and for nn.Conv2d (whose bias vmap's rule adds in a
separate pass).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._functorch import is_batchedtensor


class _ChannelOp(torch.autograd.Function):
    """op(x, *params) for an op that treats channels, or groups of channels, independently and whose
    parameters are indexed by output channel in their first dimension. Under vmap over K runs: op.folded(K)
    once on x as (B, K*C, ...), with each parameter's K run slices concatenated along that dimension."""

    @staticmethod
    def forward(op, x, *params):
        return op(x, *params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx, grad):
        # Outside vmap only: under vmap autograd records the folded op's own operations instead.
        inputs = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        with torch.enable_grad():
            out = ctx.op(*inputs)
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (None, *[next(grads) if t is not None and t.requires_grad else None for t in inputs])

    @staticmethod
    def vmap(info, in_dims, op, x, *params):
        k = info.batch_size
        x = _runs_at(x, in_dims[1], k, 1)                                   # (B, K, C, ...)
        stacked = [None if p is None else _runs_at(p, d, k, 0) for p, d in zip(params, in_dims[2:])]
        flat = [None if p is None else p.flatten(0, 1) for p in stacked]
        y = op.folded(k)(x.flatten(1, 2), *flat)
        for i in getattr(op, "updated", ()):  # written in place by the op: back where flattening made a copy
            if flat[i] is not None and flat[i].data_ptr() != stacked[i].data_ptr():
                stacked[i].copy_(flat[i].unflatten(0, (k, -1)))
        return y.unflatten(1, (k, -1)), 1


class _PointwiseOp(_ChannelOp):
    """op(x) for an elementwise op. Under vmap: op on the stacked tensor where its values lie, the (B, K, C, ...)
    feature maps of the runs side by side as one (B, K*C, ...) tensor (vmap's own rule first moves the runs to
    the front); any other stacked tensor as it is."""

    @staticmethod
    def vmap(info, in_dims, op, x):
        if in_dims[1] is None or x.dim() < 2:
            return op(x), in_dims[1]
        x = x.movedim(in_dims[1], 1)  # a view
        if x.dim() >= 4 and x.stride(1) == x.shape[2] * x.stride(2):  # (B, K, C, ...) as (B, K*C, ...): a view
            return op(x.flatten(1, 2)).unflatten(1, (info.batch_size, -1)), 1
        return op(x), 1


def _runs_at(t: torch.Tensor, run_dim: int | None, k: int, at: int) -> torch.Tensor:
    """`t` with its K runs in dimension `at` (a tensor without a run dimension is shared by all K runs)."""
    if run_dim is None:
        return t.unsqueeze(at).expand(*t.shape[:at], k, *t.shape[at:])
    return t.movedim(run_dim, at)


class _Pool:
    """A pooling function with its arguments: every channel pooled alone, so K runs fold as they are."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __call__(self, x):
        return self.fn(x, *self.args)

    def folded(self, k: int) -> _Pool:
        return self


class _GroupNorm:
    """F.group_norm with `groups` groups (Wu & He 2018): K runs side by side are K * groups groups."""

    def __init__(self, groups: int, eps: float):
        self.groups, self.eps = groups, eps

    def __call__(self, x, weight=None, bias=None):
        return F.group_norm(x, self.groups, weight, bias, self.eps)

    def folded(self, k: int) -> _GroupNorm:
        return _GroupNorm(k * self.groups, self.eps)


class _BatchNorm:
    """F.batch_norm (Ioffe & Szegedy 2015): every channel normalized alone over (B, H, W) with its own statistics,
    so K runs side by side fold as they are. Under vmap the running statistics are views of the stacked
    buffers, updated in place as a solo run's are."""

    def __init__(self, training: bool, momentum: float, eps: float):
        self.training, self.momentum, self.eps = training, momentum, eps
        self.updated = (2, 3) if training else ()  # the running mean and variance, among (weight, bias, mean, var)

    def __call__(self, x, weight, bias, running_mean, running_var):
        return F.batch_norm(x, running_mean, running_var, weight, bias, self.training, self.momentum, self.eps)

    def folded(self, k: int) -> _BatchNorm:
        return self


class _Conv:
    """F.conv2d with `groups` groups: K runs side by side are K * groups groups, each with its run's filters
    (and the bias added inside the convolution, where vmap's own rule adds it in a pass of its own)."""

    def __init__(self, stride, padding, dilation, groups: int, channels_last: bool):
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.channels_last = channels_last

    def __call__(self, x, weight, bias=None):
        y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        # An input of one channel (one run) is both NCHW and channels-last; oneDNN then returns NCHW.
        return y.contiguous(memory_format=torch.channels_last) if self.channels_last else y

    def folded(self, k: int) -> _Conv:
        return _Conv(self.stride, self.padding, self.dilation, k * self.groups, self.channels_last)


class FoldedConv2d(nn.Conv2d):
    channels_last = False  # set by fold_runs_into_channels

    def forward(self, x):
        op = _Conv(self.stride, self.padding, self.dilation, self.groups, self.channels_last)
        return _ChannelOp.apply(op, x, self.weight, self.bias)


class FoldedMaxPool2d(nn.MaxPool2d):
    def forward(self, x):
        return _ChannelOp.apply(_Pool(F.max_pool2d, self.kernel_size, self.stride, self.padding, self.dilation,
                                      self.ceil_mode), x)


class FoldedAvgPool2d(nn.AvgPool2d):
    def forward(self, x):
        return _ChannelOp.apply(_Pool(F.avg_pool2d, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                      self.count_include_pad, self.divisor_override), x)


class FoldedAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    def forward(self, x):
        return _ChannelOp.apply(_Pool(F.adaptive_avg_pool2d, self.output_size), x)


class FoldedGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return _ChannelOp.apply(_GroupNorm(self.num_groups, self.eps), x, self.weight, self.bias)


class FoldedBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x):
        self._check_input_dim(x)
        if not _batched(x, self.weight, self.running_mean):
            # outside vmap: nn.BatchNorm2d itself (a recomputation in _ChannelOp.backward would update the
            # running statistics a second time)
            return super().forward(x)
        if self.training and self.track_running_stats:
            if self.running_mean is not None and not _batched(self.running_mean):
                raise ValueError("a batch norm of K stacked runs in training needs K running means and variances "
                                 "(stack_module_state's buffers), not one shared by every run")
            self.num_batches_tracked.add_(1)
        use_batch_stats = self.training or self.running_mean is None
        running = ((self.running_mean, self.running_var) if not self.training or self.track_running_stats
                   else (None, None))
        return _ChannelOp.apply(_BatchNorm(use_batch_stats, self.momentum, self.eps), x, self.weight, self.bias,
                                *running)


class FoldedReLU(nn.ReLU):
    def forward(self, x):
        # outside vmap torch's own ReLU, which a double backward and torch.func.grad differentiate as nn.ReLU
        return _PointwiseOp.apply(F.relu, x) if _batched(x) else F.relu(x)


def _batched(*tensors) -> bool:
    """Whether one of `tensors` holds K runs under vmap (None entries are skipped)."""
    return any(t is not None and is_batchedtensor(t) for t in tensors)


_FOLDED = {nn.Conv2d: FoldedConv2d, nn.MaxPool2d: FoldedMaxPool2d, nn.AvgPool2d: FoldedAvgPool2d,
           nn.AdaptiveAvgPool2d: FoldedAdaptiveAvgPool2d, nn.GroupNorm: FoldedGroupNorm,
           nn.BatchNorm2d: FoldedBatchNorm2d, nn.ReLU: FoldedReLU}


def _foldable(m: nn.Module) -> bool:
    if getattr(m, "return_indices", False) or getattr(m, "padding_mode", "zeros") != "zeros":
        return False
    # a cumulative moving average (momentum None) reads the step count to the host, which vmap cannot
    return not isinstance(m, nn.BatchNorm2d) or m.momentum is not None


def fold_runs_into_channels(module: nn.Module, channels_last: bool = False) -> nn.Module:
    """`module`, with each of its convolutions, pools, batch and group norms and ReLUs made, in place, the folded
    subclass above: the same attributes, parameters and parameter names, so a stacked state dict applies to it
    unchanged. `channels_last`: the convolutions return channels-last outputs (the inputs are channels-last)."""
    for m in module.modules():
        folded = _FOLDED.get(type(m))
        if folded is not None and _foldable(m):
            m.__class__ = folded
            if folded is FoldedConv2d:
                m.channels_last = channels_last
        if isinstance(m, nn.ReLU):
            # In place, a ReLU writes into a view of the (B, K*C, ...) tensor, and autograd then differentiates
            # it by cloning the whole tensor's gradient (CopySlices): measured slower than a new tensor.
            m.inplace = False
    return module
