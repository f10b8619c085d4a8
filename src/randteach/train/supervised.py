"""Supervised training from any checkpoint: the recipe of the paper's lottery-ticket and mode-connectivity
experiments (Sarnthein et al. 2023, Sec. 6, Fig. 8-9, App. E.5; Frankle et al. 2019), with every value configurable.

A `Classifier` is an encoder (from a run's teacher, student init or student, a checkpoint file, or a
fresh random init) plus a new linear layer to the classes, initialized from a seed. Training is SGD with
momentum and weight decay (on every parameter), a multi-step learning-rate schedule, cross-entropy, and
random horizontal flips + zero-padded random crops applied to the uint8 batch with torch ops. The
data order of epoch e is `randteach.train.setup.epoch_order(n, seed, e)` and the augmentation of step s is
drawn from a generator seeded by (seed, s): a pure function of the recipe, so training is repeatable
and can start at any step (rewinding) with the schedule of that step.

Start specifications (`parse_start`): 'student', 'student_init', 'teacher' (a run directory's
checkpoints), 'random' (a fresh init of the run's architecture, drawn per run), or a checkpoint
path; optionally '@L' = after L epochs of supervised training from there (a rewinding point, Frankle et al. 2019).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import Config, OptimConfig, config_from_dict, dotted_to_nested, opt
from ..data import ImageData, Preprocess, load_configured, stratified_subset
from ..errors import UserError
from ..models import build_model, call_encoder_factory
from ..optim import build_optimizer, set_lr
from ..precision import autocast, exact_fp32
from ..runs.checkpoint import load_checkpoint, load_state_dict, load_weights
from ..runs.rundir import RunDir, check_encoder_given
from .host_memory import keep_freed_memory
from .setup import epoch_order
from .state import steps_per_epoch

_AUG_STRIDE = 1_000_003  # separates the augmentation streams of different seeds
RUN_ROLES = ("student", "student_init", "teacher")


@dataclass
class Recipe:
    """Supervised training; the defaults are the paper's CIFAR-10 ResNet18 recipe (Sarnthein et al. 2023, App. E.5)."""
    epochs: float = opt(160, "epochs of supervised training", gt=0)
    batch_size: int = opt(256, "samples per step (one CIFAR-10 epoch = 196 steps)", gt=0)
    lr: float = opt(0.1, "initial learning rate", gt=0)
    momentum: float = opt(0.9, "SGD momentum", ge=0, lt=1)
    weight_decay: float = opt(1e-4, "weight decay (every parameter)", ge=0)
    milestones: list[float] = opt([80, 120], "epochs at which the learning rate is multiplied by gamma", ge=0)
    gamma: float = opt(0.1, "learning-rate factor at each milestone", gt=0)
    augment: bool = opt(True, "random horizontal flip + zero-padded random crop")
    pad: int = opt(4, "padding of the random crop, in pixels", ge=0)
    seed: int = opt(0, "seed of the data order, the augmentation and the new classifier")
    eval_every: float = opt(0, "test accuracy every this many epochs (0 = only at the end)", ge=0)

    def steps_per_epoch(self, n: int) -> int:
        return steps_per_epoch(n, self.batch_size)

    def total_steps(self, n: int) -> int:
        return max(1, round(self.epochs * self.steps_per_epoch(n)))

    def lr_at(self, step: int, n: int) -> float:
        """Multi-step schedule: lr * gamma^(number of milestones at or before the epoch of `step`)."""
        spe = self.steps_per_epoch(n)
        passed = sum(step >= round(m * spe) for m in self.milestones)
        return self.lr * self.gamma ** passed

    def replace(self, **changes) -> "Recipe":
        return Recipe(**{**asdict(self), **changes})


# ---------------------------------------------------------------------------------------------- data

@dataclass
class SupervisedData:
    train: ImageData
    test: ImageData
    preprocess: Preprocess
    num_classes: int


def load_supervised_data(cfg: Config, image_size: int, *, name: str | None = None, n_train: int | None = None,
                         n_test: int | None = None, splits: tuple[ImageData, ImageData] | None = None) -> SupervisedData:
    """Train and test split of `name` (default: the run's data set; `splits`: given ones, Python API),
    optionally stratified subsets."""
    if splits is not None:
        train, test = splits
        if train.images.is_floating_point() or test.images.is_floating_point():
            raise UserError("supervised training augments and normalizes uint8 images; pass uint8 images "
                            "(0..255), not float tensors")
    else:
        train = load_configured(cfg.data, "train", name)
        test = load_configured(cfg.data, "test", name)
    if n_train:
        train = train.subset(stratified_subset(train.labels, n_train, seed=cfg.data.subset_seed))
    if n_test:
        test = test.subset(stratified_subset(test.labels, n_test, seed=cfg.data.subset_seed))
    return SupervisedData(train, test, Preprocess.fit(train, size=image_size),
                          max(train.num_classes, test.num_classes))


