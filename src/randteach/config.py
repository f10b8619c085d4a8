"""Configuration: typed dataclasses, YAML presets and dotted command-line overrides.

Every knob of a run lives here, once, with its help text. A config is built from
a preset (YAML shipped in `randteach/presets/`), an optional YAML file, and
`--section.key value` overrides, in that order; `Config.validate()` checks every
value against its declared type and choices, and the resolved config is saved
next to the run's results.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import yaml

from .errors import UserError


def teacher_cache_conflict(cfg) -> str | None:
    """Why train.teacher_cache cannot hold this run's teacher outputs (inputs that change every step, a teacher
    that moves or depends on the batch), or None."""
    if not cfg.train.teacher_cache:
        return None
    if cfg.data.augment != "none":
        why = f"data.augment={cfg.data.augment} changes the teacher's inputs every step"
    elif cfg.teacher.mode != "frozen":
        why = f"teacher.mode={cfg.teacher.mode} changes the teacher during training"
    elif cfg.teacher.train_mode:
        why = "teacher.train_mode=true makes its outputs depend on the batch (batch-norm statistics)"
    else:
        return None
    return f"{why}, so its outputs cannot be cached: add --train.teacher_cache false"


class ConfigError(UserError, ValueError):
    """A configuration value or key that cannot be used; the message says what to do."""


def opt(default, help: str, choices: tuple | None = None, *, ge=None, gt=None, le=None, lt=None,
        cli: dict | None = None, **kw):
    """A dataclass field carrying its help text, optional valid choices and an optional valid range
    (ge/gt/le/lt bound a number, or each element of a list of numbers; None always passes). `cli`:
    argparse settings of the field's flag beyond what `add_flags` derives (nargs, metavar, and
    `exclusive`: the name of a group of flags of which at most one may be given)."""
    meta = {"help": help}
    if cli:
        meta["cli"] = dict(cli)
    if choices is not None:
        meta["choices"] = tuple(choices)
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        meta["range"] = bounds
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


DATASETS = ("fashion-mnist", "mnist", "digits", "cifar10", "cifar100", "stl10",
            "tinyimagenet", "cifar5m", "folder")
ENCODERS = ("flatten", "mlp", "convnet", "vgg11", "vgg13", "vgg16", "vgg19",
            "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "resnet18", "resnet34",
            "resnet50", "resnet20", "resnet56", "vit_tiny", "vit_small", "vit_medium",
            "vit_base")
SEEDS = 2 ** 32  # seeds are combined (e.g. seed * 3 + 1, times a stride) below torch's 64-bit seed limit
NORMS = ("default", "batch", "layer", "group", "instance", "none")


def own_norm(encoder: str) -> str | None:
    """The normalization a built-in encoder has under model.norm 'default' (None: an imported encoder's)."""
    if encoder not in ENCODERS:
        return None
    if encoder.startswith("vgg"):
        return "batch" if encoder.endswith("_bn") else "none"
    if encoder.startswith("resnet"):
        return "batch"
    return "layer" if encoder.startswith("vit_") else "none"


@dataclass
class DataConfig:
    name: str = opt("fashion-mnist", "training data set (for distillation and, unless probe.data is set, probing)", DATASETS)
    root: str | None = opt(None, "data root; else $RANDTEACH_DATA, else the per-user cache (Fashion-MNIST is also found at the Debian package's path)")
    path: str | None = opt(None, "folder of images for data.name=folder (one sub-folder per class)")
    test_fraction: float = opt(0.2, "data.name=folder without train/ and test/ (or val/) sub-folders: the fraction of each class held out as the test split (class-stratified, fixed seed: the same split in every run)", gt=0, lt=1)
    split: str = opt("train", "the split(s) distilled on, '+' between two: 'train', or for stl10 'unlabeled' (its "
                     "100,000 unlabelled images) or 'train+unlabeled' (105,000); the probes fit on the labelled "
                     "train split and score on test whatever this is")
    n_samples: int | None = opt(None, "distill on a deterministic class-stratified subset of this many training images (the probes' sets are probe.n_train / probe.n_test)", gt=0)
    subset_seed: int = opt(0, "seed of the stratified subset", ge=0, lt=SEEDS)
    inputs: str = opt("data", "what the networks are distilled on: the images, or Gaussian noise of the same shape "
                      "(stored in bfloat16, widened per batch: 31 GB for RT Fig. 4's 5e6 CIFAR-sized images)",
                      ("data", "noise"))
    noise_std: float = opt(1.0, "standard deviation of the Gaussian-noise inputs (after normalization)", gt=0)
    image_size: int | None = opt(None, "pad/resize images to this side length; None keeps the native size (28 px images are zero-padded to 32 for VGG/ResNet)", gt=0)
    augment: str = opt("none", "augmentation of the distillation batches, on the device (the papers: none): "
                       "CIFAR's pad-4 crop + flip, or DINO's global view (random resized crop, flip, colour jitter, "
                       "grey, blur)", ("none", "flip-crop", "dino"))
    local_crops: int = opt(0, "DINO's multi-crop with data.augment=dino: this many local crops (5-40 % of the area) "
                           "per image besides the 2 global views; the teacher sees the global views, the student "
                           "all of them (DINO: 8; 0 = one view for both)", ge=0)
    local_crop_size: int | None = opt(None, "side of the local crops in pixels; None = DINO's 96/224 of the image "
                                      "side (14 px for 32 px images); set it for encoders built for one input size (the ViTs, "
                                      "flatten, mlp: the image side)", gt=0)


@dataclass
class ModelConfig:
    encoder: str = opt("convnet", f"encoder: one of {', '.join(ENCODERS)}, or an import path 'package.module:callable'")
    encoder_args: dict[str, Any] = opt({}, "keyword arguments of the encoder: JSON on the command line "
                                       "('{\"num_classes\": 0}') or one key at a time (--model.encoder_args.KEY V), a "
                                       "mapping in YAML and sweeps; each layer (preset, file, options) adds to the keys "
                                       "before it; for an import path they go to the callable, for the ViTs patch_size")
    norm: str = opt("default", "normalization layer of the encoder ('default' = the architecture's own; group = the paper's GroupNorm8, 8 channels per group)", NORMS)
    width: int = opt(32, "width knob of the small encoders: convnet channels are 32-64-128-128 times width/32; the MLP hidden width is 16 * width", gt=0)
    width_mult: float = opt(1.0, "channel multiplier of VGG encoders (0.5 = half width, a 256-d embedding; 1 = the paper's)", gt=0)


@dataclass
class HeadConfig:
    kind: str = opt("dino", "projector: DINO-style MLP with L2 bottleneck, one linear layer (escaping paper), or none", ("dino", "linear", "none"))
    hidden_dims: list[int] = opt([2048, 2048], "hidden widths of the DINO MLP (Linear + GELU each)", gt=0)
    bottleneck_dim: int = opt(256, "width of the L2 bottleneck", gt=0)
    out_dim: int = opt(65536, "output dimension m (softmax size) of the DINO head; output width of the linear head", gt=0)
    wn1: bool = opt(False, "weight-normalize the linear layer into the bottleneck")
    lin1: bool = opt(True, "linear layer into the bottleneck (off: the MLP's last hidden layer feeds the bottleneck directly)")
    fn1: bool = opt(True, "L2-normalize the bottleneck features")
    wn2: bool = opt(True, "weight-normalize the last layer (unit-norm columns, gain fixed at 1)")
    lin2: bool = opt(True, "last linear layer to out_dim (off: the bottleneck is the output)")
    fn2: bool = opt(False, "L2-normalize the output")


@dataclass
class InitConfig:
    mode: str = opt("locality", "how the student starts: ((1-a)T + a*fresh)/delta, T + eps*fresh, independent, exact copy, or a checkpoint", ("locality", "neighborhood", "independent", "copy", "checkpoint"))
    alpha: float = opt(1e-10, "locality alpha (0 = teacher, 1 = independent init)", ge=0, le=1)
    epsilon: float = opt(1e-10, "neighborhood epsilon for mode=neighborhood", ge=0)
    epsilon_draw: str = opt("scalar", "neighborhood epsilon: init.epsilon itself, or normal: drawn per weight from "
                            "N(0, init.epsilon^2), as the escaping paper writes eps ~ N(0, sigma_eps I)",
                            ("scalar", "normal"))
    variance_preserving: bool = opt(True, "divide the locality mix by sqrt(a^2 + (1-a)^2)")
    checkpoint: str | None = opt(None, "student checkpoint (or run directory) for mode=checkpoint")
    teacher_checkpoint: str | None = opt(None, "use this checkpoint (or run directory's final student) as the teacher instead of a random init")
    teacher_seed: int | None = opt(None, "seed of the teacher's init (default: derived from train.seed)", ge=0, lt=SEEDS)
    fresh_seed: int | None = opt(None, "seed of the second init mixed into the student (default: derived from train.seed)", ge=0, lt=SEEDS)


@dataclass
class TeacherConfig:
    mode: str = opt("frozen", "teacher update rule: never (the paper), EMA of the student, or the student of the previous epoch", ("frozen", "ema", "previous-epoch"))
    ema_momentum: float = opt(0.996, "EMA momentum for mode=ema", ge=0, le=1)
    train_mode: bool = opt(False, "run the teacher in train mode (batch norm normalizes by batch statistics; a frozen teacher's running averages, which its probes use, stay as drawn); the paper uses eval mode")


@dataclass
class LossConfig:
    name: str = opt("kl", "teacher-student loss on the head outputs (kl: the papers' cross-entropy ce less the "
                    "teacher's entropy, the same gradient; its value is the KL the papers plot, 0 at the teacher)",
                    ("ce", "kl", "mse", "nmse", "ndmse"))
    teacher_temp: float = opt(1.0, "softmax temperature of the teacher (ce, kl)", gt=0)
    student_temp: float = opt(1.0, "softmax temperature of the student (ce, kl)", gt=0)
    center: bool = opt(False, "subtract a running mean from the teacher outputs (DINO centering)")
    center_momentum: float = opt(0.9, "momentum of the running center", ge=0, le=1)


@dataclass
class OptimConfig:
    name: str = opt("adamw", "optimizer", ("adamw", "adam", "sgd"))
    lr: float = opt(1e-3, "peak learning rate", gt=0)
    weight_decay: float = opt(0.0, "weight decay (all parameter groups)", ge=0)
    momentum: float = opt(0.0, "SGD momentum", ge=0, lt=1)
    betas: list[float] = opt([0.9, 0.999], "Adam betas", ge=0, lt=1)
    schedule: str = opt("constant", "learning-rate schedule", ("constant", "warmup", "cosine", "exponential"))
    warmup_steps: int = opt(0, "linear warm-up steps (schedule warmup or cosine)", ge=0)
    min_lr: float = opt(0.0, "final learning rate of the cosine schedule", ge=0)
    lr_end: float = opt(1e6, "final learning rate of the exponential schedule (starts at lr)", gt=0)
    grad_clip: float | None = opt(None, "clip the gradient norm to this value (the paper: none)", gt=0)


@dataclass
class TrainConfig:
    epochs: float = opt(10, "epochs of distillation (fractions allowed)", gt=0)
    max_steps: int | None = opt(None, "stop after this many optimizer steps", gt=0)
    batch_size: int = opt(256, "samples per optimizer step (0 = the full data set)", ge=0)
    micro_batch: int | None = opt(None, "split each step into chunks of this size (gradient accumulation)", gt=0)
    seed: int = opt(0, "seed of the data order and, unless set, of both inits", ge=0, lt=SEEDS)
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")  # no fixed choices (cuda:N): Config.validate checks it
    precision: str = opt("fp32", "fp32, bf16 autocast (fp32 until the student has left the teacher), or auto: "
                         "bf16 on an Ampere or later GPU or a CPU with AMX or AMD AVX-512 bf16, fp32 elsewhere",
                         ("fp32", "bf16", "auto"))
    bf16_after_distance: float = opt(1e-3, "under bf16: stay in fp32 until ||theta_S - theta_T|| / ||theta_T|| exceeds this", ge=0)
    float64_until_distance: float = opt(2.0 ** -23 * 1e3, "hold teacher and student in float64 from a locality / neighborhood init until ||theta_S - theta_T|| / ||theta_T|| exceeds this, then continue in fp32 (default 2^-23 * 1e3: fp32 resolution with 3 digits to spare; 0 = start in fp32, where a 1e-10 residue rounds away)", ge=0)
    channels_last: bool = opt(True, "channels-last memory format for conv encoders under bf16, and in fp32 on a CPU for the narrow ones where it is faster (convnet, resnet20, resnet56)")
    compile: bool = opt(False, "torch.compile the training step at a full batch's shapes and the run's final precision: on a GPU the student's forward, head, loss and their backward as one graph and the teacher's forward as another; on a CPU the loss and the teacher's head only (the conv encoders and the student's head run faster eager there)")
    cuda_graphs: bool = opt(False, "with train.compile on a CUDA device: also record the compiled step as CUDA graphs (torch.compile mode reduce-overhead)")
    sync_bn: bool = opt(False, "under torchrun on CUDA: synchronize the student's batch-norm statistics across ranks (SyncBatchNorm)")
    data_on_device: bool = opt(True, "hold the whole (uint8) training set on the device and slice batches there")
    teacher_cache: bool = opt(False, "compute the frozen teacher's bottleneck outputs once (fp32, on disk under the data root) and apply only its last layer per step")
    log_every: int = opt(20, "read the step metrics from the device and write a record every this many steps (1 = every step)", gt=0)
    checkpoint_every: float = opt(1, "save the student every this many epochs (0 = only at the end)", ge=0)
    checkpoint_at: list[float] = opt([], "extra epochs at which to save the student (and the resume state)", ge=0)
    probe_every: float = opt(0, "probe every this many epochs (0 = only before and after training)", ge=0)
    probe_at: list[float] = opt([], "extra epochs at which to probe", ge=0)


@dataclass
class ProbeConfig:
    data: str | None = opt(None, "probe on this data set instead of data.name (transfer)")
    linear: str = opt("logreg", "linear probe: converged L2 logistic regression, or the authors' AdamW 10-epoch protocol", ("logreg", "adamw", "none"))
    l2: float = opt(1e-4, "L2 penalty of the logistic regression (times the mean loss)", ge=0)
    max_iter: int = opt(500, "L-BFGS iterations of the logistic regression", gt=0)
    knn_k: int = opt(20, "k of the k-NN probe (0 = no k-NN)", ge=0)
    knn_weighting: str = opt("cosine", "k-NN convention: DINO's cosine with exp(sim/T) weights, or unweighted L2 majority vote", ("cosine", "majority"))
    knn_temperature: float = opt(0.07, "temperature T of the cosine k-NN weights", gt=0)
    n_train: int | None = opt(None, "probe on a stratified subset of this many training images (None = all)", gt=0)
    n_test: int | None = opt(None, "evaluate on a stratified subset of this many test images (None = all)", gt=0)
    batch_size: int = opt(512, "batch size for embedding", gt=0)
    which: list[str] = opt(["teacher", "student", "input"], "what to probe")


@dataclass
class LogConfig:
    tensorboard: bool = opt(False, "mirror metrics.jsonl to TensorBoard event files in RUN_DIR/tensorboard "
                            "(pip install tensorboard)")
    wandb: str | None = opt(None, "mirror metrics.jsonl to this Weights & Biases project, the config as "
                            "hyperparameters; files under RUN_DIR/wandb (pip install wandb)")
    wandb_mode: str = opt("default", "W&B mode: online, offline (sync later with `wandb sync RUN_DIR/wandb/offline-run-*`), "
                          "or default: W&B's own setting ($WANDB_MODE, `wandb offline`)", ("default", "online", "offline"))


@dataclass
class Config:
    name: str = opt("run", "readable prefix of the run directory")
    out: str | None = opt(None, "run directory (default: runs/<name>-<hash of the config>)")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    init: InitConfig = field(default_factory=InitConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    log: LogConfig = field(default_factory=LogConfig)

    # ------------------------------------------------------------------ views
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self, version: int | None = None, before_2026_12: bool = False, same_norm_as_default: bool = True) -> str:
        """Hash of the values that differ from the defaults of `version` (default: DEFAULTS_VERSION), less
        where and how a run is logged (out, log.*) and the RUNTIME_ONLY keys. `before_2026_12`: the digest as
        randteach computed it up to 2026-12-02 (data.root included, a section emptied by the removal kept).
        `same_norm_as_default`: a model.norm that names the encoder's own normalization (batch for a ResNet)
        is hashed as 'default', so that the same network has one run; not so up to 2026-12-03.

        Only non-default values enter, so adding a new key (with a default) keeps every existing run's
        address; a changed default bumps DEFAULTS_VERSION, which enters the hash, so that an address made
        before the change never names a run of the new default."""
        version = DEFAULTS_VERSION if version is None else version
        d = self.to_dict()
        if same_norm_as_default and d["model"]["norm"] == own_norm(d["model"]["encoder"]):
            d["model"]["norm"] = "default"
        d = _non_default(d, _defaults_at(version))
        d.pop("out", None)
        d.pop("log", None)
        for key in _RUNTIME_ONLY_BEFORE_2026_12 if before_2026_12 else RUNTIME_ONLY:
            section, name = key.split(".")
            d.get(section, {}).pop(name, None)
            if d.get(section) == {} and not before_2026_12:
                del d[section]
        if version > 1:
            d["defaults_version"] = version
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]

    def matches(self, recorded: str | None) -> bool:
        """Whether a run that recorded the digest `recorded` (by any version of randteach) is a run of this
        config: the digest under the defaults of some version, as computed today, up to 2026-12-03 (model.norm
        hashed as written) or before 2026-12-02."""
        return recorded in {self.digest(v, old, same) for v in range(1, DEFAULTS_VERSION + 1) for old in (False, True)
                            for same in (True, False)}

    def run_dir(self) -> Path:
        """`out`, else runs/<name>-<digest>: the address of this config's run."""
        return Path(self.out).expanduser() if self.out else self.address(Path("runs"))

    def address(self, parent: Path, key: str | None = None) -> Path:
        """parent/<name>-<digest><key>, `key` by default the contents key of an image folder. A run started
        before the digest left out data.root keeps its folder (one at the old address and none at the new)."""
        key = self._folder_key() if key is None else key
        new, old = (parent / f"{self.name}-{self.digest(before_2026_12=b)}{key}" for b in (False, True))
        return old if old.is_dir() and not new.exists() else new

    def _folder_key(self) -> str:
        """An image folder's contents are data, not config: a changed folder is a new run."""
        from .data.folder import configured_contents
        found = configured_contents(self.data)
        return "-" + found[0][:8] if found else ""

    def validate(self) -> "Config":
        _validate(self, "")  # types were checked when the values were set; choices and ranges here
        if self.train.cuda_graphs and not self.train.compile:
            raise ConfigError("train.cuda_graphs=true records the compiled step: also set --train.compile true")
        if self.init.mode == "checkpoint" and not self.init.checkpoint:
            raise ConfigError("init.mode=checkpoint needs init.checkpoint=PATH (a .pt file or a run directory)")
        if self.data.name == "folder" and not self.data.path:
            raise ConfigError("data.name=folder needs data.path=DIR (one sub-folder per class)")
        if (self.data.local_crops or self.data.local_crop_size) and self.data.augment != "dino":
            raise ConfigError(f"data.local_crops / data.local_crop_size are DINO's multi-crop and need its views: "
                              f"add --data.augment dino (got data.augment={self.data.augment})")
        if self.data.local_crop_size and not self.data.local_crops:
            raise ConfigError("data.local_crop_size sets the side of the local crops, but data.local_crops is 0: "
                              "add --data.local_crops N (DINO: 8)")
        if bad := _bad_split(self.data):
            raise ConfigError(bad)
        if self.data.augment != "none" and self.data.inputs == "noise":
            raise ConfigError("data.augment augments images; with data.inputs=noise leave data.augment=none")
        if conflict := teacher_cache_conflict(self):
            raise ConfigError(conflict)
        if len(self.optim.betas) != 2:
            raise ConfigError(f"optim.betas: {self.optim.betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        check_encoder(self.model.encoder)
        taken = sorted(set(self.model.encoder_args) & {"in_channels", "image_size", "norm", "width"})
        if taken:
            raise ConfigError(f"model.encoder_args: {', '.join(taken)} come from the data and model.norm / "
                              "model.width; remove them from encoder_args")
        if self.train.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", self.train.device):
            raise ConfigError(f"train.device: {self.train.device!r} is not one of auto, cpu, cuda, cuda:N")
        if not self.name or "/" in self.name or "\\" in self.name or self.name.strip(".") == "":
            raise ConfigError(f"name: {self.name!r} is the prefix of a run folder's name; give a plain name "
                              "without / (choose the folder itself with out)")
        for w in self.probe.which:
            if w not in ("teacher", "student", "input"):
                raise ConfigError(f"probe.which: {w!r} is not one of teacher, student, input")
        return self

    def ignored_settings(self, baseline: Config | None = None) -> list[str]:
        """One line per value changed from `baseline` (the defaults, or the preset the user started from: its
        values are not the user's doing) that this configuration never reads (optim.momentum under AdamW, ...):
        such a run trains exactly as it would without the value, though under another run address, so a sweep
        over it repeats identical runs."""
        baseline = baseline or Config()
        lines = []
        for key, acts, when in _ACTS_ONLY:
            value = _get_dotted(self, key)
            if value != _get_dotted(baseline, key) and not acts(self):
                lines.append(f"{key}={_shown(value)} has no effect: it acts only {when}")
        return lines


def _bad_split(data: DataConfig) -> str | None:
    """Why data.split names no split to distill on, or None. The test split is where the probes score."""
    from .data.registry import DATASETS as INFO
    splits = data.split.split("+")
    allowed = [s for s in INFO[data.name].splits if s != "test"]
    unknown = [s for s in splits if s not in allowed]
    if unknown:
        joined = f", or {'+'.join(allowed)}" if len(allowed) > 1 else ""
        return (f"data.split: {data.name} has no split {unknown[0]!r} to distill on; valid: "
                f"{', '.join(allowed)}{joined} (the probes score on test)")
    if splits != sorted(set(splits), key=allowed.index):  # one spelling of a set of images: one run address
        return f"data.split: write {'+'.join(sorted(set(splits), key=allowed.index))!r} for {data.split!r}"
    return None


# Keys read only under some values of other keys: (key, whether this config reads it, when it acts).
_ACTS_ONLY = (
    ("model.width", lambda c: c.model.encoder in ("mlp", "convnet"), "for model.encoder mlp or convnet"),
    ("init.alpha", lambda c: c.init.mode == "locality", "with init.mode locality"),
    ("init.variance_preserving", lambda c: c.init.mode == "locality", "with init.mode locality"),
    ("init.epsilon", lambda c: c.init.mode == "neighborhood", "with init.mode neighborhood"),
    ("init.epsilon_draw", lambda c: c.init.mode == "neighborhood", "with init.mode neighborhood"),
    ("init.fresh_seed", lambda c: c.init.mode in ("locality", "neighborhood", "independent"),
     "with init.mode locality, neighborhood or independent"),
    ("init.checkpoint", lambda c: c.init.mode == "checkpoint", "with init.mode checkpoint"),
    ("init.teacher_seed", lambda c: not c.init.teacher_checkpoint, "without init.teacher_checkpoint"),
    *((f"head.{name}", lambda c: c.head.kind == "dino", "with head.kind dino")
      for name in ("hidden_dims", "bottleneck_dim", "wn1", "lin1", "fn1", "wn2", "lin2", "fn2")),
    ("head.out_dim", lambda c: c.head.kind in ("dino", "linear"), "with head.kind dino or linear"),
    ("data.subset_seed", lambda c: bool(c.data.n_samples or c.data.inputs == "noise" or c.probe.n_train
                                        or c.probe.n_test), "with data.n_samples, data.inputs noise or probe subsets"),
    ("teacher.ema_momentum", lambda c: c.teacher.mode == "ema", "with teacher.mode ema"),
    ("loss.teacher_temp", lambda c: c.loss.name in ("ce", "kl"), "with loss.name ce or kl"),
    ("loss.student_temp", lambda c: c.loss.name in ("ce", "kl"), "with loss.name ce or kl"),
    ("loss.center_momentum", lambda c: c.loss.center, "with loss.center true"),
    ("optim.momentum", lambda c: c.optim.name == "sgd", "with optim.name sgd"),
    ("optim.betas", lambda c: c.optim.name in ("adam", "adamw"), "with optim.name adam or adamw"),
    ("optim.warmup_steps", lambda c: c.optim.schedule in ("warmup", "cosine"), "with optim.schedule warmup or cosine"),
    ("optim.min_lr", lambda c: c.optim.schedule == "cosine", "with optim.schedule cosine"),
    ("optim.lr_end", lambda c: c.optim.schedule == "exponential", "with optim.schedule exponential"),
    ("data.noise_std", lambda c: c.data.inputs == "noise", "with data.inputs noise"),
    ("data.path", lambda c: c.data.name == "folder", "with data.name folder"),
    ("data.test_fraction", lambda c: c.data.name == "folder", "with data.name folder"),
    ("train.bf16_after_distance", lambda c: c.train.precision != "fp32", "with train.precision bf16 or auto"),
    ("probe.knn_temperature", lambda c: c.probe.knn_weighting == "cosine" and c.probe.knn_k > 0,
     "with probe.knn_weighting cosine and probe.knn_k above 0"),
    ("probe.knn_weighting", lambda c: c.probe.knn_k > 0, "with probe.knn_k above 0"),
    ("log.wandb_mode", lambda c: bool(c.log.wandb), "with log.wandb set"),
    ("probe.l2", lambda c: c.probe.linear == "logreg", "with probe.linear logreg"),
    ("probe.max_iter", lambda c: c.probe.linear == "logreg", "with probe.linear logreg"),
)


def ignored_notes(configs: list[Config], preset_name: str | None = None) -> list[str]:
    """`Config.ignored_settings` of several runs, from the preset they start from, each line once, with the
    number of runs it concerns."""
    baseline = build_config(preset_name) if preset_name else None
    counts: dict[str, int] = {}
    for cfg in configs:
        for line in cfg.ignored_settings(baseline):
            counts[line] = counts.get(line, 0) + 1
    many = len(configs) > 1
    return [f"note: {line}" + (f" ({n} of {len(configs)} runs)" if many else "") for line, n in counts.items()]


def _get_dotted(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


# ---------------------------------------------------------------------- import-path encoders
# An encoder 'package.module:callable' runs code when it is built. A config file (a run's config.yaml, a
# sweep file, --config) may come from someone else, so the command line confines imports to the modules
# the user names in that invocation; the Python API (the user's own program) leaves them unconfined.

_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_allowed_imports: frozenset[str] | None = None  # None: unconfined (Python API)


def confine_imports(modules) -> None:
    """From now on, accept import-path encoders only from these modules (None: accept any)."""
    global _allowed_imports
    _allowed_imports = None if modules is None else frozenset(modules)


def check_encoder(encoder: str) -> None:
    """A built-in encoder name, or a well-formed import path whose module the user has allowed."""
    if encoder in ENCODERS:
        return
    if ":" not in encoder:
        raise ConfigError(f"model.encoder: unknown encoder {encoder!r}; valid choices: {', '.join(ENCODERS)}, "
                          "or an import path 'package.module:callable'")
    if not _IMPORT_PATH.match(encoder):
        raise ConfigError(f"model.encoder: {encoder!r} is not an import path; expected 'package.module:callable' "
                          "(dotted Python names on both sides of one colon)")
    module = encoder.partition(":")[0]
    if _allowed_imports is not None and module not in _allowed_imports:
        raise ConfigError(
            f"model.encoder: {encoder!r} would import and run code from module {module!r}, and it was read from a "
            "file (a run's config.yaml, a sweep file or --config), not given on this command line; nothing was "
            f"imported. If you trust that module, confirm it: --allow-import {module} "
            f"(or --model.encoder {encoder})")


# Keys that change how a run is executed or logged, or where its inputs are found, but not its result: a run
# moved to a node with its data elsewhere (a SLURM job's local disk) keeps its address and resumes.
RUNTIME_ONLY = ("train.log_every", "train.data_on_device", "data.root")
_RUNTIME_ONLY_BEFORE_2026_12 = ("train.log_every", "train.data_on_device")  # runs recorded then still match


def outside_the_address(key: str) -> bool:
    """Whether a dotted key leaves a run's address (`Config.digest`) unchanged: where and how the run is
    logged, and the RUNTIME_ONLY keys. Runs that differ only in such keys are one run."""
    return key == "out" or key.startswith("log.") or key in RUNTIME_ONLY


# Run addresses hash the values that differ from the defaults. When a default changes, DEFAULTS_VERSION goes
# up and the old default is listed under the last version that had it, so the digest a run recorded under
# an older version can still be recomputed from its config.yaml (`Config.matches`).
DEFAULTS_VERSION = 2
_REPLACED_DEFAULTS = {1: {"loss": {"name": "ce"}}}  # version 1 (up to 2026-11-30): cross-entropy


def first_defaults() -> dict:
    """Each key's first default: what a run made before a key existed did (its config.yaml lacks the key)."""
    return _defaults_at(1)


def _defaults_at(version: int) -> dict:
    """The defaults of `version`: today's, with each later-replaced default put back (oldest last, so it wins)."""
    if not 1 <= version <= DEFAULTS_VERSION:
        raise ValueError(f"defaults version must lie in [1, {DEFAULTS_VERSION}], got {version}")
    d = Config().to_dict()
    for v in sorted(_REPLACED_DEFAULTS, reverse=True):
        if v >= version:
            for section, values in _REPLACED_DEFAULTS[v].items():
                d[section].update(values)
    return d


def _non_default(d: dict, default: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            sub = _non_default(v, default.get(k, {}))
            if sub:
                out[k] = sub
        elif k not in default or default[k] != v:
            out[k] = v
    return out


# ---------------------------------------------------------------------- building

def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML or the command line) to type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        # an empty value is the unset one: `--probe.data ""` names the same run as no --probe.data
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if isinstance(value, str):
            value = _list_text(value, key)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0], key) for v in value]
    if origin is dict:
        return _mapping(value, key)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value)):
                return int(value)  # exact for any size; "1e3" and 2.0 go through float
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value) + 0.0  # -0.0 is 0.0: one value, one run address
        if tp is str:
            if isinstance(value, (dict, list)) or value is None:
                raise ValueError
            return str(value)
    except (TypeError, ValueError, OverflowError):
        spellings = " (true/false, yes/no, on/off, 1/0)" if tp is bool else ""
        raise ConfigError(f"{key}: {value!r} is not a valid {getattr(tp, '__name__', tp)}{spellings}") from None
    return value


