"""The `randteach` command line.

Each subcommand takes a preset (`--preset`), a YAML file (`--config`) and dotted overrides
(`--optim.lr 1e-3`); a user error prints one message and exits 2, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shlex
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from ..errors import RandteachWarning, Terminated, UserError

DEMO_PRESET = "cpu"


def _config_from_args(args, extra: list[str], default_preset: str | None = None):
    from ..config import build_config, parse_overrides
    return build_config(args.preset or default_preset, args.config, parse_overrides(extra))


def print_notes(configs, preset_name: str | None) -> None:
    """Settings the runs never read (e.g. optim.momentum under AdamW), on stderr before they start (values
    that preset `preset_name` sets are left out: a preset's convnet width under --model.encoder resnet18 is
    not the user's doing)."""
    from ..config import ignored_notes
    for line in ignored_notes(configs, preset_name):
        print(line, file=sys.stderr)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a preset shipped with randteach (see `randteach config --list-presets`)")
    p.add_argument("--config", action="append", metavar="FILE",
                   help="a YAML file of config sections; several are applied in the order given")


def _with_moved_root(cfg, root: str):
    """The run's config with the data found under `root` now (--resume --data.root). A run started before
    2026-12-02 hashed its root into the digest its checkpoint holds, so it continues only under that root."""
    from ..config import config_from_dict
    from ..runs.checkpoint import load_checkpoint
    last = cfg.run_dir() / "checkpoints" / "last.pt"
    old = cfg.digest(before_2026_12=True)
    # the checkpoint (a large file, read again to resume) is opened only where its digest can tell
    if root != cfg.data.root and old != cfg.digest() and last.is_file() and \
            load_checkpoint(last).get("config_digest") == old:
        raise UserError(f"--resume {cfg.run_dir()} --data.root {root}: this run was started before 2026-12-02, "
                        f"when the data root was part of a run's config digest; it continues only with its own "
                        f"root, {cfg.data.root}: make the data reachable there (a symbolic link will do) and "
                        "resume without --data.root")
    moved = cfg.to_dict()
    moved["data"]["root"] = root
    return config_from_dict(moved)


def cmd_distill(args, extra) -> int:
    from ..config import config_from_dict, load_yaml, parse_overrides
    if args.resume:
        run_dir = Path(args.resume)
        if run_dir.is_file():
            raise UserError(f"--resume {run_dir}: expected the run directory, got a file; try "
                            f"--resume {run_dir.parent}")
        if not (run_dir / "config.yaml").exists():
            raise UserError(f"--resume {run_dir}: no config.yaml there; is it a randteach run directory?")
        from ..runs.rundir import python_objects
        if python_objects(run_dir):
            raise UserError(f"--resume {run_dir}: this run was started from Python with an encoder or data object "
                            "that the command line cannot rebuild; resume it from Python with the same objects: "
                            f"randteach.distill(..., out={str(run_dir)!r}, resume=True)")
        saved = load_yaml(run_dir / "config.yaml")
        confirmed = parse_overrides(extra)
        own = (saved.get("model") or {}).get("encoder")
        if (args.preset or args.config or set(confirmed) - {"model.encoder", "data.root"}
                or confirmed.get("model.encoder", own) != own):
            raise UserError("--resume continues a run as it was configured; --preset, --config and overrides are "
                            "not allowed with it (only --data.root DIR, where the data lies now, --allow-import "
                            "MODULE, or --model.encoder repeating the run's own import-path encoder, to confirm it)")
        cfg = config_from_dict({**saved, "out": str(run_dir)})
        if "data.root" in confirmed:
            cfg = _with_moved_root(cfg, confirmed["data.root"])
    else:
        cfg = _config_from_args(args, extra)
        print_notes([cfg], args.preset)
    from ..reports.run import probe_table, recorded_command, write_run_report
    from ..runs.sweep import finished_summary
    from ..train.loop import distill
    reused = finished_summary(cfg) is not None
    result = distill(cfg, resume=bool(args.resume), progress=not args.quiet)
    if result.summary.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return 0 if result.summary["status"] == "completed" else 3
    this_command = "randteach " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_run_report(result.path, command=(recorded_command(result.path) if args.resume else None) or this_command)
    print(f"\n{result.summary['status']}: {result.path}" + (" (finished before: reused, nothing trained)" if reused else ""))
    if result.summary["status"] != "completed" and result.summary.get("probe_epoch") is not None:
        print(f"(the run stopped early: the last probe below is from epoch {result.summary['probe_epoch']:.4g})")
    if result.summary["status"] == "interrupted":
        print(f"continue it with: randteach distill --resume {shlex.quote(str(result.path))}")
    print(probe_table(result.summary))
    return 0 if result.summary["status"] in ("completed",) else 3


def cmd_probe(args, extra) -> int:
    from ..config import config_from_dict, parse_overrides
    from ..probes.embedding import probe_data_name
    from ..probes.run import probe_run
    from ..reports.run import probe_table
    from ..runs.rundir import ResultsNotSaved, RunDir
    try:
        result = probe_run(args.run_dir, extra, checkpoint=args.checkpoint, progress=not args.quiet)
    except ResultsNotSaved as e:
        print(probe_table({"probe": e.result}))  # printed before the error, so nothing computed is lost
        raise
    print(probe_table({"probe": result}))
    saved = RunDir(args.run_dir).saved_config()
    data = parse_overrides(extra).get("probe.data") or probe_data_name(config_from_dict(saved))
    print(f"on {data}, student {args.checkpoint or 'checkpoints/student.pt'}; saved under "
          f"{Path(args.run_dir) / 'probes'}")
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


def set_aside_another_run(out: Path, cfg) -> None:
    """The demo writes to one folder: a run of another config there (an earlier randteach's demo, or other
    options) is renamed beside it, not refused (the demo must run) and not overwritten (it is kept)."""
    from ..runs.rundir import RunDir, run_lock
    try:
        other = RunDir(out).holds_another_config(cfg)
    except (UserError, TypeError, AttributeError):  # a config.yaml of another version: not this config either
        other = True
    if not other:
        return
    aside = next(p for p in (out.with_name(f"{out.name}-previous-{i}") for i in range(1, 10 ** 6)) if not p.exists())
    with run_lock(out):  # not while another process writes there
        out.rename(aside)
    print(f"randteach demo: {out} held a run of another config (an earlier version's or other options); "
          f"kept it as {aside}")


def cmd_demo(args, extra) -> int:
    from ..config import build_config, parse_overrides
    from ..reports.run import probe_table, write_run_report
    from ..train.loop import distill
    overrides = {"out": args.out, **parse_overrides(extra)}
    cfg = build_config(DEMO_PRESET, None, overrides)
    set_aside_another_run(Path(args.out), cfg)
    from ..train.state import probe_epochs
    marks = ", ".join(f"{e:g}" for e in probe_epochs(cfg, cfg.train.epochs))
    print(f"randteach demo: distilling a {cfg.model.encoder} student into its random teacher on {cfg.data.name} "
          f"for {cfg.train.epochs:g} epochs ({cfg.train.precision}), probing at epochs {marks}.")
    t0 = time.perf_counter()
    result = distill(cfg, progress=not args.quiet)
    report = write_run_report(result.path, title="randteach demo: random-teacher distillation on "
                          f"{cfg.data.name}", command="randteach demo")
    verdict = demo_verdict(result.summary.get("probe", {}))
    with open(report, "a") as f:
        f.write(f"\n{verdict}\n")
    print(f"\n{probe_table(result.summary)}\n\n{verdict}\n\nwall time {time.perf_counter() - t0:.0f} s "
          f"(run {result.summary['wall_time_s']:.0f} s); report: {report}")
    return 0 if result.summary["status"] == "completed" else 3


BUILT_IN = {"digits": "built in (scikit-learn)", "folder": "your image folder (--data.path)"}


def cmd_data(args, extra) -> int:
    from ..config import parse_overrides
    from ..data import fetch, resolve_root
    opts = parse_overrides(extra)
    unknown = set(opts) - {"data.root"}
    if unknown:
        raise UserError(f"unknown option(s) {', '.join('--' + k for k in unknown)}; `randteach data` takes --data.root")
    root = opts.get("data.root")
    from ..data.registry import DATASETS, located
    from ..data.roots import fetch_command
    if args.action == "fetch":
        if not args.name:
            raise UserError("which data set? e.g. `randteach data fetch fashion-mnist`")
        found = _copy_loading_reads_outside_fetch(args.name, root)
        path = found or fetch(args.name, root, base_url=args.base_url, progress=not args.quiet)
        print(f"{args.name}: ready in {path}" + (" (already on disk; nothing fetched)" if found else ""))
    else:
        if args.name:
            raise UserError(f"`randteach data list` lists every data set; it takes no name (got {args.name!r})")
        print(f"data root: {resolve_root(root)}" + ("" if resolve_root(root).is_dir() else "  (does not exist)"))
        for name in DATASETS:
            where = located(name, root)
            command = fetch_command(name, resolve_root(root)) if root else f"randteach data fetch {name}"
            hint = f"not found (`{command}` gets it or says how)"
            print(f"  {name:<14} {where or BUILT_IN.get(name, hint)}")
    return 0


def _copy_loading_reads_outside_fetch(name: str, root: str | None):
    """A complete copy of `name` that loading reads and `fetch` does not look for: torchvision's layout under
    the data root, or, with no --data.root given, a system folder (the Debian package's). The root's own
    folder is left to `fetch`, which checks its checksums."""
    from ..data import resolve_root
    from ..data.registry import DATASETS, located
    if name not in DATASETS or (found := located(name, root)) is None:
        return None
    base = resolve_root(root)
    if found == base / (DATASETS[name].folder or "") or (root is not None and not found.is_relative_to(base)):
        return None
    return found


def cmd_config(args, extra) -> int:
    from ..config import help_lines, preset_names
    if args.list_presets:
        print("\n".join(preset_names()))
    elif args.keys:
        given = [f"preset {args.preset}"] * bool(args.preset) + list(args.config or []) + ["options"] * bool(extra)
        print("\n".join(help_lines(_config_from_args(args, extra) if given else None, " + ".join(given))))
    else:
        cfg = _config_from_args(args, extra)
        print_notes([cfg], args.preset)  # on stderr: the YAML on stdout stays a valid config file
        print(cfg.to_yaml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: --allow-import is read from the line before argparse (`_allowed_imports`), by its name
    parser = argparse.ArgumentParser(prog="randteach", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--allow-import", action="append", default=[], metavar="MODULE",
                        help="import an encoder 'MODULE:callable' named in a file (a run's config.yaml, a sweep "
                             "file, --config); without it such a file imports nothing (also accepted after the "
                             "command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("distill", help="distill a student into a random teacher",
                       description="Distill a student into a random teacher. Any config key can be set with "
                                   "--section.key VALUE (see `randteach config --keys`); --out DIR names the run "
                                   "folder (default runs/NAME-HASH), --name NAME its prefix. An encoder imported "
                                   "from a file's 'MODULE:callable' needs --allow-import MODULE.")
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("probe", help="probe a run's teacher, student and the raw input on any data set (transfer)",
                       description="Probe a finished run. --probe.* options change the probe (e.g. --probe.data "
                                   "digits for transfer, --probe.which [student], --probe.n_train 5000); "
                                   "--data.root and --train.device say where the data and the device are; "
                                   "--data.subset_seed draws other probe subsets.")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", help="probe this student checkpoint instead of the run's final one")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("demo", help="the CPU demo: distill on Fashion-MNIST, probe, write runs/demo/report.md",
                       description=f"Distill with the {DEMO_PRESET} preset on Fashion-MNIST, probe teacher, student "
                                   "and raw pixels, and write report.md into --out. Any config key can be set "
                                   "with --section.key VALUE (e.g. --train.seed 1; see `randteach config --keys`).")
    p.add_argument("--out", default="runs/demo", help="the run folder (default: runs/demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("data", help="list or fetch data sets",
                       description="list: every data set, where it was found or how to get it. fetch NAME: download "
                                   "NAME from its official source, checksum-verified, into --data.root DIR (default: "
                                   "$RANDTEACH_DATA, else ~/.cache/randteach).")
    p.add_argument("action", choices=["fetch", "list"])
    p.add_argument("name", nargs="?", help="the data set to fetch (names: `randteach data list`)")
    p.add_argument("--base-url", help="fetch from this mirror instead of the official host")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("config", help="print the resolved config, the presets, or every key with its help")
    _add_config_args(p)
    p.add_argument("--list-presets", action="store_true", help="the preset names")
    p.add_argument("--keys", action="store_true", help="every key with its default and help (with --preset or "
                   "--config, also the value they set)")
    p.set_defaults(func=cmd_config)

    # The commands with modules of their own: each module's add_parser(subparsers) adds them, with
    # `func(args, extra) -> int` as the parser's default.
    from . import analysis, escape, experiment, export, sweep
    for module in (escape, sweep, analysis, experiment, export):
        module.add_parser(sub)
    return parser


def _allowed_imports(argv: list[str]) -> tuple[set[str], list[str]]:
    """(the modules of every `--allow-import MODULE`, the other arguments), wherever on the line they stand.
    Taken out before argparse reads the line: after the command, a command's positional arguments (landscape's
    run directories) would take the module name for one of theirs."""
    allowed, rest, i = set(), [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--allow-import" or arg.startswith("--allow-import="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if not value or value.startswith("--"):
                raise UserError("--allow-import needs a module name, e.g. --allow-import mypackage.encoders")
            allowed.add(value.partition(":")[0])
            i += 1 if "=" in arg else 2
            continue
        rest.append(arg)
        i += 1
    return allowed, rest


def _confine_imports(allowed: set[str], extra: list[str]) -> None:
    """From now on only the modules in `allowed` and the module of a `--model.encoder pkg.mod:fn` given on this
    command line may be imported."""
    from ..config import confine_imports
    allowed = set(allowed)
    for i, arg in enumerate(extra):
        if arg.startswith("--model.encoder"):
            value = arg.partition("=")[2] if "=" in arg else (extra[i + 1] if i + 1 < len(extra) else "")
            allowed.add(value.partition(":")[0])
    confine_imports(allowed)


def _reader_left() -> int:
    """The reader of stdout closed the pipe (`randteach data list | head`): stop quietly, as a command
    killed by SIGPIPE would, with that exit status. Python would otherwise print a traceback, and
    again at exit when it flushes what is still buffered; stdout is pointed at /dev/null to stop that."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + 13  # 128 + SIGPIPE, the shell's status of a command the signal ended


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """A command that does not catch SIGTERM itself (the training commands do, to checkpoint) ends on it as on
    Ctrl-C: its cleanup runs and it says "interrupted", where the default action ended it without a word."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise Terminated()
    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _our_warnings_plain(command: str):
    """randteach's own warnings (`RandteachWarning`: a changed image folder, damaged log lines, ...) read like
    its errors, one line "randteach CMD: warning: ...", not Python's file, line number and source line;
    others' unchanged."""
    default = warnings.formatwarning

    def plain(message, category, filename, lineno, line=None):
        if issubclass(category, RandteachWarning):
            return f"randteach {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)
    warnings.formatwarning = plain
    try:
        yield
    finally:
        warnings.formatwarning = default


# The commands that keep what they finished and go on from it when run again (distill, demo and sweep say so
# in their own words); the others (finetune, signal, probe, ...) start over.
RESUMING = frozenset({"lr-range", "landscape", "imp", "lmc", "experiment"})


def main(argv: list[str] | None = None) -> int:
    from ..config import confine_imports
    parser = build_parser()
    try:
        allowed, argv = _allowed_imports(sys.argv[1:] if argv is None else list(argv))
    except UserError as e:
        print(f"randteach: error: {e}", file=sys.stderr)
        return 2
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if "--quiet" in extra:  # also after the command (`randteach distill ... --quiet`), where habit puts it
        extra = [a for a in extra if a != "--quiet"]
        args.quiet = True
    try:
        _confine_imports(allowed, extra)
        with _sigterm_as_interrupt(), _our_warnings_plain(args.command):
            rc = args.func(args, extra)
        sys.stdout.flush()  # inside the try: a reader that left (`| head`) shows up here, not at exit
        return rc
    except BrokenPipeError:
        return _reader_left()
    except UserError as e:
        print(f"randteach {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTDIR):  # e.g. --out naming a file
            print(f"randteach {args.command}: error: cannot use {e.filename or 'a path'} as a folder: "
                  f"{e.strerror} (a file stands where a folder is needed); choose another --out", file=sys.stderr)
            return 2
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        print(f"randteach {args.command}: error: cannot write {e.filename or 'a file'}: {e.strerror} (full disk, "
              "quota or read-only folder?); what was already written is kept: free space or choose a writable "
              "folder and run the command again", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        again = ("; run the same command again to go on: what it finished is kept" if args.command in RESUMING
                 else "")
        print("interrupted" + (" (SIGTERM)" if isinstance(e, Terminated) else "") + again, file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)  # the shells' codes
    finally:
        confine_imports(None)  # the confinement is this invocation's; a Python caller of main() gets its own back