def recipe_notes(recipe: Recipe, data: SupervisedData, n_train: int | None = None,
                 n_test: int | None = None) -> list[str]:
    """Settings that do less than they seem to on this data, for the command to print before it trains (by
    their command-line names)."""
    notes = []
    late = [m for m in recipe.milestones if m >= recipe.epochs]
    if late:
        notes.append(f"--milestones {' '.join(f'{m:g}' for m in late)} lie at or past the last epoch "
                     f"({recipe.epochs:g}): the learning rate does not drop there")
    for flag, asked, split in (("--n-train", n_train, data.train), ("--n-test", n_test, data.test)):
        if asked and asked > len(split):
            notes.append(f"{flag} {asked}: {split.name} has {len(split)} images in that split; all of them are used")
    side = min(data.train.images.shape[-2:])
    # RT App. E.5's 4 px on 32 px images is an eighth of the side; a quarter or more crops away much of an image
    if recipe.augment and 4 * recipe.pad > side:
        notes.append(f"--pad {recipe.pad}: random crops shift these {side}-pixel images by up to {recipe.pad} "
                     f"pixels (the paper's 4 pixels are for 32-pixel images); --pad {max(1, side // 8)} or "
                     "--no-augment keeps more of each image")
    return [f"note: {n}" for n in notes]


def augment_batch(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip (p = 1/2) and a random crop of the zero-padded uint8 batch (B, C, H, W)."""
    b, c, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    if pad <= 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]     # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]     # (B, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


# -------------------------------------------------------------------------------------------- models

class Classifier(nn.Module):
    """encoder -> linear layer `fc` to the classes (torch's default init, drawn from `seed`)."""

    def __init__(self, encoder: nn.Module, num_classes: int, seed: int = 0):
        super().__init__()
        self.encoder = encoder
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.fc = nn.Linear(encoder.embed_dim, num_classes)

    def forward(self, x):
        return self.fc(self.encoder(x))


@dataclass
class RunInfo:
    """What a run directory says about its models: config, input channels, image size. From the Python
    API, `path` may be None and `encoder` (a factory or module) replaces cfg.model.encoder."""
    path: Path | None
    cfg: Config
    in_channels: int
    image_size: int
    encoder: object = None


def run_info(run_dir: str | Path, encoder=None) -> RunInfo:
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path} is not a randteach run directory (no config.yaml); "
                        "give the directory `randteach distill` wrote")
    check_encoder_given(path, encoder)
    cfg = config_from_dict(RunDir(path).saved_config())
    teacher = load_checkpoint(path / "checkpoints" / "teacher.pt")
    return RunInfo(path, cfg, int(teacher["in_channels"]), int(teacher["image_size"]), encoder)


def with_overrides(run: RunInfo, pairs: dict[str, str]) -> RunInfo:
    """`run` with probe.* and data.root values ({'probe.n_train': '1000'}) on top of its saved config:
    the only keys an analysis of a finished run may change (the others describe how it was trained)."""
    bad = [k for k in pairs if not (k.startswith("probe.") or k == "data.root")]
    if bad:
        raise UserError(f"unknown option(s) {', '.join('--' + k for k in bad)}; this command takes "
                        "--probe.KEY VALUE and --data.root DIR besides its own options")
    if pairs:
        d = run.cfg.to_dict()
        for section, values in dotted_to_nested(pairs).items():
            d[section].update(values)
        run.cfg = config_from_dict(d)
    return run


def parse_start(spec: str) -> tuple[str, float]:
    """'student@1' -> ('student', 1.0); 'random' -> ('random', 0.0)."""
    source, sep, epochs = spec.rpartition("@") if "@" in spec else (spec, "", "0")
    try:
        l = float(epochs)
    except ValueError:
        raise UserError(f"start {spec!r}: the part after '@' must be a number of epochs, e.g. random@1") from None
    if l < 0:
        raise UserError(f"start {spec!r}: the rewinding epoch must be >= 0")
    return source, l


def random_init_seed(run: RunInfo, seed: int) -> int:
    """The init seed of a 'random' start: `seed` within the stream of the run's train.seed, so that the
    random starts of distilled runs with different seeds are independent draws, not one shared init
    (run seed 0 keeps `seed` itself)."""
    return seed + _AUG_STRIDE * run.cfg.train.seed


