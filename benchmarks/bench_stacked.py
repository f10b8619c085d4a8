"""Stacked runs (`randteach sweep --stack K`): aggregate training steps/s of K runs trained stacked in one
process against the same K runs trained one at a time, and how far each stacked student ends from its
solo twin. Writes (or replaces) the section of --out (default benchmarks/RESULTS.md) that its heading names:
"Stacked runs", with the workload, stack mode, thread count and device where they are not the defaults.

The runs differ in train.seed (so in teacher, student init and data order), as the seeds of a sweep do.
Step time is read from each run's own metrics.jsonl (its `time` column), after `--warmup` untimed steps,
so the loop's logging, gradient norms and distances are included and start-up is not. Rounds alternate
the order (solo, stacked | stacked, solo) so that a load drifting over the run weighs on both alike; the
load average is noted with every measurement (the development machine is shared).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_stacked.py            # ~3 min, 2 cores
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_stacked.py --tiny --out /tmp/R.md
    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/bench_stacked.py --mode threads   # side by side

`--mode` is the stack mode (`randteach sweep --stack-mode`): vmap (the default here: one model of K runs) or
threads (each run by the solo loop, side by side on threads of their share of the torch threads).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import bench_machine
from randteach.config import build_config
from randteach.runs.checkpoint import load_state_dict
from randteach.runs.rundir import RunDir
from randteach.train.loop import distill
from randteach.train.stacked import STACK_MODES, stack_mode, train_stacked

HERE = Path(__file__).resolve().parent
SECTION = "## Stacked runs"
MODES = {"vmap": "one model of K runs under torch.func.vmap",
         "threads": "each run its own solo step, the runs side by side on threads of their share of the torch threads"}
# Small encoders on Fashion-MNIST with a small DINO head: the sweeps where per-operation overhead, not
# arithmetic, bounds a CPU step. ResNet20 with its batch norm (the papers' ResNet20).
WORKLOADS = {
    "convnet": {"model.encoder": "convnet", "model.width": "16"},
    "resnet20": {"model.encoder": "resnet20"},
}
COMMON = {"data.name": "fashion-mnist", "data.n_samples": "2048", "head.hidden_dims": "[256]",
          "head.bottleneck_dim": "64", "head.out_dim": "1024", "init.alpha": "0.5", "train.batch_size": "64",
          "train.epochs": "1000", "train.precision": "fp32", "train.teacher_cache": "false",
          "train.probe_every": "0", "train.checkpoint_every": "0", "probe.which": "[]",
          "train.device": "cpu"}
TINY = {"data.name": "digits", "data.n_samples": "256", "model.width": "8", "head.hidden_dims": "[64]",
        "head.bottleneck_dim": "16", "head.out_dim": "64"}


def configs(workload: dict, k: int, steps: int, root: Path, tag: str):
    return [build_config("cpu", None, {**COMMON, **workload, "train.max_steps": str(steps), "train.seed": str(s),
                                       "out": str(root / f"{tag}-{s}")}) for s in range(k)]


def step_seconds(cfg, warmup: int) -> float:
    """Mean wall seconds per step after `warmup` steps, from the run's own metrics: between the record of step
    `warmup` and the last (each written after the loop reads the step's metrics to the host, so after the
    device's work; `--log-every` must divide `warmup` and the steps)."""
    t = {r["step"]: r["time"] for r in RunDir(cfg.run_dir()).records() if "time" in r and "step" in r}
    last = max(t)
    return (t[last] - t[warmup]) / (last - warmup)


def measure(workload: dict, k: int, steps: int, warmup: int, root: Path, stacked: bool, mode: str) -> dict:
    tag = f"{'stack' if stacked else 'solo'}{k}-{time.monotonic_ns()}"
    cfgs = configs(workload, k, steps, root, tag)
    load = bench_machine.load_average()[0]
    if stacked:
        train_stacked(cfgs, mode=mode)
        # A vmap stack's step advances all K runs; side by side, min(threads, K) runs step at once (K is a
        # multiple of it here, so every run trains beside as many others)
        at_once = k if stack_mode(cfgs[0], mode) == "vmap" else min(torch.get_num_threads(), k)
        rate = at_once / statistics.mean(step_seconds(c, warmup) for c in cfgs)
    else:
        for cfg in cfgs:
            distill(cfg, progress=False)
        rate = 1 / statistics.mean(step_seconds(c, warmup) for c in cfgs)
    return {"k": k, "stacked": stacked, "steps_per_s": rate, "load": load, "dirs": [c.run_dir() for c in cfgs]}


def relative_difference(a: Path, b: Path) -> float:
    sa, sb = load_state_dict(a), load_state_dict(b)
    diff = torch.cat([(sa[n] - sb[n]).flatten() for n in sa]).norm()
    return float(diff / torch.cat([sa[n].flatten() for n in sa]).norm())


def thread_spread(workload: dict, steps: int, root: Path, solo_dir: Path) -> float:
    """Relative difference between a solo run (train.seed 0) and the same run with one more torch thread:
    how far the arithmetic alone moves this run's student, the scale against which to read a stacked
    run's difference from its solo twin."""
    threads = torch.get_num_threads()
    cfg = configs(workload, 1, steps, root, f"threads-{time.monotonic_ns()}")[0]
    torch.set_num_threads(threads + 1)
    try:
        distill(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    return relative_difference(solo_dir, Path(cfg.run_dir()))


def run(args, write) -> list[dict]:
    """The table's rows; `write(rows)` after each, so a run cut short (a GPU session's time limit) keeps
    what it measured."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in args.encoders:
            workload = {**WORKLOADS[name], **(TINY if args.tiny else {}), "train.device": args.device,
                        "train.log_every": str(args.log_every)}
            for k in args.k:
                # One-at-a-time runs cost the same for any K: time min(K, solo_runs) of them.
                solo_k = min(k, args.solo_runs)
                rounds = []
                for r in range(args.rounds):
                    order = [False, True] if r % 2 == 0 else [True, False]
                    got = {s: measure(workload, solo_k if not s else k, args.steps, args.warmup, root, s, args.mode)
                           for s in order}
                    rounds.append(got)
                solo = statistics.mean(g[False]["steps_per_s"] for g in rounds)
                stack = statistics.mean(g[True]["steps_per_s"] for g in rounds)
                diffs = [relative_difference(a, b) for a, b in zip(rounds[0][False]["dirs"], rounds[0][True]["dirs"])]
                rows.append({"encoder": name, "k": k, "solo": solo, "stacked": stack, "ratio": stack / solo,
                             "solo_rounds": [g[False]["steps_per_s"] for g in rounds],
                             "stacked_rounds": [g[True]["steps_per_s"] for g in rounds],
                             "loads": [g[s]["load"] for g in rounds for s in (False, True)],
                             "max_rel_diff": max(diffs), "compared": len(diffs)})
                print(json.dumps(rows[-1]), flush=True)
                write(rows)
            spread = (thread_spread(workload, args.steps, root, rounds[0][False]["dirs"][0])
                      if args.device == "cpu" else None)  # a GPU's arithmetic does not follow the thread count
            for r in rows:
                if r["encoder"] == name:
                    r["thread_spread"] = spread
            write(rows)
    return rows


def markdown(rows: list[dict], args, started: float, machine: dict) -> str:
    cmd = (f"OMP_NUM_THREADS={torch.get_num_threads()} PYTHONPATH=src .venv/bin/python benchmarks/bench_stacked.py "
           + shlex.join(args.argv))
    w = {**COMMON, **(TINY if args.tiny else {})}
    mode = stack_mode(configs({"train.device": args.device}, 1, 1, Path("."), "mode")[0], args.mode)
    lines = [heading(args), "",
             f"- command: `{cmd.strip()}`",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}; wall time "
             f"{(time.time() - started) / 60:.1f} min",
             f"- code: commit {machine['code']}",
             f"- machine: {machine['cpu']}, {machine['cores']} cores, torch {torch.__version__} with "
             f"{torch.get_num_threads()} thread(s), host `{machine['host']}` (shared: load averages below)"
             + (f"; device {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
             f"- workload: {w['data.name']} ({w['data.n_samples']} images), batch {w['train.batch_size']}, DINO head "
             f"{w['head.hidden_dims']} → {w['head.bottleneck_dim']} → {w['head.out_dim']}, CE, AdamW, alpha 0.5, fp32; "
             "convnet width " + ("8" if args.tiny else "16") + ", ResNet20 (batch norm); runs differ in "
             f"train.seed; {args.warmup} warm-up + {args.steps - args.warmup} timed steps per run, metrics read every "
             f"{args.log_every} step(s), {args.rounds} "
             "rounds in alternating order",
             f"- stack mode: {mode} (" + MODES[mode] + ")",
             "- steps/s: aggregate optimizer steps per wall second over all K runs (vmap: K / s per stacked "
             "step; threads: min(threads, K) / mean s per step of the K runs, as that many step at once; one at "
             f"a time: 1 / mean s per step over min(K, {args.solo_runs}) solo runs)",
             "- max rel. diff: max over the compared runs of ||θ_stacked − θ_solo|| / ||θ_solo|| of the final "
             "students (the same run trained stacked and alone; side by side each stacked run has its lane's "
             "share of the threads, its solo twin all of them); one run, one more thread: the same between "
             "the seed-0 run alone and that run with one torch thread more (how far the arithmetic alone moves it)", "",
             "| encoder | K | one at a time, steps/s (rounds) | stacked, steps/s (rounds) | stacked × one at a time "
             "| max rel. diff (runs) | one run, one more thread | load avg during (1 min) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['encoder']} | {r['k']} | {r['solo']:.2f} ({', '.join(f'{v:.2f}' for v in r['solo_rounds'])}) "
                     f"| {r['stacked']:.2f} ({', '.join(f'{v:.2f}' for v in r['stacked_rounds'])}) | **{r['ratio']:.2f}×** "
                     f"| {r['max_rel_diff']:.1e} ({r['compared']}) | {_spread(r)} | "
                     f"{', '.join(f'{v:.1f}' for v in r['loads'])} |")
    return "\n".join(lines) + "\n"


def heading(args) -> str:
    """The section's heading: one section per stack mode, thread count, workload and device."""
    where = "" if args.device == "cpu" else f", {args.device}"
    mode = "" if args.mode == "vmap" else f", --stack-mode {args.mode}"
    threads = "" if torch.get_num_threads() == 1 else f", {torch.get_num_threads()} torch threads"
    return SECTION + (", tiny workload (digits)" if args.tiny else "") + mode + threads + where


def _spread(row: dict) -> str:
    return "-" if row.get("thread_spread") is None else f"{row['thread_spread']:.1e}"


def upsert_section(path: Path, text: str) -> None:
    """Replace the section of `path` whose heading is the first line of `text` (up to the next '## '
    heading), or append it."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    heading = text.splitlines()[0]
    start = old.find("\n" + heading + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(heading) + 1)
        new = old[:start + 1] + text + (old[end:] if end >= 0 else "")
    path.write_text(new)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", type=lambda s: s.split(","), default=["convnet", "resnet20"])
    p.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--steps", type=int, default=6, help="steps per run (the first --warmup are not timed)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--log-every", type=int, default=1, help="train.log_every of every run: a stack of K runs reads "
                   "K runs' metrics to the host per record, a run alone one (a sweep's default is 20); must divide "
                   "--warmup and --steps")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--solo-runs", type=int, default=2, help="one-at-a-time runs timed per K (their cost does not "
                   "depend on K)")
    p.add_argument("--tiny", action="store_true", help="digits, width 8, a 64-wide head (the overhead-bound case; ~2-3 min)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (each step's time is read after the loop's "
                   "per-step host read, so it includes the device's work)")
    p.add_argument("--mode", default="vmap", choices=STACK_MODES,
                   help="the stack mode (randteach sweep --stack-mode; default: vmap, one model of K runs)")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)
    if args.warmup % args.log_every or args.steps % args.log_every or args.steps <= args.warmup:
        p.error("--log-every must divide --warmup and --steps, and --steps must exceed --warmup")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.time()
    info = bench_machine.describe(onednn=False)
    machine = {"cpu": info.get("cpu", bench_machine.cpu_model()), "cores": info.get("cores", os.cpu_count()),
               "host": info.get("host", ""), "code": bench_machine.code_version()}
    run(args, lambda rows: upsert_section(Path(args.out), markdown(rows, args, started, machine)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
