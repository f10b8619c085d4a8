"""The experiment runner: recipe -> runs (content-addressed, reused) -> analysis -> report.md.

An `Experiment` names the paper's claim, lists its runs as stages of {arm: [Config]} (a later stage may
depend on an earlier one's run directories, e.g. restarting), runs them with `randteach.runs.sweep.run_sweep`
(local worker processes or SLURM; finished runs are skipped, interrupted ones resumed) and turns them
into `<out>/<experiment>/report.md` with CSV and PNG files. All runs of a scale live in `<out>/runs`.
"""
from __future__ import annotations

import datetime
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import Config, ConfigError, build_config, flatten
from ..errors import UserError
from ..reports.experiment import arm_section, rows_of
from ..reports.groups import flat_config, show_value
from ..runs.rundir import RunDir
from ..runs.sweep import plan_local, plan_slurm, run_one, run_state, run_sweep
from ..text import counted
from .protocol import with_paper_protocol
from .recipe import Arm, Recipe

DEFAULT_ROOT = "runs/experiments"


@dataclass
class Context:
    """One invocation of an experiment: its recipe and where and how its runs go."""
    recipe: Recipe
    root: Path                                              # <root>/runs: run dirs; <root>/<experiment>: report
    overrides: dict = field(default_factory=dict)           # command-line config overrides for every run
    launcher: str = "local"
    workers: int | None = None                              # None: one per visible GPU, else 1 (run_sweep)
    progress: bool = True
    command: str = ""
    stack: int = 1                                          # > 1: stackable runs trained that many at a time
    stack_mode: str = "auto"                                # how (train.stacked.stack_mode)

    @property
    def pool(self) -> Path:
        return self.root / "runs"

    @property
    def out(self) -> Path:
        return self.root / self.recipe.experiment

    @property
    def params(self) -> dict:
        return self.recipe.params

    def configs(self, arm: str, extra: dict | None = None) -> list[Config]:
        return self.recipe.configs(self.recipe.arm(arm), self.pool, self.overrides, extra)

    def plan(self, configs: list[Config]) -> list[str]:
        """What `run` says before it starts these runs (how they are grouped into workers and stacks, or what
        goes to SLURM), for --dry-run; nothing for in-process runs."""
        if not configs or (self.launcher == "local" and self.workers == 0):
            return []
        if self.launcher != "local":
            return [plan_slurm(configs, self.recipe.slurm)]
        return plan_local(configs, self.workers, self.stack, self.stack_mode).lines

    def run(self, configs: list[Config]) -> list[dict]:
        """Every config's summary (with "run_dir"); workers = 0 runs them one by one in this process."""
        if self.launcher == "local" and self.workers == 0:
            if self.stack > 1:
                raise UserError("--stack trains its stacks in worker processes; drop --workers 0 (or --stack)")
            return [{**run_one(c, progress=self.progress), "run_dir": str(c.run_dir())} for c in configs]
        if not configs:
            return []
        return run_sweep(configs, launcher=self.launcher, workers=self.workers, progress=self.progress,
                         slurm=self.recipe.slurm, stack=self.stack, stack_mode=self.stack_mode)


class Experiment:
    """Subclasses set the class attributes and override `stages`, `analyze` or `post` where the default
    (every arm of the recipe, one table per arm) is not the paper's protocol."""
    name = ""
    ids = ""        # the experiment's row in docs/PAPERS.md, e.g. "E3"
    paper = ""      # where in the paper, e.g. "Fig. 3, App. D"
    claim = ""      # the paper's claim, one sentence
    extras = None   # per-run extra metrics for the tables: row -> {name: value}
    sets: tuple[str, ...] = ()  # config keys the analysis sets on every run it derives (from its recipe's params)

    def stages(self, ctx: Context) -> list[dict[str, list[Config]]]:
        return [{arm.name: ctx.configs(arm.name) for arm in ctx.recipe.arms}]

    def post(self, ctx: Context) -> list[str]:
        """What happens after the runs besides tables (for --dry-run)."""
        return []

    def own_runs(self, ctx: Context) -> list[Path]:
        """Run directories the analysis distills itself (outside `stages`); the report header counts them."""
        return []

    def analyze(self, ctx: Context, arms: dict[str, list[Config]]) -> list[str]:
        lines = []
        for arm in ctx.recipe.arms:
            rows = with_paper_protocol(rows_of(arms[arm.name]), ctx.params.get("paper_protocol"),
                                       progress=ctx.progress)
            section, _ = arm_section(f"{arm.name}", rows, arm.keys(), ctx.out, arm.name,
                                     references=ctx.recipe.reference, extras=self.extras)
            lines += section
        return lines


