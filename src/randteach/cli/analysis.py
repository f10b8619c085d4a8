"""Commands of the landscape and supervised analyses (Sarnthein et al. 2023, Sec. 5-6: Fig. 5, 8, 9):

    randteach landscape  loss / probe / embedding-KL landscape on a plane through three parameter vectors
    randteach finetune   supervised training of a run's encoder (or any checkpoint) + a new linear classifier
    randteach imp        iterative magnitude pruning with rewinding (lottery tickets)
    randteach lmc        linear mode connectivity of supervised runs from one start
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..analysis.imp import PAPER_ROUNDS
from ..analysis.landscape import PROJECTIONS, UNITS, VIEWS
from ..config import add_flags, opt, options_from_args
from ..errors import UserError
from ..text import counted

START_HELP = ("start: student | student_init | teacher (the run's checkpoints), random (a fresh init), or a "
              "checkpoint file; '@L' rewinds to L epochs of supervised training from there (e.g. random@1)")


# ---------------------------------------------------------------------------------------- landscape

@dataclass
class LandscapeOptions:
    """`randteach landscape`'s options (besides the run directories of --view and --probe.* overrides)."""
    view: str | None = opt(None, "named plane: non-local (θ_T, θ_S(1), θ*_S(1)) or shared (θ_T, θ*_S(0), θ*_S(1))",
                           VIEWS)
    anchors: list[str] | None = opt(None, "explicit anchors: RUN_DIR[:teacher|student_init|student] or checkpoint "
                                    "files", cli={"nargs": 3, "metavar": ("ORIGIN", "A1", "A2")})
    run: str | None = opt(None, "run directory giving the architecture, loss, data, probe and the loss's teacher "
                          "(default: the first run / the origin's run)")
    grid: list[int] = opt([21], "points per axis: N, or NX NY", ge=2, cli={"nargs": "+"})
    extent: list[float] | None = opt(None, "LO HI (both axes) or XLO XHI YLO YHI; affine: in units of λ "
                                     "(default 0 1, the paper's Fig. 5); orthogonal: in the units of --unit "
                                     "(default -0.5 1.5)", cli={"nargs": "+"})
    projection: str = opt("affine", "affine θ_T + λ1 v1 + λ2 v2, or orthogonal (distance- and angle-preserving)",
                          PROJECTIONS)
    unit: str = opt("longer", "orthogonal extents in units of max(|v1|, |v2|) (longer) or |v1| (first: with "
                    "--view shared and --extent -0.5 1.5 -1 1, the zoom on the teacher of Fig. 14/16)", UNITS)
    n_loss: int = opt(512, "distillation inputs on which the losses are measured", gt=0)
    no_probe: bool = opt(False, "skip the probe (loss, KL and norm only)")
    max_points: int | None = opt(None, "evaluate at most this many new points, then stop", gt=0)
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    out: str | None = opt(None, "output folder (default RUN/landscape-VIEW-PROJECTION)")


def cmd_landscape(args, extra) -> int:
    from ..analysis.landscape import compute_landscape, resolve_anchor, run_of, view_anchors
    from ..runs.checkpoint import load_state_dict
    from ..runs.rundir import run_lock
    from ..train.setup import resolve_device
    from ..train.supervised import run_info
    runs, quiet, o = args.runs, args.quiet, options_from_args(args, LandscapeOptions)
    if o.anchors and (o.view or runs):
        raise UserError("give either --view with run directories, or --anchors ORIGIN A1 A2, not both")
    if o.anchors:
        anchors = [resolve_anchor(a, default_role=r) for a, r in zip(o.anchors, ("teacher", "student", "student"))]
        ref = o.run or run_of(o.anchors[0])
    elif o.view:
        anchors = view_anchors(o.view, runs)
        ref = o.run or runs[0]
    else:
        raise UserError("which plane? `--view non-local RUN_ALPHA1`, `--view shared RUN_ALPHA0 RUN_ALPHA1`, "
                        "or `--anchors ORIGIN A1 A2`")
    if ref is None:
        raise UserError("the anchors are checkpoint files outside a run directory: name the run that gives the "
                        "architecture, loss and data with --run RUN_DIR")
    run = _with_overrides(run_info(ref), extra)
    if len(o.grid) not in (1, 2):
        raise UserError("--grid takes one number (N x N) or two (NX NY)")
    grid = o.grid[0] if len(o.grid) == 1 else tuple(o.grid)
    name = o.view or "anchors"
    out = Path(o.out) if o.out else Path(ref) / f"landscape-{name}-{o.projection}"
    with run_lock(ref):  # one writer per run folder (it writes RUN/landscape-* unless --out)
        result = compute_landscape(anchors, run, out, teacher=load_state_dict(ref, "teacher"), grid=grid,
                                   extent=o.extent, projection=o.projection, unit=o.unit, n_loss=o.n_loss,
                                   probe=not o.no_probe, limit=o.max_points,
                                   device=resolve_device(o.device, "--device"), progress=not quiet)
    print(f"landscape: {result['done']}/{result['total']} points in {out}" + ("" if result["complete"] else
          " (partial: run the same command again to continue)"))
    if result["complete"]:
        for (x, y), label in zip(result["anchors"], result["anchor_labels"]):
            print(f"  {label}: ({x:.4g}, {y:.4g})")
    return 0


