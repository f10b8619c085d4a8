"""Models: an encoder g (the representation that is probed) and a projector head h; f = h o g.

    build_encoder(name, in_channels, image_size, norm, width, width_mult, **options) -> module with .embed_dim
    build_head(head_cfg, in_dim)                                         -> module with .out_dim
    build_model(cfg, in_channels, image_size, seed)                      -> DistillModel

Encoders: flatten, mlp, convnet (small.py); vgg11..19[_bn] (vgg.py); resnet18/34/50, resnet20/56
(resnet.py); vit_tiny/small/medium/base (vit.py); or an import path 'package.module:callable'.
Parameter counts (3 input channels, 32x32, measured by tests/test_models.py against the
random-teacher paper's Table 5): vgg11 9,220,480; resnet18 11,168,832; resnet20 271,824 (and every
other VGG/ResNet row). Table 5's ViT rows count one block and patch 16 (the authors' code shared one
block object across layers); ours have 12 distinct blocks and patch 8, e.g. vit_tiny 5,379,264.
"""
from __future__ import annotations

import copy
import importlib
import inspect

import torch
from torch import nn

from ..config import ENCODERS, Config, ConfigError, check_encoder
from .common import count_parameters, norm2d, resolve_norm
from .heads import DINOHead, IdentityHead, LinearHead, build_head, unit_row_linear
from .resnet import SPECS as RESNETS, build_resnet
from .small import build_small
from .vgg import CONFIGS as VGGS, VGG
from .vit import SIZES as VITS, build_vit

__all__ = ["build_encoder", "build_head", "build_model", "count_parameters", "DistillModel",
           "DINOHead", "LinearHead", "IdentityHead", "unit_row_linear", "norm2d"]


def build_encoder(name: str, in_channels: int = 3, image_size: int = 32, norm: str = "default",
                  width: int = 32, width_mult: float = 1.0, **options) -> nn.Module:
    """A freshly (He / trunc-normal) initialized encoder mapping (B, C, H, W) floats to (B, embed_dim).

    Draws from torch's global RNG like any nn.Module; `build_model` seeds it and leaves it untouched.
    options: patch_size for ViTs; keyword arguments of an import-path callable.
    """
    if ":" in name:
        if norm != "default":
            raise ConfigError(f"model.norm={norm} cannot be applied to the imported encoder {name!r}; "
                              "leave model.norm=default and choose the normalization inside it")
        return _import_encoder(name, in_channels, image_size, **options)
    if name not in ENCODERS:
        raise ConfigError(f"model.encoder: unknown encoder {name!r}; valid choices: {', '.join(ENCODERS)}, "
                          "or an import path 'package.module:callable'")
    allowed = {"vit_tiny": ("patch_size",), "vit_small": ("patch_size",),
               "vit_medium": ("patch_size",), "vit_base": ("patch_size",)}.get(name, ())
    unknown = set(options) - set(allowed)
    if unknown:
        raise ConfigError(f"encoder {name} takes no option(s) {', '.join(sorted(unknown))}"
                          + (f"; it takes {', '.join(allowed)}" if allowed else ""))
    if width_mult != 1.0 and not name.startswith("vgg"):
        raise ConfigError(f"model.width_mult={width_mult:g} applies to VGG encoders only, not {name}; "
                          "use model.width for convnet/mlp, or leave width_mult at 1")
    if width_mult <= 0:
        raise ConfigError(f"model.width_mult must be > 0, got {width_mult:g}")
    if name in ("flatten", "mlp", "convnet"):
        return build_small(name, in_channels, image_size, norm, width)
    if name.startswith("vgg"):
        base = name.removesuffix("_bn")
        return VGG(VGGS[base], in_channels, resolve_norm(norm, name), width_mult)
    if name in RESNETS:
        return build_resnet(name, in_channels, image_size, resolve_norm(norm, name))
    if name in VITS:
        resolve_norm(norm, name, allowed=("default", "layer"))
        return build_vit(name, in_channels, image_size, options.get("patch_size"))
    raise AssertionError(f"encoder {name} is listed in ENCODERS but not built here")


