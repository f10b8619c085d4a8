"""Signal propagation per layer (escaping paper, Sec. 3, Fig. 2 and 3).

For the teacher theta_T, the collapse point theta_C (if the run recorded one: RUN/collapse.json, written
by `randteach.analysis.escape`) and the final student theta_S, the representation X^(l) of every layer
of the encoder over a data subset is collected with forward hooks, and per layer we compute (formulas
in `randteach.analysis.signal_propagation`) the effective rank, the dead neurons, the condition number, the Fisher
discriminant metrics (traces of Sigma_w, Sigma_b, Sigma_t and tr(Sigma_w^+ Sigma_b), also relative to
the teacher's value at that layer) and the accuracy of a linear (and k-NN) probe on that layer
(`randteach.probes.embedding.score`, the project's one probe).

What counts as a layer: the output of every activation module of the encoder (ReLU, GELU, ...), i.e.
the post-activation output of each conv / linear layer (after its normalization, if any), in forward
order; a module called several times per forward pass (ResNet blocks reuse one ReLU) gives one layer
per call, named `name#k`. The encoder's output (the embedding the probes see, after its pooling) is
the last layer, `embedding`. For ViTs the activation layers are the hidden units of each block's MLP.

Spatial maps (B, C, H, W) are flattened by default, as the authors computed the metrics
(`spatial="flatten"`: every (channel, position) is a neuron, d_l = C*H*W; Fig. 2b counts neurons that are
0 on every sample). `spatial="avgpool"` averages over positions instead (d_l = C: a channel is one neuron
and counts as dead when it is 0 at every position of every sample, which for ReLU is exactly "0 after
pooling"). Token sequences (B, T, D) are flattened (or averaged over tokens). The paper computes X over
the data set D: for a run, the images it distilled on (the train split, or its data.n_samples subset).
`n_samples=None` (the default) takes all of them where memory allows, else the largest class-stratified
subset whose representations (all layers, float32) and widest Gram matrix (min(n, d)^2 float64, the way
`randteach.analysis.signal_propagation` handles wide layers) each fit in `max_bytes` (4 GiB); the number
used is recorded as "n_samples". The dead neurons need no X in memory and are counted over all of them
("n_dead_samples"; VGG11's flattened maps of 49,152 images are 30 GB, and 4 GiB holds 7,061). The forward passes run in float32
(never bf16: ranks and exact zeros need it) in eval mode, as the probes do.

Metrics are computed on X exactly as collected unless `center` (subtract each neuron's mean over the
samples) or `standardize` (center and divide by the std; constant neurons stay 0) is asked for;
`rank_eps` adds eps to the normalized spectrum of the effective rank (`center=True, rank_eps=1e-7` is
the RankMe convention, see `randteach.analysis.signal_propagation.effective_rank`); dead
neurons are always counted on the collected post-activation X (centering would turn constant neurons
into zero rows).

Measured (2026-11-30, `randteach experiment signal --scale cpu`, 22 s on 2 shared cores: the cpu escape
recipe's eta = 1e4 run, seed 0, theta_C = step 100, theta_S = step 1200; flattened maps, 1,000 / 1,000 images;
docs/RESULTS.md E14): from the teacher to the collapse point the effective rank of conv layers 1-4 falls
from 503 / 441 / 382 / 240 to 251 / 84 / 33 / 5.0 and the dead neurons rise from 91 / 313 / 102 / 107 to
149 / 1683 / 1309 / 403 (of 12544 / 6272 / 3136 / 1024): the paper's representational collapse. The final
student regains part of the rank (318 / 111 / 86 / 21) and its embedding probes 71.9 % against the
teacher's 67.1 %.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import changeable_after_training, config_from_dict, dotted_to_nested
from ..data import ImageData, Preprocess, load_configured, stratified_subset
from ..errors import UserError
from ..models import build_model
from ..probes.embedding import adapt_channels, embed, probe_data_name, score
from ..runs.checkpoint import load_checkpoint, load_state_dict, load_weights
from ..runs.rundir import RunDir, check_encoder_given, write_json
from ..train.setup import distilled_subset, resolve_device
from ..precision import exact_fp32

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish)
SPATIAL = ("avgpool", "flatten")
MAX_BYTES = 4 * 2 ** 30   # float32 representations kept in memory at once (all layers, one checkpoint)


@dataclass
class Layer:
    name: str          # module name (+ '#k' for the k-th call of a reused module), or 'embedding'
    kind: str          # the module's class, e.g. ReLU
    shape: list[int]   # per-sample output shape before pooling
    dim: int           # d_l: number of neurons (columns of X)


def _reduce(t: torch.Tensor, spatial: str) -> torch.Tensor:
    """(B, ...) hook output -> (B, d) float32 copy on the CPU."""
    t = t.detach()
    if t.dim() > 2 and spatial == "avgpool":
        t = t.float().mean(dim=tuple(range(2, t.dim()))) if t.dim() == 4 else t.float().mean(dim=1)
    return t.reshape(t.shape[0], -1).to("cpu", torch.float32, copy=True)


class LayerRecorder:
    """Context manager: forward hooks on every activation module of `encoder` and on its output."""

    def __init__(self, encoder: nn.Module, spatial: str = "flatten", keep: bool = True):
        """`keep`: keep every layer's X; False keeps only whether each neuron was ever nonzero (`never_fired`),
        one (d_l,) mask per layer, so that any number of samples can pass."""
        if spatial not in SPATIAL:
            raise UserError(f"spatial={spatial!r} is not one of {', '.join(SPATIAL)}")
        self.encoder = encoder
        self.spatial = spatial
        self.keep = keep
        self.outputs: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.meta: dict[tuple[str, int], tuple[str, list[int]]] = {}
        self._calls: Counter = Counter()
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module, inputs, output):
            key = (name, self._calls[name])
            self._calls[name] += 1
            self.meta.setdefault(key, (type(module).__name__, list(output.shape[1:])))
            x = _reduce(output, self.spatial)
            if self.keep:
                self.outputs.setdefault(key, []).append(x)
            else:
                fired = x.ne(0).any(0)
                self.outputs[key] = [self.outputs[key][0] | fired] if key in self.outputs else [fired]
        return hook

    def __enter__(self) -> "LayerRecorder":
        names = [n for n, m in self.encoder.named_modules() if isinstance(m, ACTIVATIONS)]
        if not names:
            raise UserError(f"the encoder ({type(self.encoder).__name__}) has no activation modules to hook; "
                            "only its output would be measured")
        modules = dict(self.encoder.named_modules())
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]
        self._handles.append(self.encoder.register_forward_pre_hook(lambda m, i: self._calls.clear()))
        self._handles.append(self.encoder.register_forward_hook(self._hook("embedding")))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _ordered(self) -> list[tuple[Layer, list[torch.Tensor]]]:
        """(layer, its recorded chunks) in forward order, the embedding last."""
        calls = Counter(name for name, _ in self.outputs)
        out = []
        for (name, k), chunks in self.outputs.items():  # dicts keep insertion (= first forward) order
            kind, shape = self.meta[(name, k)]
            out.append((Layer(f"{name}#{k + 1}" if calls[name] > 1 else name,
                              "encoder output" if name == "embedding" else kind, shape, chunks[0].shape[-1]), chunks))
        return sorted(out, key=lambda item: item[0].name == "embedding")  # stable: embedding last

    def layers(self) -> tuple[list[Layer], list[torch.Tensor]]:
        """Layers in forward order (embedding last) and their representations X^(l), (n, d_l) each."""
        ordered = self._ordered()
        return [layer for layer, _ in ordered], [torch.cat(chunks) for _, chunks in ordered]

    def never_fired(self) -> list[int]:
        """With keep=False: per layer (the order of `layers`), the neurons that were 0 on every sample."""
        return [int((~chunks[0]).sum()) for _, chunks in self._ordered()]


def _forward_all(encoder: nn.Module, images: torch.Tensor, preprocess: Preprocess | None, *, device: torch.device,
                 batch_size: int, channels: int | None, after_first=lambda: None) -> None:
    """The encoder, in eval mode, over `images` in batches (hooks record what they need); `after_first` runs
    after the first batch."""
    was_training = encoder.training
    encoder.eval()
    try:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device)
            x = preprocess(x) if preprocess is not None else x.float()
            encoder(adapt_channels(x, channels) if channels is not None else x)
            if i == 0:
                after_first()
    finally:
        encoder.train(was_training)


@torch.no_grad()
def collect_representations(encoder: nn.Module, images: torch.Tensor, preprocess: Preprocess | None, *,
                            device: torch.device, spatial: str = "flatten", batch_size: int = 256,
                            channels: int | None = None, max_bytes: int = MAX_BYTES) -> tuple[list[Layer], list[torch.Tensor]]:
    """Every layer's representation of `images` ((n, d_l) float32 each), the encoder in eval mode."""
    n = len(images)
    with LayerRecorder(encoder, spatial) as rec:
        def check_memory():
            per_sample = sum(chunks[0].shape[1] for chunks in rec.outputs.values()) * 4
            if per_sample * n > max_bytes:
                raise UserError(
                    f"keeping every layer of {n} samples needs {per_sample * n / 2 ** 30:.1f} GiB "
                    f"(spatial={spatial}); the limit is {max_bytes / 2 ** 30:.1f} GiB: use fewer samples "
                    "(--n-samples) or --spatial avgpool")
        _forward_all(encoder, images, preprocess, device=device, batch_size=batch_size, channels=channels,
                     after_first=check_memory)
    return rec.layers()


