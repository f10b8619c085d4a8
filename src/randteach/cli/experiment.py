"""`randteach experiment NAME --scale cpu|paper`: one of the papers' experiments, end to end (the map to the papers: docs/PAPERS.md)."""
from __future__ import annotations

import argparse
import shlex
import sys

from .sweep import add_slurm_option, add_stack_mode, slurm_options

EXIT_UNFINISHED = 3


def cmd_experiment(args, extra) -> int:
    from ..config import parse_overrides
    from ..errors import UserError
    from ..experiments import run_experiment
    overrides = parse_overrides(extra)
    if "train.seed" in overrides:  # every arm lists its seeds, which would overrule it without a word
        raise UserError("--train.seed: an experiment runs its recipe's seeds; choose how many with --seeds N "
                        "(seeds 0..N-1)")
    kw = dict(out=args.out, seeds=args.seeds, overrides=overrides, recipe=args.recipe,
              launcher=args.launcher, workers=args.workers, progress=not args.quiet, stack=args.stack,
              stack_mode=args.stack_mode, slurm=slurm_options(args),
              command=" ".join(["randteach", "experiment", args.name, "--scale", args.scale]
                               + [shlex.quote(a) for a in _options(sys.argv)]))
    if args.dry_run:
        print(run_experiment(args.name, args.scale, dry=True, **kw))
        return 0
    outcome = run_experiment(args.name, args.scale, **kw)
    print(outcome.report.read_text())
    print(f"report: {outcome.report}")
    if not outcome.finished:
        print("some runs did not finish; run the same command again to complete them (finished runs are kept)")
    return 0 if outcome.finished else EXIT_UNFINISHED


def _options(argv: list[str]) -> list[str]:
    """The command line after `experiment NAME`, without --scale (already shown) and progress flags."""
    rest = argv[argv.index("experiment") + 2:] if "experiment" in argv else []
    out, skip = [], False
    for a in rest:
        if skip:
            skip = False
        elif a == "--scale":
            skip = True
        elif not a.startswith("--scale=") and a != "--quiet":
            out.append(a)
    return out


def add_parser(subparsers) -> None:
    from ..experiments import NAMES, SCALES, __doc__ as overview
    p = subparsers.add_parser(
        "experiment", help="run one of the papers' experiments and write its report",
        description="Run the distillations an experiment needs (finished runs are reused: run directories are "
                    "content-addressed and shared by all experiments of a scale), then aggregate them into "
                    "OUT/NAME/report.md with tables (mean ± std over seeds), CSV and PNG. Extra --section.key "
                    "VALUE options apply to every distillation run (e.g. --train.device cuda); one that an arm's "
                    "grid varies replaces that grid with its one value (a note says so), and one that the "
                    "analysis sets on each run itself (escape's, lr-range's run lengths) is refused.\n\n"
                    + overview.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=NAMES, metavar="NAME", help=", ".join(NAMES))
    p.add_argument("--scale", choices=SCALES + ("tiny",), default="cpu", metavar="{cpu,paper}",
                   help="cpu: Fashion-MNIST (subsets in a few experiments) and small encoders for 2 CPU cores; paper: the paper's data "
                        "sets and recipe (GPUs) (default cpu)")
    p.add_argument("--out", help="root folder: run directories in OUT/runs, the report in OUT/NAME "
                                 "(default runs/experiments/SCALE)")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local worker processes, or SLURM jobs via submitit (options: the recipe's slurm:, "
                        "and --slurm)")
    add_slurm_option(p, "the recipe's slurm:")
    p.add_argument("--workers", type=int, default=None,
                   help="local worker processes, each pinned to one GPU where there are GPUs (torch threads = "
                        "$OMP_NUM_THREADS if set, else cores / workers); 0: run in this process, one after another (default: one per visible "
                        "GPU when the runs use GPUs, else 1)")
    p.add_argument("--stack", type=int, default=1, metavar="K",
                   help="group up to K runs in one worker process (local launcher; how they train: --stack-mode; "
                        "docs/PERFORMANCE.md, Stacked runs)")
    add_stack_mode(p)
    p.add_argument("--seeds", type=int, help="use seeds 0..N-1 instead of the recipe's")
    p.add_argument("--recipe", help="a recipe YAML file to use instead of the shipped one")
    p.add_argument("--dry-run", action="store_true", help="list the runs (and their state), how they would run (workers, stacks) and what follows; run nothing")
    p.set_defaults(func=cmd_experiment)