def git_commit() -> str:
    """HEAD of the checkout randteach runs from (with '+changes' when its tracked files differ), or 'unknown'."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def dry_run(exp: Experiment, ctx: Context) -> str:
    """The runs the experiment needs, each with its state (done, new, interrupted, failed ...)."""
    check_overrides(exp, ctx)
    stages = exp.stages(ctx)
    total = sum(len(c) for stage in stages for c in stage.values())
    done = sum(run_state(c) == "done" for stage in stages for cs in stage.values() for c in cs)
    lines = [f"experiment {exp.name} ({exp.ids}, {exp.paper}) at scale {ctx.recipe.scale}: recipe "
             f"{ctx.recipe.source}; {counted(total, 'run')} in {ctx.pool} ({done} done, {total - done} to run)",
             *grid_notes(ctx)]
    for i, stage in enumerate(stages):
        for arm, configs in stage.items():
            keys = _shown_keys(ctx.recipe, arm, configs)
            stage_name = f"stage {i + 1}, " if len(stages) > 1 else ""
            lines.append(f"  {stage_name}arm {arm} ({counted(len(configs), 'run')}):")
            for cfg in configs:
                flat = flat_config(cfg.to_dict())
                lines.append(f"    {run_state(cfg):<11} {cfg.run_dir()}  "
                             + " ".join(f"{k}={show_value(flat.get(k))}" for k in keys))
        lines += [f"  {line}" for line in ctx.plan(_unique(stage))]
    lines += [f"  then: {p}" for p in exp.post(ctx)]
    lines += _readiness_notes(ctx, [c for stage in stages for cs in stage.values() for c in cs] or seed_bases(ctx))
    lines.append(f"report: {ctx.out / 'report.md'}")
    return "\n".join(lines)


def _readiness_notes(ctx: Context, configs: list[Config]) -> list[str]:
    """What would stop or slow the runs on this machine: data not on disk; a paper-scale recipe without a GPU."""
    from ..data.registry import missing_data_notes
    import torch
    notes = missing_data_notes(configs)
    if ctx.recipe.scale == "paper" and not torch.cuda.is_available():
        notes.append("note: no GPU here: the paper-scale runs would train on this machine's CPU")
    return notes


def _unique(stage: dict[str, list[Config]]) -> list[Config]:
    """The runs of these arms (a stage, or every arm of the analysis), each once (arms may share runs)."""
    return list({str(c.run_dir()): c for cs in stage.values() for c in cs}.values())


def check_overrides(exp: Experiment, ctx: Context) -> None:
    """Refuse a command-line key that every run of the analysis would overrule without a word."""
    overruled = sorted(set(ctx.overrides) & set(exp.sets))
    if overruled:
        raise UserError(f"--{overruled[0]}: the {exp.name} experiment sets it on each of its runs from its recipe's "
                        f"params ({', '.join(f'{k}={show_value(v)}' for k, v in ctx.params.items()) or 'none'}); "
                        f"change those in a copy of {ctx.recipe.source} given as --recipe FILE")


def grid_notes(ctx: Context) -> list[str]:
    """A note for each command-line key that replaces an arm's grid over it with its one value."""
    return [f"note: --{key} {show_value(ctx.overrides[key])} replaces arm {arm.name}'s grid over {key} "
            f"({', '.join(show_value(v) for v in arm.grid[key])}) with that one value"
            for arm in ctx.recipe.arms for key in arm.grid if key in ctx.overrides]


