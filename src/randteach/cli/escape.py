"""Commands of the escaping paper's diagnostics: `randteach lr-range` (Fig. 1a) and `randteach signal` (Sec. 3, Fig. 2-3).

(The step-size and batch-size sweeps, Fig. 1b-d and App. A, are `randteach experiment escape`, built on
`randteach.analysis.escape.run_escape`.)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..analysis.lr_range import RISE_FACTOR, RISE_FLOOR, SMOOTHING
from ..config import add_flags, opt, options_from_args

LR_RANGE_PRESET = "escape"


@dataclass
class LrRangeOptions:
    """`randteach lr-range`'s own options (the run config comes from --preset/--config/--section.key)."""
    preset: str | None = opt(None, "preset (default: escape, with loss.name=mse)")
    config: str | None = opt(None, "a YAML file of config sections")
    lr_start: float = opt(1e-6, "step size of the first step", gt=0)
    lr_end: float = opt(1e6, "step size of the last step", gt=0)
    steps: int | None = opt(None, "number of optimizer steps", gt=0, cli={"exclusive": "length"})
    epochs: float | None = opt(None, "number of epochs (default 5)", gt=0, cli={"exclusive": "length"})
    smoothing: float = opt(SMOOTHING, "EMA factor beta of the smoothed loss")
    factor: float = opt(RISE_FACTOR, "rise: smoothed loss > factor x running minimum")
    floor: float = opt(RISE_FLOOR, "running minima below this count as this")
    no_supervised: bool = opt(False, "teacher-student side only")
    out: str | None = opt(None, "output folder (default runs/lr-range-<config hash>-...)")


@dataclass
class SignalOptions:
    """`randteach signal`'s options (besides RUN_DIR and the --probe.*, --data.root, --train.device overrides)."""
    n_samples: int | None = opt(None, "training images the metrics are computed on (default: the images the run "
                                "distilled on; the largest stratified subset of them that fits in 4 GiB for all "
                                "metrics but the dead neurons)", gt=0)
    n_test: int | None = opt(None, "test images the per-layer probes are scored on (default: as --n-samples)", gt=0)
    spatial: str = opt("flatten", "conv maps: every (channel, position) is a neuron (flatten, the authors' C*H*W) "
                       "or average over positions (avgpool: a channel is a neuron)", ("flatten", "avgpool"))
    rank_eps: float = opt(0.0, "eps added to the effective rank's normalized spectrum (0 is the escaping paper's; "
                          "--center --rank-eps 1e-7 is RankMe's convention)", ge=0)
    center: bool = opt(False, "center each neuron before the metrics")
    standardize: bool = opt(False, "center and scale each neuron before the metrics")
    threshold: float = opt(0.999, "spectral mass defining sigma'_min", gt=0, le=1)
    no_probe: bool = opt(False, "skip the per-layer probes")
    collapse: str | None = opt(None, "checkpoint to use as the collapse point (default: RUN_DIR/collapse.json's)")
    student_step: int | None = opt(None, "the student saved at this step is theta_S (default: the final student; "
                                   "the escaping paper takes it after 100 epochs)", gt=0)
    out: str | None = opt(None, "output folder (default RUN_DIR/signal)")