def _list_text(text: str, key: str) -> list:
    """A list from the command line: [a, b] (YAML) or a,b; each element stripped."""
    if not text.strip().startswith("["):
        return [v.strip() for v in text.split(",") if v.strip()]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{key}: {text!r} is not a list; expected e.g. [512, 512] or 512,512") from None
    return [v.strip() if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


def _mapping(value: Any, key: str) -> dict:
    """A mapping from YAML (as is) or the command line (a JSON object). String leaves that are JSON
    literals become numbers, booleans or null, so `--model.encoder_args.depth 2` means 2."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}: {value!r} is not a JSON object ({e.msg}); expected e.g. "
                              f"--{key} '{{\"num_classes\": 0, \"in_chans\": 1}}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of keyword arguments, got {type(value).__name__} {value!r}")
    return {str(k): _json_literal(v) for k, v in value.items()}


_PYTHON_LITERALS = {"true": True, "false": False, "none": None, "null": None}


def _json_literal(v: Any) -> Any:
    """A command-line string as the value it spells: JSON numbers and literals, and Python's True, False and
    None in any case (the string 'False' would be true to the callable that receives it)."""
    if isinstance(v, str):
        if v.strip().lower() in _PYTHON_LITERALS:
            return _PYTHON_LITERALS[v.strip().lower()]
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def _apply(obj: Any, updates: dict, prefix: str) -> None:
    fields = _fields(type(obj))
    hints = _hints(type(obj))
    for k, v in updates.items():
        k = str(k).replace("-", "_") if str(k).replace("-", "_") in fields else str(k)
        key = f"{prefix}{k}"
        if k not in fields:
            raise ConfigError(f"unknown key {key!r}; valid keys{' in ' + prefix[:-1] if prefix else ''}: "
                              f"{', '.join(fields)}")
        tp = hints[k]
        if _is_section(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{key} is a section; give its keys, e.g. {key}.{next(iter(_fields(tp)))}=...")
            _apply(getattr(obj, k), v, key + ".")
        elif typing.get_origin(tp) is dict:  # keyword arguments: each layer adds to or changes keys
            setattr(obj, k, {**getattr(obj, k), **_coerce(v, tp, key)})
        else:
            setattr(obj, k, _coerce(v, tp, key))


def _validate(obj: Any, prefix: str) -> None:
    hints = _hints(type(obj))
    for name, f in _fields(type(obj)).items():
        value = getattr(obj, name)
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(value):
            _validate(value, key + ".")
            continue
        if _is_float_field(hints[name]) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # as the parser makes it (an int set from Python would hash to another address)
            setattr(obj, name, value)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not a valid choice; valid choices: {', '.join(map(str, choices))}")
        for v in value if isinstance(value, list) else [value]:
            _check_number(key, v, f.metadata.get("range", {}))


def _is_float_field(tp) -> bool:
    args = typing.get_args(tp) or (tp,)
    return float in args and int not in args


def _interval(bounds: dict) -> str:
    """{'ge': 0, 'lt': 1} -> '[0, 1)'."""
    low = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds['gt']}" if "gt" in bounds else "(-inf"
    high = f"{bounds['le']}]" if "le" in bounds else f"{bounds['lt']})" if "lt" in bounds else "inf)"
    return f"{low}, {high}"


def _check_number(key: str, value: Any, bounds: dict) -> None:
    """Every number must be finite (nan and inf reach no sensible run) and lie within the field's range."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    ok = math.isfinite(value) and all({"ge": value >= b, "gt": value > b, "le": value <= b, "lt": value < b}[k]
                                      for k, b in bounds.items())
    if not ok:
        raise ConfigError(f"{key}: {value!r} is out of range; valid: a finite number in {_interval(bounds)}")