@torch.no_grad()
def never_fired(encoder: nn.Module, images: torch.Tensor, preprocess: Preprocess | None, *, device: torch.device,
                spatial: str = "flatten", batch_size: int = 256, channels: int | None = None) -> list[int]:
    """Per layer (the order of `collect_representations`), the neurons that are 0 on every one of `images`:
    ESC Fig. 2b's dead neurons "across the entire dataset D", counted one batch at a time, so over as many
    images as there are, where the other metrics need every layer's X in memory at once."""
    with LayerRecorder(encoder, spatial, keep=False) as rec:
        _forward_all(encoder, images, preprocess, device=device, batch_size=batch_size, channels=channels)
    return rec.never_fired()


def samples_that_fit(encoder: nn.Module, images: torch.Tensor, labels: torch.Tensor, preprocess: Preprocess | None,
                     *, device: torch.device, spatial: str, channels: int | None, max_bytes: int = MAX_BYTES,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All of (images, labels), or the largest class-stratified subset for which every layer's X (float32)
    and the widest layer's Gram matrix (min(n, d)^2 float64) each fit in `max_bytes`."""
    layers, _ = collect_representations(encoder, images[:1], preprocess, device=device, spatial=spatial,
                                        channels=channels, max_bytes=math.inf)
    n = min(len(images), max_bytes // (4 * sum(layer.dim for layer in layers)))
    gram_side = math.isqrt(max_bytes // 8)
    if min(n, max(layer.dim for layer in layers)) > gram_side:
        n = gram_side
    if n < 1:
        raise UserError(f"one sample's representations (spatial={spatial}) exceed {max_bytes / 2 ** 30:.1f} GiB; "
                        "use spatial=avgpool")
    if n >= len(images):
        return images, labels
    keep = stratified_subset(labels, n, seed)
    return images[keep], labels[keep]


def transform(x: torch.Tensor, center: bool = False, standardize: bool = False) -> torch.Tensor:
    """X as given, centered per neuron, or standardized per neuron (a constant neuron stays 0)."""
    if not (center or standardize):
        return x
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    if standardize:
        std = x.std(0, keepdim=True)
        x = x / torch.where(std > 0, std, torch.ones_like(std))
    return x


def layer_metrics(x: torch.Tensor, labels: torch.Tensor, *, center: bool = False, standardize: bool = False,
                  threshold: float = 0.999, rank_eps: float = 0.0) -> dict:
    """Effective rank, dead neurons, condition number and Fisher metrics of one layer's X (n, d)."""
    from .signal_propagation import dead_neurons, signal_metrics

    m = signal_metrics(transform(x, center, standardize), labels, threshold=threshold, rank_eps=rank_eps)
    dead = dead_neurons(x)  # on the post-activation X as collected, whatever the transform
    return {"effective_rank": m["effective_rank"], "dead_neurons": dead, "dead_fraction": dead / x.shape[1],
            "condition_number": m["condition_number"], "trace_within": m["trace_within"],
            "trace_between": m["trace_between"], "trace_total": m["trace_total"], "separability": m["separability"]}


class RunModels:
    """A run directory's encoders (teacher, saved students) and data, rebuilt from its config."""

    def __init__(self, run_dir: str | Path, overrides: dict | None = None,
                 splits: tuple[ImageData, ImageData] | None = None, architecture=None):
        """`splits` (train, test) replace the run's probe data and `architecture` (an encoder factory or
        module) its model.encoder: Python-API objects."""
        self.run = RunDir(run_dir)
        if not self.run.config_path.exists():
            raise UserError(f"{self.run.path} is not a randteach run directory (no config.yaml)")
        check_encoder_given(self.run.path, architecture)
        saved = self.run.saved_config()
        for key in overrides or {}:
            if not changeable_after_training(key):
                raise UserError(f"--{key}: only --probe.*, --data.root and --train.device can be changed "
                                "when analysing a finished run")
        for section, values in dotted_to_nested(dict(overrides or {})).items():
            saved.setdefault(section, {}).update(values)
        self.cfg = config_from_dict(saved)
        teacher = load_checkpoint(self.checkpoint_path("teacher"))
        self.in_channels = int(teacher["in_channels"])
        self.image_size = int(teacher["image_size"])
        self.device = resolve_device(self.cfg.train.device)
        self.architecture = architecture
        self._splits: dict[str, object] = dict(zip(("train", "test"), splits)) if splits is not None else {}
        self.given_splits = splits is not None
        self._preprocess: Preprocess | None = None

    def checkpoint_path(self, role: str) -> Path:
        path = self.run.checkpoints / f"{role}.pt"
        if not path.exists():
            raise UserError(f"{self.run.path} has no checkpoints/{role}.pt")
        return path

    def encoder(self, path: str | Path) -> nn.Module:
        state = load_state_dict(path)
        model = build_model(self.cfg, self.in_channels, self.image_size, seed=0, encoder=self.architecture)
        load_weights(model, state, path)  # another architecture's checkpoint: a message, not a traceback
        return model.encoder.to(self.device)

    def split(self, name: str):
        if name not in self._splits:
            self._splits[name] = load_configured(self.cfg.data, name, probe_data_name(self.cfg))
        return self._splits[name]

    @property
    def distilled_on_train(self) -> bool:
        """Whether the train split `samples` reads holds the images the run distilled on."""
        return (not self.given_splits and probe_data_name(self.cfg) == self.cfg.data.name
                and self.cfg.data.split == "train")

    def train_images(self) -> str:
        """What `samples("train")` reads, in words, for the results' records."""
        if self.distilled_on_train:
            return "the run's training images"
        if self.given_splits:
            return "the train images given"
        if probe_data_name(self.cfg) != self.cfg.data.name:
            return f"the train split of {probe_data_name(self.cfg)}"
        return f"the labelled train split (the run distilled on data.split={self.cfg.data.split})"

    @property
    def preprocess(self) -> Preprocess:
        if self._preprocess is None:  # the probes' normalization: statistics of the full train split
            self._preprocess = Preprocess.fit(self.split("train"), size=self.image_size)
        return self._preprocess

    def samples(self, split: str, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images, labels) of a class-stratified subset of `n` images of a split (None = all). The
        train split is first cut to the images the run distilled on (its data.n_samples subset), the data set D
        of ESC Sec. 3, where the probes read the run's own data and no other data was given. A run that
        distilled on other splits (data.split: STL-10's unlabelled images) is measured on the labelled train
        split whole: the separability and the probes need labels."""
        data = self.split(split)
        if split == "train" and self.distilled_on_train:
            data = distilled_subset(self.cfg, data)
        if n:
            data = data.subset(stratified_subset(data.labels, n, seed=self.cfg.data.subset_seed))
        return data.images, data.labels

    def embed(self, encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return embed(encoder, images, self.preprocess, device=self.device, channels=self.in_channels)

    def saved_student(self, step: int | None = None) -> tuple[Path, int]:
        """(path, step) of the student saved at `step`; without a step, checkpoints/student.pt, else (a
        diverged or unfinished run) the latest student_step<N>.pt."""
        from .escape import saved_steps
        saved = saved_steps(self.run)
        if step is None:
            if not saved:
                raise UserError(f"{self.run.path} has no saved student (checkpoints/student.pt or student_step<N>.pt)")
            step = max(saved)
        elif step not in saved:
            raise UserError(f"{self.run.path} saved no student at step {step}; its saved students are at steps "
                            f"{', '.join(map(str, saved)) or 'none'}. Choose one of them, or train the run with "
                            "train.checkpoint_at (epochs) at that step (the escape experiment: params.keep_steps)")
        return saved[step], step


def signal_checkpoints(models: RunModels, collapse: str | Path | None = None,
                       student_step: int | None = None) -> dict[str, dict]:
    """{role: {path, step}} for teacher, collapse point (RUN/collapse.json or `collapse`) and student: the one
    saved at `student_step`, else the final one."""
    out = {"teacher": {"path": models.checkpoint_path("teacher"), "step": 0}}
    record = models.run.path / "collapse.json"
    if collapse is not None:
        payload = load_checkpoint(collapse)
        out["collapse"] = {"path": Path(collapse), "step": payload.get("step")}
    elif record.exists():
        import json
        info = json.loads(record.read_text())
        out["collapse"] = {"path": models.run.path / info["checkpoint"], "step": info.get("checkpoint_step"),
                           "metric": info.get("metric"), "value": info.get("value")}
    path, step = models.saved_student(student_step)
    out["student"] = {"path": path, "step": step}
    return out


def analyze_signal(run_dir: str | Path, *, n_samples: int | None = None, n_test: int | None = None,
                   spatial: str = "flatten", center: bool = False, standardize: bool = False,
                   threshold: float = 0.999, rank_eps: float = 0.0,
                   probe: bool = True, collapse: str | Path | None = None, student_step: int | None = None,
                   out: str | Path | None = None, overrides: dict | None = None, progress: bool = True,
                   splits: tuple[ImageData, ImageData] | None = None, architecture=None) -> dict:
    """Per-layer signal-propagation and representation metrics of a run; writes OUT/signal.json,
    OUT/signal_propagation.png (Fig. 2) and OUT/signal_representation.png (Fig. 3). OUT defaults to
    RUN/signal. Returns the JSON content. theta_S is the student saved at `student_step` (ESC Sec. 3: "after
    100 epochs"), else the final one. `splits`, `architecture`: see `RunModels`."""
    models = RunModels(run_dir, overrides, splits, architecture)
    out = Path(out) if out else models.run.path / "signal"
    ckpts = signal_checkpoints(models, collapse, student_step)
    train_images, train_labels = models.samples("train", n_samples)
    test_images, test_labels = models.samples("test", n_test) if probe else (None, None)
    num_classes = max(models.split("train").num_classes, int(train_labels.max()) + 1)
    result = {"run": str(models.run.path), "run_status": (models.run.summary() or {}).get("status", "unfinished"),
              "data": models.split("train").name,
              "metrics_on": f"{models.train_images()} or a class-stratified subset of them (see n_samples and "
                            "n_dead_samples); probes fit on it and score on the test-split subset",
              "checkpoints": {r: {k: (str(v) if isinstance(v, Path) else v) for k, v in c.items()}
                              for r, c in ckpts.items()}}
    encoders = {role: models.encoder(info["path"]) for role, info in ckpts.items()}
    result.update(layer_signals(encoders, (train_images, train_labels), (test_images, test_labels) if probe else None,
                                models.preprocess, models.cfg.probe, num_classes, device=models.device,
                                channels=models.in_channels, spatial=spatial, center=center,
                                standardize=standardize, threshold=threshold, rank_eps=rank_eps,
                                progress=progress, seed=models.cfg.data.subset_seed))
    return write_signal(result, out)


@exact_fp32()  # fp32 that is fp32 on a GPU (no TF32), as in the training loop
def layer_signals(encoders: dict[str, nn.Module], train: tuple[torch.Tensor, torch.Tensor],
                  test: tuple[torch.Tensor, torch.Tensor] | None, preprocess: Preprocess | None, probe_cfg,
                  num_classes: int, *, device: torch.device, channels: int | None = None, spatial: str = "flatten",
                  center: bool = False, standardize: bool = False, threshold: float = 0.999, rank_eps: float = 0.0,
                  progress: bool = False, max_bytes: int = MAX_BYTES, seed: int = 0) -> dict:
    """Per-layer metrics of each encoder on the images `train` (metrics; the probes fit here) and `test`
    (the probes score here; None: no probes): {"layers": [...], "metrics": {name: [row per layer]},
    "relative_to": name, and the settings}.
    The encoders must share one architecture; `*_rel_teacher` columns are relative to "teacher" if
    there is one, else to the first encoder. Samples beyond what memory allows are left out by
    `samples_that_fit` (a class-stratified subset; the counts used are returned) from every metric but the
    dead neurons, which `never_fired` counts over all of `train` ("n_dead_samples")."""
    if not encoders:
        raise UserError("no encoders to measure: pass a run directory, a module, or {name: module}")
    first = next(iter(encoders.values()))
    fit = dict(device=device, spatial=spatial, channels=channels, max_bytes=max_bytes, seed=seed)
    all_images = train[0]
    train_images, train_labels = train = samples_that_fit(first, *train, preprocess, **fit)
    subset = len(train_images) < len(all_images)
    if test is not None:
        test = samples_that_fit(first, *test, preprocess, **fit)
    layers_out, metrics = None, {}
    for role, encoder in encoders.items():
        kw = dict(device=device, spatial=spatial, channels=channels)
        layers, xs = collect_representations(encoder, train_images, preprocess, **kw)
        dead = never_fired(encoder, all_images, preprocess, **kw) if subset else None
        test_xs = collect_representations(encoder, test[0], preprocess, **kw)[1] if test is not None else None
        if layers_out is None:
            layers_out = [vars(layer) for layer in layers]
        elif [layer["name"] for layer in layers_out] != [layer.name for layer in layers]:
            raise UserError(f"encoder {role!r} has other layers than {next(iter(encoders))!r}; compare encoders "
                            "of one architecture")
        rows = []
        for i, (layer, x) in enumerate(zip(layers, xs)):
            row = {"layer": layer.name, **layer_metrics(x, train_labels, center=center, standardize=standardize,
                                                        threshold=threshold, rank_eps=rank_eps)}
            if dead is not None:  # over all the images, not only the subset the spectra fit in memory for
                row.update(dead_neurons=dead[i], dead_fraction=dead[i] / layer.dim)
            if test is not None:
                row["probe"] = score(transform(x, center, standardize).float(), train_labels,
                                     _test_transform(x, test_xs[i], center, standardize), test[1],
                                     probe_cfg, num_classes)
            rows.append(row)
            if progress:
                print(f"signal {role:8s} {layer.name:24s} erank {row['effective_rank']:8.2f}  dead {row['dead_neurons']:5d}"
                      f"/{layer.dim:<6d} cond {row['condition_number']:10.3g}  tr(pinv(Sw) Sb) {row['separability']:9.3g}"
                      + (f"  probe {100 * row['probe'].get('linear', float('nan')):5.1f}%" if test is not None else ""))
        metrics[role] = rows
    reference = "teacher" if "teacher" in metrics else next(iter(metrics))
    _relative_to(metrics, reference)
    return {"n_samples": len(train_images), "n_dead_samples": len(all_images),
            "n_test": len(test[0]) if test is not None else 0, "spatial": spatial,
            "center": center, "standardize": standardize, "rank_eps": rank_eps, "condition_threshold": threshold,
            "layers_are": "post-activation outputs of every activation module of the encoder, in forward "
                          "order, then the encoder output ('embedding')",
            "layers": layers_out, "metrics": metrics, "relative_to": reference}


def write_signal(result: dict, out: str | Path) -> dict:
    """OUT/signal.json, OUT/signal_propagation.png (Fig. 2) and OUT/signal_representation.png (Fig. 3)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result["figures"] = {"propagation": str(plot_propagation(result, out / "signal_propagation.png")),
                         "representation": str(plot_representation(result, out / "signal_representation.png"))}
    write_json(out / "signal.json", result)
    return result


def signal_table(result: dict) -> str:
    """The encoder output's row of each checkpoint as a markdown table (every layer: signal.json and the
    figures), with the file each role was read from."""
    head = ["role", "checkpoint (step)", "effective rank", "dead", "condition", "tr(pinv(Sw) Sb) / teacher's"]
    probed = any("probe" in rows[-1] for rows in result["metrics"].values())
    lines = ["| " + " | ".join(head + (["linear probe %"] if probed else [])) + " |",
             "|" + "---|" * (len(head) + probed)]
    for role, rows in result["metrics"].items():
        row, ckpt = rows[-1], result["checkpoints"][role]
        cells = [role, f"{Path(ckpt['path']).name} ({ckpt['step']})", f"{row['effective_rank']:.2f}",
                 f"{row['dead_neurons']}", f"{row['condition_number']:.3g}", f"{row['separability_rel_teacher']:.3g}"]
        if probed:
            cells.append(f"{100 * row['probe'].get('linear', float('nan')):.1f}" if "probe" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _test_transform(train_x: torch.Tensor, test_x: torch.Tensor, center: bool, standardize: bool) -> torch.Tensor:
    """The test features under the train features' centering/standardization."""
    if not (center or standardize):
        return test_x
    x = test_x.double() - train_x.double().mean(0, keepdim=True)
    if standardize:
        std = (train_x.double() - train_x.double().mean(0, keepdim=True)).std(0, keepdim=True)
        x = x / torch.where(std > 0, std, torch.ones_like(std))
    return x.float()


RELATIVE = ("separability", "trace_within", "trace_between", "trace_total")


def _relative_to(metrics: dict, reference: str) -> None:
    teacher = metrics[reference]
    for rows in metrics.values():
        for row, ref in zip(rows, teacher):
            for key in RELATIVE:
                t = ref[key]
                row[f"{key}_rel_teacher"] = row[key] / t if t and math.isfinite(t) else float("nan")


COLORS = {"teacher": "tab:blue", "collapse": "tab:orange", "student": "tab:red"}
NAMES = {"teacher": r"teacher $\theta_T$", "collapse": r"collapse $\theta_C$", "student": r"student $\theta_S$"}


def _panel(ax, result: dict, key, ylabel: str, log: bool = False, scale: float = 1.0) -> None:
    names = [layer["name"] for layer in result["layers"]]
    for role, rows in result["metrics"].items():
        ys = [(key(r) if callable(key) else r[key]) for r in rows]
        ys = [scale * y if y is not None and math.isfinite(y) else float("nan") for y in ys]
        ax.plot(range(len(ys)), ys, "-o", ms=3, color=COLORS.get(role), label=NAMES.get(role, role))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([str(i + 1) if n != "embedding" else "emb" for i, n in enumerate(names)], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def _figure(result: dict, panels, path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8))
    for ax, (key, ylabel, log, scale) in zip(axes, panels):
        _panel(ax, result, key, ylabel, log, scale)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_propagation(result: dict, path: Path) -> Path:
    """Fig. 2: effective rank, dead neurons (%) and condition number per layer."""
    return _figure(result, [("effective_rank", "effective rank", False, 1.0),
                            ("dead_fraction", "dead neurons (%)", False, 100.0),
                            ("condition_number", "condition number", True, 1.0)],
                   path, f"Signal propagation ({result['spatial']}, n = {result['n_samples']})")


def plot_representation(result: dict, path: Path) -> Path:
    """Fig. 3: traces of Sigma_b and Sigma_w, separability relative to the teacher, per-layer probe."""
    panels = [("trace_between", r"tr $\Sigma_b$", True, 1.0), ("trace_within", r"tr $\Sigma_w$", True, 1.0),
              ("separability_rel_teacher", r"tr($\Sigma_w^\dagger \Sigma_b$) / teacher's", True, 1.0)]
    if any("probe" in r for rows in result["metrics"].values() for r in rows):
        panels.append((lambda r: r.get("probe", {}).get("linear"), "linear probe accuracy (%)", False, 100.0))
    return _figure(result, panels, path, f"Representations ({result['spatial']}, n = {result['n_samples']})")
