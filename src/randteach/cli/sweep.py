"""`randteach sweep` and `randteach report`: many runs from one grid file, and one table from many runs."""
from __future__ import annotations

from pathlib import Path

from ..config import canonical_key
from ..errors import UserError
from ..text import counted

EXIT_FAILED = 3  # as `randteach distill` and `randteach experiment` for runs that did not complete


def slurm_options(args) -> dict:
    """The --slurm KEY=VALUE options (which only --launcher slurm reads: `check_slurm_given`)."""
    out = {}
    for item in args.slurm or []:
        if "=" not in item:
            raise UserError(f"--slurm {item!r}: expected KEY=VALUE, e.g. --slurm partition=gpu")
        k, v = item.split("=", 1)
        out[k.strip()] = _number_or_text(v.strip())
    return out


def _number_or_text(text: str):
    """A --slurm value as YAML would read it in a sweep file's slurm: section: 4, 32.5, or the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _collides(key: str, varied: set[str]) -> bool:
    """`key` is a varied key, a part of one or a whole that holds one (model.encoder_args.depth and
    model.encoder_args), or the sweep file's own name or out."""
    return (key in varied or key.split(".")[0] in ("name", "out")
            or any(key.startswith(v + ".") or v.startswith(key + ".") for v in varied))


def _check_not_varied(overrides: dict, spec, where: str) -> None:
    """An override of a key the sweep varies would be overruled by the grid (or the seeds) without a word."""
    varied = set(spec.grid) | ({"train.seed"} if spec.seeds else set())
    clash = sorted(k for k in overrides if _collides(canonical_key(k), varied))
    if clash:
        raise UserError(f"{', '.join('--' + k for k in clash)}: {where} varies or names "
                        f"{'it' if len(clash) == 1 else 'them'} (grid, seeds, name), so an option on the command "
                        f"line cannot set {'it' if len(clash) == 1 else 'them'}; change the file instead "
                        "(the run folder: --out on the sweep command)")


def cmd_sweep(args, extra) -> int:
    from ..config import parse_overrides
    from . import print_notes
    from ..runs.sweep import (check_grid, check_slurm_given, check_stack_options, expand, load_sweep, plan_local,
                              plan_slurm, run_state, run_sweep, submitit_parameters)
    check_stack_options(args.stack, args.stack_mode, args.launcher, args.workers)
    spec = load_sweep(args.sweep_file)
    if args.out:
        spec.out = args.out
    overrides = parse_overrides(extra)  # e.g. --train.device cuda for every run
    _check_not_varied(overrides, spec, args.sweep_file)
    spec.base.update(overrides)
    if overrides:  # the file alone passed these checks: what fails now is the options' doing
        check_grid(spec, f"{' '.join(extra)} (on the command line)")
    given = slurm_options(args)
    check_slurm_given(given, args.launcher)
    slurm = {**spec.slurm, **given}
    if args.launcher == "slurm":
        submitit_parameters(slurm, spec.name)  # refuse unknown keys before anything is submitted
    configs = expand(spec)
    print_notes(configs, spec.preset)
    if args.dry_run:
        from ..reports.groups import flat_config, seed_paths, show_value, varying_keys
        rows = seed_paths([{"config": flat_config(c.to_dict())} for c in configs])
        keys = varying_keys(rows) + ["train.seed"]
        print(f"{counted(len(configs), 'run')} ({spec.name}):")
        for cfg, row in zip(configs, rows):
            print(f"  {run_state(cfg):<11} {cfg.run_dir()}  " + " ".join(f"{k}={show_value(row['config'].get(k))}" for k in keys))
        if args.launcher == "local":
            print("\n".join(plan_local(configs, args.workers, args.stack, args.stack_mode).lines))
        else:
            print(plan_slurm(configs, slurm))
        from ..data.registry import missing_data_notes
        for note in missing_data_notes(configs):
            print(note)
        return 0
    results = run_sweep(configs, launcher=args.launcher, workers=args.workers, progress=not args.quiet,
                        slurm=slurm, stack=args.stack, stack_mode=args.stack_mode)
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    root = Path(configs[0].run_dir()).parent if configs else Path(spec.out or "runs")
    print(f"sweep {spec.name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
          + f"\nreport: randteach report {root}")
    if counts.get("pending") or counts.get("interrupted"):
        print("the sweep was stopped; run the same command again to finish it (finished runs are kept)")
        return EXIT_FAILED
    if counts.get("failed"):  # a worker the OOM killer took, say: its run resumes from its checkpoint
        print("the failed runs: mend what their errors in the report name (a worker killed for memory needs "
              "nothing), then run the same command again: it retries them, each from its last checkpoint")
    return 0 if set(counts) <= {"completed", "diverged"} else EXIT_FAILED