def canonical_key(key: str) -> str:
    """A dotted key as the config spells it: train.max-steps is train.max_steps (section and field names take
    '_'; keyword names under a dict field, model.encoder_args.<name>, are kept as given)."""
    parts = key.split(".")
    return ".".join([*(p.replace("-", "_") for p in parts[:2]), *parts[2:]])


def changeable_after_training(key: str, also: tuple[str, ...] = ()) -> bool:
    """Whether an analysis of a finished run (probe, signal) may change `key`: the probe's settings, where the
    data lie, which device computes, and the analysis's `also`. Any other key would describe another run."""
    key = canonical_key(key)
    return key.startswith("probe.") or key in ("data.root", "train.device", *also)


def flatten(d: dict) -> dict[str, Any]:
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}; dotted keys pass through, lists are leaves (the
    inverse of `dotted_to_nested`). A key given both nested and dotted: the later one (`leaves` has both)."""
    return dict(leaves(d))


def leaves(d: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested mapping, in order, each as often as it is written."""
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from leaves(v, key + ".")
        else:
            yield key, v


def deep_merge(a: dict, b: dict) -> dict:
    """`b` on top of `a`; nested mappings merge, everything else (lists included) is replaced."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def undotted(doc: dict) -> dict:
    """A config document whose top-level keys may be dotted (`optim.lr: 0.1`, as sweep files write them),
    as nested sections."""
    out: dict = {}
    for k, v in doc.items():
        out = deep_merge(out, dotted_to_nested({k: v}) if isinstance(k, str) and "." in k else {k: v})
    return out


def dotted_to_nested(pairs: dict[str, Any]) -> dict:
    """{'optim.lr': '1e-3'} -> {'optim': {'lr': '1e-3'}}."""
    nested: dict = {}
    for key, value in pairs.items():
        parts = key.split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is a value, not a section")
        node[parts[-1]] = value
    return nested


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """Parse ['--optim.lr', '1e-3', '--train.epochs=2'] into {'optim.lr': '1e-3', ...}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key VALUE or --section.key=VALUE")
        arg = arg[2:]
        if "=" in arg:
            k, v = arg.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and not _is_number(argv[i + 1])):
                raise ConfigError(f"--{arg} needs a value, e.g. --{arg} VALUE")
            k, v = arg, argv[i + 1]
            i += 2
        out.pop(k, None)  # a key given again takes its later place: overrides apply in command-line order
        out[k] = v
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


