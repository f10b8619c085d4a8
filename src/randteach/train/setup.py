"""What a run is made of: the device, the seeds, the data order, the training inputs, teacher and student.

Pure functions of the config (and of the Python API's objects), shared by the training loop and by the
analyses that must rebuild exactly what a run trained on (LR range test, landscape, supervised baselines).
"""
from __future__ import annotations

import torch

from ..config import Config
from ..data import ImageData, Preprocess, load_distilled, stratified_subset
from ..data.images import gaussian
from ..data.preprocess import Widen
from ..errors import UserError
from ..init import exact_copy, locality_init, neighborhood_init
from ..models import build_model
from ..models.common import fp32_channels_last
from ..runs.checkpoint import load_state_dict, load_weights

_SEED_STRIDE = 1_000_003  # separates the teacher, fresh-init and data-order streams of one train.seed
NEEDS_32PX = ("vgg", "resnet", "vit")


def resolve_device(name: str, flag: str = "--train.device") -> torch.device:
    """auto, cpu, cuda or cuda:N as a torch device; `flag` is the option that named it, for the messages."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{flag} {name}: not a device; valid: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {name} but no CUDA device is available; use {flag} cpu (or auto)")
    return device


def model_image_size(cfg: Config, native: int, builtin_encoder: bool = True) -> int:
    """VGG/ResNet/ViT need 32 px inputs at least (five 2x poolings, patch 8): 28 px images are zero-padded
    (not for an encoder given from Python, which model.encoder does not describe)."""
    if cfg.data.image_size:
        return cfg.data.image_size
    if builtin_encoder and cfg.model.encoder.startswith(NEEDS_32PX) and native < 32:
        return 32
    return native


def seeds(cfg: Config) -> dict:
    s = cfg.train.seed
    return {"teacher": cfg.init.teacher_seed if cfg.init.teacher_seed is not None else s * 3 + 1,
            "fresh": cfg.init.fresh_seed if cfg.init.fresh_seed is not None else s * 3 + 2,
            "data": s * 3 + 3}


# Above every other stream's seed (teacher, fresh and data seeds and the data orders' seed * stride + epoch
# stay below 2^62): a per-weight epsilon is drawn independently of the fresh init it scales.
_EPSILON_STREAM = 2 ** 62


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a pure function of (seed, epoch), so a resumed run replays it."""
    g = torch.Generator().manual_seed(seed * _SEED_STRIDE + epoch)
    return torch.randperm(n, generator=g)


def build_teacher_and_student(cfg: Config, in_channels: int, image_size: int, encoder=None,
                              dtype: torch.dtype | None = None):
    """Teacher (random init, or a checkpoint) and the student by the configured init rule.

    `encoder` (Python API): a factory or module instance that replaces cfg.model.encoder.
    `dtype`: hold a locality / neighborhood pair in this dtype (float64 keeps the whole 1e-10 residue)."""
    sd = seeds(cfg)
    fresh_init = cfg.init.mode in ("locality", "neighborhood", "independent")
    if fresh_init and sd["teacher"] == sd["fresh"] and not cfg.init.teacher_checkpoint:
        raise UserError(f"init.teacher_seed and init.fresh_seed are both {sd['teacher']} (given or derived from "
                        f"train.seed={cfg.train.seed}): the fresh init theta~ would be the teacher itself, where "
                        "RT Sec. 4 draws it afresh; choose another seed for one of them")
    teacher = build_model(cfg, in_channels, image_size, seed=sd["teacher"], encoder=encoder)
    if cfg.init.teacher_checkpoint:
        load_weights(teacher, load_state_dict(cfg.init.teacher_checkpoint, "student"), cfg.init.teacher_checkpoint)
    mode = cfg.init.mode
    if mode == "copy":
        return teacher, exact_copy(teacher)
    if mode == "checkpoint":
        student = exact_copy(teacher)
        load_weights(student, load_state_dict(cfg.init.checkpoint, "student"), cfg.init.checkpoint)
        return teacher, student
    fresh = build_model(cfg, in_channels, image_size, seed=sd["fresh"], encoder=encoder)
    if mode == "independent":
        return teacher, fresh
    if dtype is not None:
        teacher.to(dtype)
    if mode == "neighborhood":
        draw = None
        if cfg.init.epsilon_draw == "normal":
            draw = torch.Generator().manual_seed(_EPSILON_STREAM + sd["fresh"])
        return teacher, neighborhood_init(teacher, fresh, cfg.init.epsilon, dtype, draw)
    return teacher, locality_init(teacher, fresh, cfg.init.alpha, cfg.init.variance_preserving, dtype)


def trains_channels_last(cfg: Config, inputs: torch.Tensor, encoder: torch.nn.Module, device: torch.device,
                         bf16: bool) -> bool:
    """Whether training lays the images and the models out in channels-last memory format: image inputs with
    train.channels_last on, under bf16, or in fp32 where the encoder runs faster so (`fp32_channels_last`)."""
    return inputs.dim() == 4 and cfg.train.channels_last and (bf16 or fp32_channels_last(encoder, device))


def distilled_subset(cfg: Config, data: ImageData) -> ImageData:
    """The images a run distills on: `data`, or its class-stratified subset of data.n_samples images."""
    if not cfg.data.n_samples:
        return data
    if cfg.data.n_samples > len(data):
        raise UserError(f"data.n_samples={cfg.data.n_samples} but {data.name} has only {len(data)} training images")
    return data.subset(stratified_subset(data.labels, cfg.data.n_samples, seed=cfg.data.subset_seed))


def load_training_inputs(cfg: Config, train_data: ImageData | None = None, builtin_encoder: bool = True):
    """(inputs, preprocess, data, size): uint8 images + their preprocess, bf16 noise + its widening, or the
    Python API's float images as given (preprocess None). `builtin_encoder`: model.encoder is the encoder
    (not one given from Python), whose input size may differ from the images' (`model_image_size`)."""
    data = distilled_subset(cfg, train_data or load_distilled(cfg.data))
    if data.images.is_floating_point():  # Python API: float images are used as given
        size, preprocess = data.side(cfg.data.image_size), None
    else:
        size = model_image_size(cfg, data.images.shape[-1], builtin_encoder)
        preprocess = Preprocess.fit(data, size=size)
    if cfg.data.inputs == "noise":  # Gaussian inputs of the (padded) images' shape, in the units the encoder sees
        shape = (len(data), data.images.shape[1], size, size)
        return gaussian(shape, cfg.data.noise_std, cfg.data.subset_seed), Widen(), data, size
    return data.images, preprocess, data, size