def build_classifier(run: RunInfo, source: str, num_classes: int, seed: int = 0) -> Classifier:
    """A Classifier whose encoder is `source` ('student', 'student_init', 'teacher', 'random' or a
    checkpoint file, or 'encoder': a copy of the Python API's module `run.encoder` as it is); a
    checkpoint that also holds a classifier (`fc.*`) brings it along. The new
    classifier is drawn from `seed`, a random encoder from `random_init_seed(run, seed)`."""
    if source == "encoder":
        if not isinstance(run.encoder, nn.Module):
            raise UserError("start 'encoder' means the encoder module passed to the Python API; there is none here")
        module = run.encoder
        encoder = call_encoder_factory(lambda: copy.deepcopy(module), type(module).__name__, run.in_channels,
                                       run.image_size)
        return Classifier(encoder, num_classes, seed)
    model = build_model(run.cfg, run.in_channels, run.image_size,
                        seed=random_init_seed(run, seed) if source == "random" else 0,
                        encoder=run.encoder)
    state = None
    if source in RUN_ROLES:
        if run.path is None:
            raise UserError(f"start {source!r} names a run's checkpoint, but no run directory was given; "
                            "from an encoder module the starts are 'encoder' and 'random'")
        state = load_state_dict(run.path, source)
    elif source != "random":
        if not Path(source).is_file():
            raise UserError(f"start {source!r}: expected one of {', '.join(RUN_ROLES)}, random, "
                            "or a checkpoint file")
        state = load_state_dict(source)
    clf = Classifier(model.encoder, num_classes, seed)
    if state is not None:
        enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        if not enc:
            raise UserError(f"{source}: the checkpoint holds no encoder weights (keys 'encoder.*')")
        load_weights(clf.encoder, enc, source)  # another architecture's checkpoint: a message, not a traceback
        fc = {k[len("fc."):]: v for k, v in state.items() if k.startswith("fc.")}
        if fc:
            clf.fc.load_state_dict(fc)
    return clf


# ---------------------------------------------------------------------------------- train / evaluate

@exact_fp32()  # fp32 that is fp32 on a GPU (no TF32), as in the training loop
@torch.no_grad()
def accuracy(model: nn.Module, data: ImageData, preprocess: Preprocess, device: torch.device,
             batch_size: int = 1024) -> float:
    """Top-1 accuracy in eval mode (the mode is restored)."""
    was = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, len(data), batch_size):
            x = preprocess(data.images[i:i + batch_size].to(device))
            correct += int((model(x).argmax(1).cpu() == data.labels[i:i + batch_size]).sum())
    finally:
        model.train(was)
    return correct / len(data)