PRESETS_PACKAGE = "randteach.presets"


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(PRESETS_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def _without_base_60(resolvers: dict) -> dict:
    """YAML 1.1's implicit int and float patterns less their base-60 forms: `time: 2:00:00` (a SLURM time) or
    `1:30` would be read as the numbers 7200 and 90. No randteach value is written in base 60."""
    numbers = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    return {first: [(tag, re.compile("(?!.*:)" + rx.pattern, rx.flags) if tag in numbers else rx)
                    for tag, rx in entries] for first, entries in resolvers.items()}


class _UniqueKeys(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last one without a word), and
    reads no base-60 numbers."""

    yaml_implicit_resolvers = _without_base_60(yaml.SafeLoader.yaml_implicit_resolvers)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in this mapping (only the last one would count); "
                    "merge the two", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path, what: str = "config file") -> dict:
    """A user's YAML file (a config, a sweep, a recipe: `what`) as a mapping; clear errors, duplicate keys
    refused."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeys)
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {str(p)!r} is not a text file (not UTF-8); expected a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(p)!r} must hold a mapping, got {type(data).__name__}")
    return data


def preset(name: str) -> dict:
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(names)}")
    return yaml.safe_load(resources.files(PRESETS_PACKAGE).joinpath(f"{name}.yaml").read_text()) or {}