def _shown_keys(recipe: Recipe, arm: str, configs: list[Config]) -> list[str]:
    keys = [a.keys() for a in recipe.arms if a.name == arm]
    keys = keys[0] if keys else []
    flats = [flat_config(c.to_dict()) for c in configs]
    varying = [k for k in (flats[0] if flats else {}) if len({f.get(k) for f in flats}) > 1 and k != "out"]
    return list(dict.fromkeys(keys + [k for k in varying if k != "train.seed"] + ["train.seed"]))


@dataclass
class Outcome:
    report: Path
    counts: dict[str, int]          # run statuses of this invocation (completed, diverged, failed, pending, ...)

    @property
    def finished(self) -> bool:
        return not any(self.counts.get(s) for s in ("failed", "pending", "interrupted"))


def execute(exp: Experiment, ctx: Context) -> Outcome:
    """Run every stage (skipping finished runs), analyze, and write OUT/report.md."""
    check_overrides(exp, ctx)
    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc)
    notes = grid_notes(ctx)
    for note in notes:
        print(note, file=sys.stderr)
    commit = git_commit()  # at the start: the code the runs started with
    arms: dict[str, list[Config]] = {}
    counts: dict[str, int] = {}
    reused = 0
    for stage in exp.stages(ctx):
        configs = _unique(stage)
        reused += sum(run_state(c) == "done" for c in configs)
        results = ctx.run(configs)
        for r in results:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        arms.update(stage)
        if any(r["status"] in ("pending", "interrupted") for r in results):
            break  # stopped: the later stages would start from unfinished runs
    ctx.out.mkdir(parents=True, exist_ok=True)
    before = {p: (p / "summary.json").exists() for p in exp.own_runs(ctx)}
    body = exp.analyze(ctx, arms)
    # a run shared by several arms (head ablations' default) is counted once, like its training
    summaries = [RunDir(c.run_dir()).summary() for c in _unique(arms)
                 if (c.run_dir() / "summary.json").exists()]
    for p, existed in before.items():
        own = RunDir(p).summary() if (p / "summary.json").exists() else None
        if own:
            summaries.append(own)
            counts[own.get("status", "unknown")] = counts.get(own.get("status", "unknown"), 0) + 1
            reused += existed
    compute = sum(float((s or {}).get("wall_time_s") or 0) for s in summaries)
    wall = time.perf_counter() - t0
    header = [f"# {exp.ids} · {exp.name} — scale {ctx.recipe.scale}", "",
              f"Paper ({exp.paper}): {exp.claim}", "",
              f"- command: `{ctx.command or f'randteach experiment {exp.name} --scale {ctx.recipe.scale}'}`",
              f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}; git commit: {commit}",
              f"- wall time of this invocation: {wall:.0f} s; distillation time in its runs (reused ones included): "
              f"{compute:.0f} s",
              _runs_line(ctx, counts, reused, own=bool(before)),
              f"- recipe: `{ctx.recipe.source}`, seeds {ctx.recipe.seeds}; table cells are mean ± std over the "
              "completed seeds (sample std, n − 1); probe accuracies are test accuracies in %; "
              "student − teacher is the paired difference per seed.",
              *[f"- {note}" for note in notes], "",
              *(_settings_block(ctx, exp) if counts else [])]
    path = ctx.out / "report.md"
    path.write_text("\n".join(header + body) + "\n")
    return Outcome(path, counts)


