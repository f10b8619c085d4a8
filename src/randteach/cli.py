"""The `randteach` command line.

Each subcommand takes a preset (`--preset`), a YAML file (`--config`) and dotted overrides
(`--optim.lr 1e-3`); a user error prints one message and exits 2, never a traceback.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from .errors import UserError

DEMO_PRESET = "cpu"

# Modules that add their own subcommands: each exposes add_parser(subparsers), whose parser sets
# `func(args, extra) -> int` as its default.
COMMAND_MODULES: list[str] = ["commands_escape", "commands_sweep", "commands_analysis", "commands_experiment"]


def _config_from_args(args, extra: list[str], default_preset: str | None = None):
    from .config import build_config, parse_overrides
    return build_config(args.preset or default_preset, args.config, parse_overrides(extra))


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a preset shipped with randteach (see `randteach config --list-presets`)")
    p.add_argument("--config", help="a YAML file of config sections")


def cmd_distill(args, extra) -> int:
    from .config import config_from_dict, load_yaml
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise UserError(f"--resume {run_dir}: no config.yaml there; is it a randteach run directory?")
        from .distill import PYTHON_OBJECTS
        if (run_dir / PYTHON_OBJECTS).exists():
            raise UserError(f"--resume {run_dir}: this run was started from Python with an encoder or data object "
                            "that the command line cannot rebuild; resume it from Python with the same objects: "
                            f"randteach.distill(..., out={str(run_dir)!r}, resume=True)")
        cfg = config_from_dict({**load_yaml(run_dir / "config.yaml"), "out": str(run_dir)})
        if extra:
            raise UserError("--resume continues a run as it was configured; overrides are not allowed with it")
    else:
        cfg = _config_from_args(args, extra)
    from .distill import distill
    from .report import probe_table, write_report
    result = distill(cfg, resume=bool(args.resume), progress=not args.quiet)
    if result.summary.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return 0 if result.summary["status"] == "completed" else 3
    write_report(result.path, command="randteach distill " + " ".join(shlex.quote(a) for a in sys.argv[2:]))
    print(f"\n{result.summary['status']}: {result.path}")
    print(probe_table(result.summary))
    return 0 if result.summary["status"] in ("completed",) else 3


def cmd_probe(args, extra) -> int:
    from .probing import probe_run
    result = probe_run(args.run_dir, extra, checkpoint=args.checkpoint, progress=not args.quiet)
    from .report import probe_table
    print(probe_table({"probe": result}))
    return 0


def demo_verdict(probe: dict) -> str:
    """One plain sentence on what a run showed: the student's final probes against its teacher's and the
    raw pixels', in percentage points (pp), from a summary's "probe" entry."""
    kinds = [k for k in ("linear", "knn") if k in probe.get("student", {}) and k in probe.get("teacher", {})]
    if not kinds:
        return "No student and teacher probes to compare (probe.which leaves one out)."
    label = {"linear": "linear", "knn": "k-NN"}

    def gaps(other: str) -> str:
        return " and ".join(f"{100 * (probe['student'][k] - probe[other][k]):+.2f} pp {label[k]}" for k in kinds)

    wins = [probe["student"][k] > probe["teacher"][k] for k in kinds]
    verdict = ("The student beats its random teacher" if all(wins) else
               "The student does not beat its random teacher" if not any(wins) else
               "The student beats its random teacher on one probe only")
    sentence = f"{verdict} ({gaps('teacher')})"
    if all(k in probe.get("input", {}) for k in kinds):
        above = [probe["student"][k] > probe["input"][k] for k in kinds]
        where = "above them on both probes" if all(above) else "below them on both probes" if not any(above) \
            else "above them on one probe"
        sentence += f"; against raw pixels it is {where} ({gaps('input')})"
    return sentence + "; one seed (the spread over seeds: docs/RESULTS.md, CPU demo recipe search)."


def cmd_demo(args, extra) -> int:
    from .config import build_config, parse_overrides
    from .distill import distill
    from .report import probe_table, write_report
    overrides = {"out": args.out, **parse_overrides(extra)}
    cfg = build_config(DEMO_PRESET, None, overrides)
    print(f"randteach demo: distilling a {cfg.model.encoder} student into its random teacher on {cfg.data.name} "
          f"for {cfg.train.epochs:g} epochs ({cfg.train.precision}), probing every {cfg.train.probe_every:g} epochs.")
    t0 = time.perf_counter()
    result = distill(cfg, progress=not args.quiet)
    report = write_report(result.path, title="randteach demo: random-teacher distillation on "
                          f"{cfg.data.name}", command="randteach demo")
    verdict = demo_verdict(result.summary.get("probe", {}))
    with open(report, "a") as f:
        f.write(f"\n{verdict}\n")
    print(f"\n{probe_table(result.summary)}\n\n{verdict}\n\nwall time {time.perf_counter() - t0:.0f} s "
          f"(run {result.summary['wall_time_s']:.0f} s); report: {report}")
    return 0 if result.summary["status"] == "completed" else 3


def cmd_data(args, extra) -> int:
    from .config import parse_overrides
    from .data import fetch, resolve_root
    opts = parse_overrides(extra)
    unknown = set(opts) - {"data.root"}
    if unknown:
        raise UserError(f"unknown option(s) {', '.join('--' + k for k in unknown)}; `randteach data` takes --data.root")
    root = opts.get("data.root")
    if args.action == "fetch":
        if not args.name:
            raise UserError("which data set? e.g. `randteach data fetch fashion-mnist`")
        path = fetch(args.name, root, base_url=args.base_url)
        print(f"{args.name}: ready in {path}")
    else:
        from .data.registry import DATASETS
        print(f"data root: {resolve_root(root)}")
        for name in DATASETS:
            print(f"  {name}")
    return 0


def cmd_config(args, extra) -> int:
    from .config import help_lines, preset_names
    if args.list_presets:
        print("\n".join(preset_names()))
    elif args.keys:
        print("\n".join(help_lines()))
    else:
        print(_config_from_args(args, extra).to_yaml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="randteach", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("distill", help="distill a student into a random teacher",
                       description="Distill a student into a random teacher. Any config key can be set with "
                                   "--section.key VALUE (see `randteach config --keys`).")
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("probe", help="probe a run's teacher, student and the raw input on any data set (transfer)")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", help="probe this student checkpoint instead of the run's final one")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("demo", help="the CPU demo: distill on Fashion-MNIST, probe, write runs/demo/report.md")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("data", help="list or fetch data sets")
    p.add_argument("action", choices=["fetch", "list"])
    p.add_argument("name", nargs="?")
    p.add_argument("--base-url", help="fetch from this mirror instead of the official host")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("config", help="print the resolved config, the presets, or every key with its help")
    _add_config_args(p)
    p.add_argument("--list-presets", action="store_true")
    p.add_argument("--keys", action="store_true", help="every key with its default and help")
    p.set_defaults(func=cmd_config)

    import importlib
    for name in COMMAND_MODULES:
        importlib.import_module(f"randteach.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.func(args, extra)
    except UserError as e:
        print(f"randteach {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