def _import_encoder(path: str, in_channels: int, image_size: int, **options) -> nn.Module:
    """'package.module:callable' -> callable(in_channels=..., image_size=..., **options), passing
    in_channels/image_size only where the signature accepts them; embed_dim from the module's
    .embed_dim, else from one forward pass of a dummy batch."""
    check_encoder(path)  # refused before anything is imported unless the user allowed this module
    module_name, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.encoder: cannot import {path!r} ({e}); expected 'package.module:callable' "
                          "with the module importable from this Python environment (the current folder is not "
                          "on the path of the randteach command: PYTHONPATH=. for a module here)") from None
    return call_encoder_factory(obj, path, in_channels, image_size, **options)


def call_encoder_factory(obj, what: str, in_channels: int, image_size: int, **options) -> nn.Module:
    """Call an encoder factory, passing in_channels/image_size where its signature accepts them (by name,
    or by **kwargs when `options` is empty)."""
    kwargs = dict(options)
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without one: called as it is
        signature = None
    params = signature.parameters if signature is not None else {}
    # With arguments of the user's own, **kwargs is assumed to forward them to a model class (as
    # timm.create_model does), which would refuse in_channels/image_size: pass those only by name then.
    takes_any = not options and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in (("in_channels", in_channels), ("image_size", image_size)):
        if takes_any or key in params:
            kwargs[key] = value
    try:
        encoder = obj(**kwargs)
    except TypeError as e:
        if signature is None or _binds(signature, kwargs):  # the arguments fit: a fault inside the factory
            raise
        raise ConfigError(f"model.encoder: {what!r} cannot be called with the arguments "
                          f"{', '.join(sorted(kwargs)) or 'none'} ({e}); give its own arguments with "
                          "--model.encoder_args '{\"name\": value}' (from Python: functools.partial(factory, name=value))") from None
    if not isinstance(encoder, nn.Module):
        raise ConfigError(f"model.encoder: {what!r} returned a {type(encoder).__name__}, expected a torch.nn.Module")
    encoder.embed_dim = _checked_embed_dim(encoder, what, in_channels, image_size)
    return encoder


def _binds(signature: inspect.Signature, kwargs: dict) -> bool:
    try:
        signature.bind(**kwargs)
        return True
    except TypeError:
        return False


def _checked_embed_dim(encoder: nn.Module, path: str, in_channels: int, image_size: int) -> int:
    """The width of an encoder's output on a batch of two blank images of the data's shape: an encoder from
    Python that cannot take the data, or whose .embed_dim is not its output width, is a ConfigError here
    rather than a traceback from inside a layer at the first step. A declared .embed_dim is checked on a copy
    on the meta device where that copy runs (shapes only: no call the encoder would see as a real one);
    otherwise the width is read from one forward pass."""
    shape = (2, in_channels, image_size, image_size)
    declared = getattr(encoder, "embed_dim", None)
    out = _meta_output(encoder, shape) if isinstance(declared, int) else None
    if out is None:
        out = _real_output(encoder, path, shape)
    if out.ndim != 2 or out.shape[0] != 2:
        raise ConfigError(f"model.encoder: {path!r} maps a {shape} batch to shape {tuple(out.shape)}; "
                          "expected (2, embed_dim): flatten inside the encoder")
    if isinstance(declared, int) and declared != out.shape[1]:
        raise ConfigError(f"model.encoder: {path!r} declares embed_dim = {declared} but gives {out.shape[1]} "
                          "features per image; correct .embed_dim, or leave it out (it is read from its output)")
    return int(out.shape[1])