def cmd_lr_range(args, extra) -> int:
    from ..analysis.lr_range import lr_range, refuse_range_keys
    from ..config import build_config, parse_overrides
    quiet, o = args.quiet, options_from_args(args, LrRangeOptions)
    overrides = parse_overrides(extra)
    refuse_range_keys(overrides, "lr-range")
    preset = o.preset or (None if o.config else LR_RANGE_PRESET)
    if preset == LR_RANGE_PRESET and "loss.name" not in overrides:
        overrides = {"loss.name": "mse", **overrides}  # Fig. 1a: plain MSE (N-MSE comes after it, in App. A)
    cfg = build_config(preset, o.config, overrides)
    epochs = None if o.steps is not None else (o.epochs if o.epochs is not None else 5.0)
    result = lr_range(cfg, lr_start=o.lr_start, lr_end=o.lr_end, steps=o.steps, epochs=epochs,
                      out=o.out or cfg.out, supervised=not o.no_supervised, smoothing=o.smoothing,
                      factor=o.factor, floor=o.floor, progress=not quiet)
    print(f"LR range test, {result['steps']} steps, lr {result['lr_start']:g} -> {result['lr_end']:g} "
          f"({result['loss']} loss, {result['optimizer']}):")
    for name, side in result["sides"].items():
        rise, nonfinite = side["rise"], side["nonfinite"]
        print(f"  {name:16s} rise at lr {rise['lr']:.3g} (step {rise['step']})" if rise else
              f"  {name:16s} no rise", end="")
        print(f"; diverges (non-finite) at lr {nonfinite['lr']:.3g} (step {nonfinite['step']})" if nonfinite
              else "; stays finite")
        if side.get("suggested"):
            print(f"  {'':16s} suggested lr {side['suggested']['lr']:.3g} ({side['suggested']['rule']})")
    print(f"{result['png']}")
    return 0


def cmd_signal(args, extra) -> int:
    from ..analysis.signal_layers import analyze_signal, signal_table
    from ..config import parse_overrides
    from ..runs.rundir import run_lock
    run_dir, quiet, o = args.run_dir, args.quiet, options_from_args(args, SignalOptions)
    with run_lock(run_dir):  # it writes RUN_DIR/signal unless --out says elsewhere
        result = analyze_signal(run_dir, n_samples=o.n_samples, n_test=o.n_test, spatial=o.spatial,
                                center=o.center, standardize=o.standardize, threshold=o.threshold,
                                rank_eps=o.rank_eps,
                                probe=not o.no_probe, collapse=o.collapse, student_step=o.student_step, out=o.out,
                                overrides=parse_overrides(extra), progress=not quiet)
    print(signal_table(result))
    if result["run_status"] != "completed" and o.student_step is None:  # the latest snapshot stands in
        name = Path(result["checkpoints"]["student"]["path"]).name
        print(f"note: the run is {result['run_status']}, not completed: 'student' is its latest saved student, {name}")
    print(f"{len(result['layers'])} layers x {', '.join(result['metrics'])}: {result['figures']['propagation']}, "
          f"{result['figures']['representation']}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "lr-range", help="LR range test: teacher-student vs supervised loss as the step size grows (escaping paper, Fig. 1a)",
        description="Grow the step size exponentially from --lr-start to --lr-end over --steps optimizer steps "
                    "(or --epochs epochs, default 5) and record the teacher-student loss (the distillation loop) "
                    "and the supervised loss (the same encoder + a linear classifier, cross-entropy on labels), "
                    "with divergences. Without --preset/--config this is the escaping paper's setting: the "
                    "'escape' preset with plain MSE (--loss.name overrides). Any config key: --section.key VALUE. "
                    "Writes OUT/lr_range.json and OUT/lr_range.png.")
    add_flags(p, LrRangeOptions)
    p.set_defaults(func=cmd_lr_range)

    p = subparsers.add_parser(
        "signal", help="per-layer effective rank, dead neurons, condition number, Fisher metrics, probes (escaping paper, Fig. 2-3)",
        description="For a run's teacher, collapse point (RUN_DIR/collapse.json, if recorded) and final student: "
                    "hook every activation layer of the encoder (and its output), collect representations of the "
                    "probe data (a class-stratified subset where the whole split would not fit in 4 GiB), and compute per layer the effective rank, dead "
                    "neurons, condition number, Fisher discriminant traces and separability (also relative to the "
                    "teacher) and a linear probe. Writes OUT/signal.json, signal_propagation.png (Fig. 2) and "
                    "signal_representation.png (Fig. 3); OUT defaults to RUN_DIR/signal. Takes --probe.*, "
                    "--data.root and --train.device overrides.")
    p.add_argument("run_dir")
    add_flags(p, SignalOptions)
    p.set_defaults(func=cmd_signal)