def build_config(preset_name: str | None = None, file: str | Path | list | None = None,
                 overrides: dict[str, Any] | None = None, **nested: Any) -> Config:
    """Defaults <- preset <- YAML file(s), in order <- dotted overrides <- keyword sections; validated."""
    cfg = Config()
    if preset_name:
        _apply(cfg, preset(preset_name), "")
    for path in (file if isinstance(file, (list, tuple)) else [file] if file else []):
        doc = load_yaml(path)
        if {"grid", "seeds"} & set(doc):
            raise ConfigError(f"config file {str(path)!r} names {', '.join(sorted({'grid', 'seeds'} & set(doc)))}: "
                              f"it looks like a sweep file; run it with `randteach sweep {path}`")
        _apply(cfg, undotted(doc), "")
    for key, value in (overrides or {}).items():  # one at a time, in order: `--model.encoder_args '{...}'`
        _apply(cfg, dotted_to_nested({key: value}), "")  # and `--model.encoder_args.depth 3` merge, later wins
    if nested:
        _apply(cfg, nested, "")
    return cfg.validate()


def config_from_dict(d: dict) -> Config:
    """Rebuild a saved config (e.g. a run directory's config.yaml)."""
    cfg = Config()
    _apply(cfg, d, "")
    return cfg.validate()


