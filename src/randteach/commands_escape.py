"""Commands of the escaping paper's diagnostics: `randteach lr-range` (E12) and `randteach signal` (E14).

(The step-size and batch-size sweeps, E13/E15, are `randteach experiment escape`, built on
`randteach.analysis.escape.run_escape`.)
"""
from __future__ import annotations

LR_RANGE_PRESET = "escape"


def cmd_lr_range(args, extra) -> int:
    from .analysis.lr_range import lr_range
    from .config import build_config, parse_overrides
    overrides = parse_overrides(extra)
    preset = args.preset or (None if args.config else LR_RANGE_PRESET)
    if preset == LR_RANGE_PRESET and "loss.name" not in overrides:
        overrides = {"loss.name": "mse", **overrides}  # Fig. 1a: plain MSE (N-MSE comes after it, in App. A)
    cfg = build_config(preset, args.config, overrides)
    epochs = None if args.steps is not None else (args.epochs if args.epochs is not None else 5.0)
    result = lr_range(cfg, lr_start=args.lr_start, lr_end=args.lr_end, steps=args.steps, epochs=epochs,
                      out=args.out or cfg.out, supervised=not args.no_supervised, smoothing=args.smoothing,
                      factor=args.factor, floor=args.floor, progress=not args.quiet)
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
    from .analysis.signal_layers import analyze_signal
    from .config import parse_overrides
    from .rundir import run_lock
    with run_lock(args.run_dir):  # it writes RUN_DIR/signal unless --out says elsewhere
        result = analyze_signal(args.run_dir, n_samples=args.n_samples, n_test=args.n_test, spatial=args.spatial,
                                center=args.center, standardize=args.standardize, threshold=args.threshold,
                                rank_eps=args.rank_eps,
                                probe=not args.no_probe, collapse=args.collapse, out=args.out,
                                overrides=parse_overrides(extra), progress=not args.quiet)
    print(f"{len(result['layers'])} layers x {', '.join(result['metrics'])}: {result['figures']['propagation']}, "
          f"{result['figures']['representation']}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "lr-range", help="LR range test: teacher-student vs supervised loss as the step size grows (E12, Fig. 1a)",
        description="Grow the step size exponentially from --lr-start to --lr-end over --steps optimizer steps "
                    "(or --epochs epochs, default 5) and record the teacher-student loss (the distillation loop) "
                    "and the supervised loss (the same encoder + a linear classifier, cross-entropy on labels), "
                    "with divergences. Without --preset/--config this is the escaping paper's setting: the "
                    "'escape' preset with plain MSE (--loss.name overrides). Any config key: --section.key VALUE. "
                    "Writes OUT/lr_range.json and OUT/lr_range.png.")
    p.add_argument("--preset", help="preset (default: escape, with loss.name=mse)")
    p.add_argument("--config", help="a YAML file of config sections")
    p.add_argument("--lr-start", type=float, default=1e-6, help="step size of the first step (default 1e-6)")
    p.add_argument("--lr-end", type=float, default=1e6, help="step size of the last step (default 1e6)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="number of optimizer steps")
    length.add_argument("--epochs", type=float, help="number of epochs (default 5)")
    p.add_argument("--smoothing", type=float, default=0.9, help="EMA factor beta of the smoothed loss (default 0.9)")
    p.add_argument("--factor", type=float, default=4.0, help="rise: smoothed loss > factor x running minimum (default 4)")
    p.add_argument("--floor", type=float, default=1e-8, help="running minima below this count as this (default 1e-8)")
    p.add_argument("--no-supervised", action="store_true", help="teacher-student side only")
    p.add_argument("--out", help="output folder (default runs/lr-range-<config hash>-...)")
    p.set_defaults(func=cmd_lr_range)

    p = subparsers.add_parser(
        "signal", help="per-layer effective rank, dead neurons, condition number, Fisher metrics, probes (E14)",
        description="For a run's teacher, collapse point (RUN_DIR/collapse.json, if recorded) and final student: "
                    "hook every activation layer of the encoder (and its output), collect representations of a "
                    "class-stratified subset of the probe data, and compute per layer the effective rank, dead "
                    "neurons, condition number, Fisher discriminant traces and separability (also relative to the "
                    "teacher) and a linear probe. Writes OUT/signal.json, signal_propagation.png (Fig. 2) and "
                    "signal_representation.png (Fig. 3); OUT defaults to RUN_DIR/signal. Takes --probe.*, "
                    "--data.root and --train.device overrides.")
    p.add_argument("run_dir")
    p.add_argument("--n-samples", type=int, help="training images the metrics are computed on (default: the whole "
                   "split, or the largest stratified subset that fits in 4 GiB)")
    p.add_argument("--n-test", type=int, help="test images the per-layer probes are scored on (default: as --n-samples)")
    p.add_argument("--spatial", choices=("flatten", "avgpool"), default="flatten",
                   help="conv maps: every (channel, position) is a neuron (default, the authors' C*H*W) or "
                        "average over positions (a channel is a neuron)")
    p.add_argument("--rank-eps", type=float, default=0.0, help="eps added to the effective rank's normalized "
                   "spectrum (default 0, the escaping paper; --center --rank-eps 1e-7 is RankMe's convention)")
    p.add_argument("--center", action="store_true", help="center each neuron before the metrics")
    p.add_argument("--standardize", action="store_true", help="center and scale each neuron before the metrics")
    p.add_argument("--threshold", type=float, default=0.999, help="spectral mass defining sigma'_min (default 0.999)")
    p.add_argument("--no-probe", action="store_true", help="skip the per-layer probes")
    p.add_argument("--collapse", help="checkpoint to use as the collapse point (default: RUN_DIR/collapse.json's)")
    p.add_argument("--out", help="output folder (default RUN_DIR/signal)")
    p.set_defaults(func=cmd_signal)