def _meta_output(encoder: nn.Module, shape: tuple) -> torch.Tensor | None:
    """The output of a meta-device copy of the encoder, or None where such a copy cannot run an encoder that
    may well work: an operation without a meta kernel, a value read in forward (.item()), a tensor kept
    outside the parameters and buffers."""
    try:
        model = copy.deepcopy(encoder).to("meta").eval()
        ref = next(model.parameters(), torch.empty(0, device="meta"))
        with torch.no_grad():
            return model(torch.zeros(shape, device="meta", dtype=ref.dtype))
    except Exception:  # noqa: BLE001 - the real forward pass that follows tells
        return None


def _real_output(encoder: nn.Module, path: str, shape: tuple) -> torch.Tensor:
    ref = next(encoder.parameters(), torch.empty(0))
    was_training = encoder.training
    encoder.eval()  # no batch-norm statistics updated by the probe pass
    try:
        with torch.no_grad():
            return encoder(torch.zeros(shape, device=ref.device, dtype=ref.dtype))
    except RuntimeError as e:
        raise ConfigError(f"model.encoder: {path!r} cannot take the data's images, a batch of shape {shape} "
                          f"(N, C, H, W): {str(e).strip().splitlines()[0]}. Build it for {shape[1]} "
                          f"channel(s) of {shape[2]} x {shape[3]} pixels") from None
    finally:
        encoder.train(was_training)


class DistillModel(nn.Module):
    """f = head o encoder; `embed` is the representation that gets probed."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.embed_dim = encoder.embed_dim
        self.out_dim = head.out_dim

    def embed(self, x):
        return self.encoder(x)

    def forward(self, x):
        return self.head(self.encoder(x))


def reinitialized(module: nn.Module) -> nn.Module:
    """A copy of a user's encoder instance with every parameter drawn anew (by each submodule's
    reset_parameters, from torch's global RNG); refuses parameters that no submodule can reset."""
    import copy
    fresh = copy.deepcopy(module)
    covered = set()
    for sub in fresh.modules():
        if hasattr(sub, "reset_parameters") and callable(sub.reset_parameters):
            sub.reset_parameters()
            covered.update(id(p) for p in sub.parameters(recurse=False))
    missed = [name for name, p in fresh.named_parameters() if id(p) not in covered]
    if missed:
        raise ConfigError(f"cannot draw a fresh initialization of the encoder: parameter(s) {', '.join(missed[:5])} "
                          "belong to modules without reset_parameters(); pass a factory (a callable returning a "
                          "new encoder) instead of an instance")
    return fresh


def build_model(cfg: Config, in_channels: int, image_size: int, seed: int, encoder=None) -> DistillModel:
    """Encoder + head of `cfg`, initialized from `seed` alone: the same seed gives the same
    parameters whatever torch's global RNG state, which is left as it was.

    `encoder` (Python API) replaces cfg.model.encoder: a factory (callable returning an nn.Module,
    called with in_channels/image_size where it accepts them) or an nn.Module instance, re-initialized."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if encoder is not None:
            encoder = given_encoder(encoder, in_channels, image_size)
        else:
            encoder = build_encoder(cfg.model.encoder, in_channels, image_size, cfg.model.norm, cfg.model.width,
                                    cfg.model.width_mult, **cfg.model.encoder_args)
        head = build_head(cfg.head, encoder.embed_dim)
    return DistillModel(encoder, head)


def given_encoder(encoder, in_channels: int, image_size: int) -> nn.Module:
    """A new encoder from the Python API's `encoder`: a factory (called with in_channels/image_size where it
    accepts them) or an nn.Module instance (a re-initialized copy), with `.embed_dim`."""
    if isinstance(encoder, nn.Module):
        encoder = reinitialized(encoder)
        encoder.embed_dim = _checked_embed_dim(encoder, type(encoder).__name__, in_channels, image_size)
        return encoder
    return call_encoder_factory(encoder, getattr(encoder, "__name__", "encoder"), in_channels, image_size)