def _with_overrides(run, extra: list[str]):
    """--probe.* and --data.root options on top of the run's saved config."""
    from ..config import parse_overrides
    from ..train.supervised import with_overrides
    return with_overrides(run, parse_overrides(extra))


# ------------------------------------------------------------------------------- supervised commands

@dataclass
class DataOptions:
    """The supervised commands' data and device options."""
    data: str | None = opt(None, "supervised data set (default: the run's data.name)")
    n_train: int | None = opt(None, "train on a class-stratified subset of this many images", ge=1)
    n_test: int | None = opt(None, "test on a class-stratified subset of this many images", ge=1)
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    out: str | None = opt(None, "output folder (default: a folder in RUN named by the command: finetune-START, imp or lmc)")


@dataclass
class FinetuneOptions:
    start: str = opt("student", START_HELP.split(";")[0])


@dataclass
class ImpOptions:
    start: list[str] = opt(["student@0", "random@0"], START_HELP, cli={"nargs": "+"})
    rounds: int = opt(PAPER_ROUNDS, "pruning rounds after the dense round 0 (24: RT Fig. 8's axis, to 0.47 % of "
                      "the weights at --fraction 0.2; 0: the dense round alone)", ge=0)
    fraction: float = opt(0.2, "fraction of the remaining weights pruned per round", gt=0, lt=1)
    prune_classifier: bool = opt(False, "rank the new classifier's weights too")


@dataclass
class LmcOptions:
    start: list[str] = opt(["teacher", "student"], START_HELP + " (teacher student: a random init and the "
                           "distilled student)", cli={"nargs": "+"})
    runs: int = opt(5, "supervised runs (data orders) per start, at least 2: a pair", ge=2)
    resolution: int = opt(11, "points on each path, ends included (3 at least: the barrier lies between the ends)",
                          ge=3)
    bn_batches: int = opt(8, "training batches for recomputing batch-norm statistics at each point (0: "
                          "interpolate them)", ge=0)


def _add_recipe_args(p: argparse.ArgumentParser, options) -> None:
    from ..train.supervised import Recipe
    p.add_argument("run", help="run directory: architecture, data set and the checkpoints to start from")
    add_flags(p.add_argument_group("supervised recipe (defaults: the paper's CIFAR-10 ResNet18 recipe)"), Recipe)
    add_flags(p.add_argument_group("data and device"), DataOptions)
    add_flags(p, options)


def _supervised_setup(args, extra):
    """(run, recipe, data, device, output folder or None) from a supervised command's flags."""
    from ..train.setup import resolve_device
    from ..train.supervised import Recipe, load_supervised_data, recipe_notes, run_info
    recipe, d = options_from_args(args, Recipe), options_from_args(args, DataOptions)
    run = _with_overrides(run_info(args.run), extra)
    data = load_supervised_data(run.cfg, run.image_size, name=d.data, n_train=d.n_train, n_test=d.n_test)
    for line in recipe_notes(recipe, data, d.n_train, d.n_test):
        print(line, file=sys.stderr)
    return run, recipe, data, resolve_device(d.device, "--device"), d.out and Path(d.out)


def _holding_run_lock(cmd):
    """The command holds the lock of RUN (args.run): it writes into the run folder unless --out says elsewhere."""
    @functools.wraps(cmd)
    def locked(args, extra) -> int:
        from ..runs.rundir import run_lock
        with run_lock(args.run):
            return cmd(args, extra)
    return locked


@_holding_run_lock
def cmd_finetune(args, extra) -> int:
    from ..runs.checkpoint import save_checkpoint
    from ..runs.rundir import write_json
    from ..train.supervised import build_classifier, label_of, parse_start, provenance, state_of, train_supervised
    start = options_from_args(args, FinetuneOptions).start
    run, recipe, data, device, out = _supervised_setup(args, extra)
    source, l_epochs = parse_start(start)
    if l_epochs:
        raise UserError("finetune trains from a start as it is; '@L' rewinding points belong to `randteach imp/lmc`")
    out = out or run.path / f"finetune-{label_of(start)}"
    identity = _finetune_identity(run, source, provenance(run, data, recipe))
    summary = _earlier_finetune(out / "finetune.json", identity)
    if summary is not None:
        print(f"finetune {start}: trained before with these settings, read from {out / 'finetune.json'}")
    else:
        model = build_classifier(run, source, data.num_classes, recipe.seed)
        result = train_supervised(model, data, recipe, device, progress=not args.quiet, desc=f"finetune {start}")
        save_checkpoint({"model": state_of(model), "role": "supervised", "start": start}, out / "model.pt")
        summary = {**provenance(run, data, recipe), "start": start, "identity": identity,
                   **{k: v for k, v in result.items() if k != "snapshots"}}
        write_json(out / "finetune.json", summary)
    print(f"finetune {start}: test accuracy {100 * summary['test_accuracy']:.2f}% after "
          f"{recipe.epochs:g} epochs; {out}")
    return 0