def cmd_report(args, extra) -> int:
    if extra:
        raise UserError(f"unexpected argument(s) {' '.join(extra)}; `randteach report DIR... [--group-by KEYS] [--out DIR]`")
    from ..reports.groups import write_group_report
    keys = [k.strip() for k in args.group_by.split(",") if k.strip()] if args.group_by is not None else None
    path = write_group_report(args.dirs, out=args.out, group_by=keys)
    print(path.read_text())
    print(f"report: {path}")
    return 0


def add_stack_mode(p) -> None:
    p.add_argument("--stack-mode", default="auto", metavar="MODE",
                   help="how a stack trains: threads (each run by the solo loop, min(K, the worker's torch threads) "
                        "side by side; with one torch thread one after another), vmap (one model of the runs that "
                        "differ only in seed, init alpha/epsilon or optimizer values; bf16, float64-start, EMA-teacher "
                        "or augmented runs alone), or auto: threads on a CPU, vmap on a GPU (docs/PERFORMANCE.md, "
                        "Stacked runs; default: auto)")


def add_slurm_option(p, section: str) -> None:
    p.add_argument("--slurm", action="append", metavar="KEY=VALUE",
                   help=f"with --launcher slurm, a submitit/SLURM option over {section}, repeatable: partition, "
                        "time, gpus_per_node, cpus_per_task, mem_gb, array_parallelism, account, qos, constraint, "
                        "cluster (local: no SLURM)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="run a grid of configs x seeds (local worker processes or SLURM)",
        description="Expand SWEEP.yaml (preset, name, base, grid, seeds, out, slurm) into runs named "
                    "<out>/<name>-<config hash> and execute them. Finished runs are skipped and interrupted "
                    "ones resumed, so re-running a stopped sweep only does the missing work. Extra "
                    "--section.key VALUE options apply to every run (not to a key the grid or seeds vary: "
                    "edit the file).")
    p.add_argument("sweep_file", metavar="SWEEP.yaml")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local worker processes (default), or SLURM jobs via submitit")
    p.add_argument("--workers", type=int, default=None,
                   help="local worker processes, each pinned to one GPU where there are GPUs (default: one per "
                        "visible GPU when the runs use GPUs, else 1; torch threads = $OMP_NUM_THREADS if set, else cores / workers)")
    p.add_argument("--out", help="root folder of the run directories (overrides the file's out)")
    add_slurm_option(p, "the file's slurm:")
    p.add_argument("--stack", type=int, default=1, metavar="K",
                   help="group up to K runs in one worker process (local launcher; how they train: --stack-mode); "
                        "a run that cannot join a stack runs alone, with the reason (default: 1)")
    add_stack_mode(p)
    p.add_argument("--dry-run", action="store_true", help="list the runs, their state and how they would run (workers, stacks); run nothing")
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser(
        "report", help="aggregate runs into a table (mean ± std over seeds) with CSV, Markdown and plots",
        description="Find every summary.json under DIR..., group the runs by the config keys that vary "
                    "(or --group-by), and write report.csv, runs.csv, report.md and PNG plots.")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--group-by", metavar="KEY,...", help="config keys to group by (default: the keys that vary, "
                   "except train.seed); an empty string puts all runs in one group")
    p.add_argument("--out", help="where to write the report (default: the folder that holds every DIR, e.g. a "
                                 "sweep's; for one run folder, report-RUN beside it: a run's report.md is its own; "
                                 "for several folders named one by one, report/ in the folder holding them)")
    p.set_defaults(func=cmd_report)