def _runs_line(ctx: Context, counts: dict[str, int], reused: int, own: bool) -> str:
    """The report header's count of runs by status, and where they are."""
    if not counts:
        return ("- runs: none of its own (it analyses runs another experiment trained; their settings are in that "
                "experiment's report)")
    return ("- runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            + f" ({reused} of them finished before this invocation and reused); run directories in `{ctx.pool}`"
            + (f", the analysis's own runs in `{ctx.out}`" if own else ""))


def _settings_block(ctx: Context, exp: Experiment) -> list[str]:
    """The report's "Settings shared by every run" block."""
    return ["Settings shared by every run (on top of "
            + (f"preset `{ctx.recipe.preset}`" if ctx.recipe.preset else "randteach's defaults")
            + (f"; the analysis sets {', '.join(exp.sets)} on each run itself" if exp.sets else "") + "):",
            "", "```yaml", yaml.safe_dump(_shared_settings(ctx, exp.sets), sort_keys=False).rstrip(), "```", ""]


def _shared_settings(ctx: Context, set_by_analysis: tuple[str, ...] = ()) -> dict:
    """The recipe's base keys and the command line's overrides with the values the runs have: an override
    arrives as text ('1000'), the runs' config holds its typed value (1000.0). Keys the analysis sets on each
    of its runs are left out: the base's value of them is not the runs'."""
    shared = {k: v for k, v in {**ctx.recipe.base, **ctx.overrides}.items() if k not in set_by_analysis}
    try:
        resolved = flatten(build_config(ctx.recipe.preset, None, shared).to_dict())
    except ConfigError:  # a value only valid beside an arm's keys: shown as given
        return shared
    return {key: resolved.get(key, value) for key, value in shared.items()}


# ----------------------------------------------------------------- helpers of the analysis experiments

def analysis_device(ctx: Context):
    """The device an analysis runs on in this process: train.device, else params.device, else auto."""
    from ..train.setup import resolve_device
    return resolve_device(str(ctx.overrides.get("train.device", ctx.params.get("device", "auto"))))


def completed(configs: list[Config]) -> list[Config]:
    """The configs whose runs completed (an analysis covers those)."""
    from ..runs.sweep import finished_summary
    return [c for c in configs if (finished_summary(c) or {}).get("status") == "completed"]


def missing_note(arms: dict, names: list[str]) -> list[str]:
    """A report note on the distillation runs of `names` that are not completed; [] if none."""
    total = sum(len(arms.get(a, [])) for a in names)
    done = sum(len(completed(arms.get(a, []))) for a in names)
    return [] if done == total else [f"_{total - done} of {total} distillation runs are not completed; "
                                     "the analysis covers the completed ones (run the command again to finish)._", ""]


def markdown_rows(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table of `head` and `rows` (cells already formatted), then a blank line."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def supervised_inputs(ctx: Context, cfg: Config):
    """The finished run of `cfg`, its supervised data and recipe (`params`), for IMP and LMC."""
    from ..train.supervised import Recipe, load_supervised_data, run_info
    p = ctx.params
    info = run_info(cfg.run_dir())
    data = load_supervised_data(info.cfg, info.image_size, name=p.get("data"), n_train=p.get("n_train"),
                                n_test=p.get("n_test"))
    return info, data, Recipe(**(p.get("recipe") or {}))


def known_params(ctx: Context, valid: tuple[str, ...]) -> dict:
    """The recipe's params, every one of them a keyword of the analysis (`device` aside)."""
    unknown = sorted(set(ctx.params) - set(valid) - {"device"})
    if unknown:
        raise UserError(f"recipe {ctx.recipe.source}: unknown {ctx.recipe.experiment} params {', '.join(unknown)}; "
                        f"valid: {', '.join(valid)}")
    return {k: v for k, v in ctx.params.items() if k in valid}


def seed_bases(ctx: Context) -> list[Config]:
    """One base config per seed: the recipe's base (and its one arm, if any); the analysis derives its runs."""
    arm = ctx.recipe.arms[0] if ctx.recipe.arms else Arm("base")
    return ctx.recipe.configs(arm, ctx.out / "base", ctx.overrides)