def _finetune_identity(run, source: str, provenance: dict) -> dict:
    """What a finetune is read back under: its data and recipe, the run folder resolved (named relative or
    absolute, from any folder), and the start by the bytes of its checkpoint (one rewritten since, or the
    run's student trained again, is another start)."""
    from ..files import file_digest
    from ..runs.checkpoint import resolve_model_checkpoint
    from ..train.supervised import RUN_ROLES
    named = source in (*RUN_ROLES, "random", "encoder")
    weights = resolve_model_checkpoint(run.path, source) if source in RUN_ROLES else None if named else Path(source)
    return {**provenance, "run": provenance["run"] and str(Path(provenance["run"]).resolve()),
            "start": source if named else str(Path(source).resolve()),
            "start_sha256": file_digest(weights, "sha256") if weights is not None and weights.is_file() else None}


def _earlier_finetune(path: Path, identity: dict) -> dict | None:
    """The finetune already in `path` under the same identity (it is read, not trained again); one under
    another is refused rather than replaced. A finetune.json from before identities were recorded, or a
    damaged one, is trained again."""
    from ..runs.rundir import changed_settings
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(before, dict) and isinstance(before.get("identity"), dict)
            and isinstance(before.get("test_accuracy"), (int, float)) and (path.parent / "model.pt").is_file()):
        return None
    now = json.loads(json.dumps(identity))  # as the file holds it (tuples as lists)
    if before["identity"] == now:
        return before
    raise UserError(f"{path.parent} holds a finetune made with other settings "
                    f"({changed_settings(before['identity'], now)}); choose another --out, or delete {path} to "
                    "train it again")


@_holding_run_lock
def cmd_imp(args, extra) -> int:
    from ..analysis.imp import run_imp
    o = options_from_args(args, ImpOptions)
    run, recipe, data, device, out = _supervised_setup(args, extra)
    out = out or run.path / "imp"
    result = run_imp(run, o.start, data, recipe, device, rounds=o.rounds, out=out, fraction=o.fraction,
                     prune_classifier=o.prune_classifier, progress=not args.quiet)
    print(f"IMP on {result['data']}: test accuracy per round ({out / 'imp.json'})")
    for s in result["series"]:
        cells = " ".join(f"{100 * (1 - r['sparsity']):.3g}%:{100 * r['test_accuracy']:.1f}" for r in s["rounds"])
        print(f"  {s['start']}: {cells}")
    return 0


@_holding_run_lock
def cmd_lmc(args, extra) -> int:
    from ..analysis.lmc import barrier_text, run_lmc
    o = options_from_args(args, LmcOptions)
    run, recipe, data, device, out = _supervised_setup(args, extra)
    out = out or run.path / "lmc"
    result = run_lmc(run, o.start, data, recipe, device, out=out, runs=o.runs, resolution=o.resolution,
                     bn_batches=o.bn_batches, progress=not args.quiet)
    print(f"linear mode connectivity on {result['data']} ({out / 'lmc.json'}):")
    for s in result["series"]:
        print(f"  from {s['start']}: {barrier_text(s, 2)} (max {100 * s['barrier_max']:.2f} pp) over "
              f"{counted(len(s['pairs']), 'pair')}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "landscape", help="loss / probe / embedding-KL landscape on a plane through three parameter vectors (Fig. 5)",
        description="Evaluate the teacher-student loss, the probe accuracy, the encoder-embedding KL and ||theta|| "
                    "on a grid over the plane through three parameter vectors; writes landscape.npz and contour "
                    "plots. Resumable: run the same command again to continue a stopped grid. --probe.KEY VALUE "
                    "changes the probe (e.g. --probe.n_train 1000).")
    p.add_argument("runs", nargs="*", help="run directories of --view: non-local: the init.alpha=1 run; "
                                           "shared: the alpha~0 run, then the alpha=1 run (same teacher)")
    add_flags(p, LandscapeOptions)
    p.set_defaults(func=cmd_landscape)

    p = sub.add_parser("finetune", help="supervised training of a run's encoder + a new linear classifier",
                       description="Train an encoder (a run's student, teacher, student init, a random init or a "
                                   "checkpoint) with a new linear classifier, supervised; writes finetune.json "
                                   "and model.pt into --out (default RUN/finetune-START). A finetune already "
                                   "there with the same settings is read, not trained again; one with other "
                                   "settings is refused.")
    _add_recipe_args(p, FinetuneOptions)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("imp", help="iterative magnitude pruning with rewinding: lottery tickets (Fig. 8)",
                       description="Prune 20 % of the remaining encoder conv/linear weights per round by global "
                                   "magnitude, rewind and retrain; writes imp.json and imp.png.")
    _add_recipe_args(p, ImpOptions)
    p.set_defaults(func=cmd_imp)

    p = sub.add_parser("lmc", help="linear mode connectivity of supervised runs from one start (Fig. 9)",
                       description="From each start, train several supervised runs with different data orders "
                                   "and measure the test error along the linear path between every pair; "
                                   "writes lmc.json and lmc.png.")
    _add_recipe_args(p, LmcOptions)
    p.set_defaults(func=cmd_lmc)