@exact_fp32()  # fp32 that is fp32 on a GPU (no TF32), as in the training loop
@torch.no_grad()
def recompute_bn_stats(model: nn.Module, data: ImageData, preprocess: Preprocess, device: torch.device,
                       batches: int, batch_size: int, seed: int = 0) -> int:
    """Reset every batch-norm layer's running statistics and re-estimate them as the plain average over
    `batches` training batches (train-mode forward passes, no augmentation, a fixed seeded draw).
    Returns the number of batch-norm layers (0: nothing to do)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    try:
        order = epoch_order(len(data), seed, 0)
        for k in range(batches):
            idx = order[k * batch_size:(k + 1) * batch_size]
            if len(idx) == 0:
                break
            model(preprocess(data.images[idx].to(device)))
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        model.train(was)
    return len(norms)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)


def batch_indices(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """The sample indices of optimizer step `step`: its slice of epoch `step // steps_per_epoch`'s order
    (the distillation loop's order, so supervised and teacher-student runs see the same batches)."""
    epoch, offset = divmod(step, steps_per_epoch(n, batch))
    return epoch_order(n, seed, epoch)[offset * batch:(offset + 1) * batch]


def supervised_step(model: nn.Module, optimizer: torch.optim.Optimizer, idx: torch.Tensor, load, lr: float,
                    device: torch.device, *, micro: int | None = None, bf16: bool = False) -> float:
    """Gradients of the cross-entropy on the batch `idx` (in micro-batches of `micro` samples, each
    weighted by its share of the batch; `load(chunk) -> (inputs, labels)` on the device), with the
    learning rate set to `lr`. Returns the batch's loss; the caller takes the optimizer step (after
    masking or checking the gradients). The one supervised step of finetune, IMP, LMC and the LR
    range test."""
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    chunks = idx.split(micro) if micro else (idx,)
    total = 0.0
    for chunk in chunks:
        x, y = load(chunk)
        with autocast(device, bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        if len(chunks) == 1:
            loss.backward()
            return float(loss.detach())
        (loss * (len(chunk) / len(idx))).backward()
        total += float(loss.detach()) * len(chunk) / len(idx)
    return total


@exact_fp32()  # fp32 that is fp32 on a GPU (no TF32), as in the training loop
def train_supervised(model: nn.Module, data: SupervisedData, recipe: Recipe, device: torch.device, *,
                     start_step: int = 0, masks: dict[str, torch.Tensor] | None = None,
                     snapshot_steps: tuple[int, ...] = (), progress: bool = False, desc: str = "train") -> dict:
    """Train `model` in place from `start_step` to the recipe's last step.

    masks: name -> 0/1 tensor; the gradient of a masked weight is zeroed before and the weight itself
    after every optimizer step, so pruned weights stay exactly 0. Returns {"test_accuracy", "train_loss"
    (mean over the last epoch), "steps", "history" (test accuracy every eval_every epochs),
    "snapshots" (step -> state dict after that many steps, for each step in snapshot_steps)}."""
    n = len(data.train)
    batch = min(recipe.batch_size, n)
    spe = recipe.steps_per_epoch(n)
    total = recipe.total_steps(n)
    keep_freed_memory(device)
    model.to(device).train()
    masks = {k: v.to(device) for k, v in (masks or {}).items()}
    params = dict(model.named_parameters())
    apply_masks(model, masks)
    optimizer = build_optimizer(OptimConfig(name="sgd", lr=recipe.lr, momentum=recipe.momentum,
                                            weight_decay=recipe.weight_decay), model.parameters())
    eval_steps = set()
    if recipe.eval_every > 0:
        stride = max(1, round(recipe.eval_every * spe))
        eval_steps = set(range(stride, total, stride))
    snapshots, history, losses = {}, [], []

    def snap(step):
        if step in snapshot_steps:
            snapshots[step] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    snap(start_step)
    for step in tqdm(range(start_step, total), disable=not progress, desc=desc, unit="step", dynamic_ncols=True):
        epoch = step // spe
        idx = batch_indices(n, batch, recipe.seed, step)

        def load(chunk, step=step):
            x = data.train.images[chunk]
            if recipe.augment:
                x = augment_batch(x, recipe.pad, torch.Generator().manual_seed(recipe.seed * _AUG_STRIDE + step))
            return data.preprocess(x.to(device)), data.train.labels[chunk].to(device)

        loss = supervised_step(model, optimizer, idx, load, recipe.lr_at(step, n), device)
        if not math.isfinite(loss):
            raise UserError(f"supervised training diverged at step {step + 1} (loss {loss}); "
                            "lower --lr")
        for name, mask in masks.items():
            if params[name].grad is not None:
                params[name].grad.mul_(mask)
        optimizer.step()
        apply_masks(model, masks)
        if epoch == (total - 1) // spe:
            losses.append(loss)
        snap(step + 1)
        if step + 1 in eval_steps:
            history.append({"epoch": (step + 1) / spe,
                            "test_accuracy": accuracy(model, data.test, data.preprocess, device)})
    acc = accuracy(model, data.test, data.preprocess, device)
    history.append({"epoch": total / spe, "test_accuracy": acc})
    return {"test_accuracy": acc, "train_loss": sum(losses) / len(losses) if losses else float("nan"),
            "steps": total - start_step, "history": history, "snapshots": snapshots}


def rewind_step(recipe: Recipe, n: int, epochs: float) -> int:
    """The step of a rewinding point `epochs` epochs into training (must lie before the end)."""
    step = round(epochs * recipe.steps_per_epoch(n))
    if step >= recipe.total_steps(n):
        raise UserError(f"rewinding to epoch {epochs:g} leaves nothing to train: the recipe trains "
                        f"{recipe.epochs:g} epochs; rewind earlier or train longer")
    return step


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def provenance(run: RunInfo, data: SupervisedData, recipe: Recipe) -> dict:
    """What a supervised result was computed from, for its JSON file."""
    return {"run": str(run.path) if run.path is not None else None, "data": data.train.name, "n_train": len(data.train), "n_test": len(data.test),
            "recipe": asdict(recipe)}


def check_distinct(starts: list[str]) -> None:
    """Each start once: a repeated one ('student' and 'student@0' are one) was trained and shown twice."""
    seen: dict[tuple[str, float], str] = {}
    for spec in starts:
        key = parse_start(spec)
        if key in seen:
            raise UserError(f"--start {seen[key]} and {spec} name the same start; give each start once")
        seen[key] = spec


def label_of(spec: str) -> str:
    """A file-name-safe label of a start specification."""
    return "".join(c if c.isalnum() or c in "@._-" else "_" for c in spec)