# ---------------------------------------------------------------------- options of a command

def _scalar(tp: Any) -> tuple[Any, bool]:
    """(element type, is a list) of a field type such as `int`, `float | None` or `list[int] | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _shown(default: Any) -> str:
    """A default as one would type it: 1e+06, not 1000000.0; a list as its values."""
    values = default if isinstance(default, list) else [default]
    return " ".join(format(v, "g") if isinstance(v, float) else str(v) for v in values)


def add_flags(parser, cls) -> None:
    """One flag per field of the dataclass `cls`: `--field-name`, with the field's help text, default,
    choices and type (a list field takes several values; a bool that defaults to False is a switch, one
    that defaults to True also gets --no-NAME). How a command's own options (the analyses', the
    supervised recipe's) become its command line, as the run config's keys become `--section.key`."""
    import argparse
    hints = _hints(cls)
    exclusive: dict[str, Any] = {}
    for name, f in _fields(cls).items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        cli = dict(f.metadata.get("cli", {}))
        group = cli.pop("exclusive", None)
        if group is not None and group not in exclusive:
            exclusive[group] = parser.add_mutually_exclusive_group()
        target = parser if group is None else exclusive[group]
        helptext = f.metadata["help"].replace("%", "%%")
        tp, many = _scalar(hints[name])
        kw: dict[str, Any] = {"dest": name, "default": default}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            kw["type"] = tp
            kw.update({"nargs": "*"} if many else {})
            kw.update({"choices": f.metadata["choices"]} if "choices" in f.metadata else {})
        helptext += "" if default is None or default is False else f" (default {_shown(default)})"
        target.add_argument("--" + name.replace("_", "-"), help=helptext, **{**kw, **cli})


def options_from_args(args, cls):
    """The dataclass `cls` filled from the parsed flags that `add_flags(parser, cls)` made, each number
    checked against its field's range (a ConfigError names the flag and the valid interval)."""
    return checked_options(cls, {name: getattr(args, name) for name in _fields(cls)}, flags=True)


def checked_options(cls, values: dict, flags: bool = False):
    """The dataclass `cls` filled from `values` (other fields at their defaults), each number checked against
    its field's range: a ConfigError names the field (as its `--flag-name` where `flags`) and the interval.
    The Python API checks its arguments so, with the command line's ranges."""
    fields = _fields(cls)
    for name, value in values.items():
        label = "--" + name.replace("_", "-") if flags else name
        for v in value if isinstance(value, list) else [value]:
            _check_number(label, v, fields[name].metadata.get("range", {}) if name in fields else {})
    return cls(**values)


def help_lines(resolved: Config | None = None, source: str = "") -> list[str]:
    """One line per key with type, default and help, for `randteach config --keys`; with `resolved` (a preset's
    or a file's config, named `source`), each value it sets otherwise than the default beside it."""
    lines = []
    values = flatten(resolved.to_dict()) if resolved is not None else {}

    def walk(cls, prefix):
        hints = _hints(cls)
        for name, f in _fields(cls).items():
            if _is_section(hints[name]):
                walk(hints[name], f"{prefix}{name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            ch = f.metadata.get("choices")
            extra = f" [{'|'.join(map(str, ch))}]" if ch else ""
            extra += f" range {_interval(f.metadata['range'])}" if "range" in f.metadata else ""
            value = values.get(f"{prefix}{name}", default)
            here = f"; {source}: {value!r}" if value != default else ""
            lines.append(f"--{prefix}{name} (default {default!r}{here}){extra}: {f.metadata.get('help', '')}")
    walk(Config, "")
    return lines
