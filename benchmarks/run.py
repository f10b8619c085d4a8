"""`make bench`: our distillation step against a plain fp32 loop with each optimization on and off, probe
times, landscape points per second, peak memory and the step's achieved FLOP/s against a bf16 matmul
measured in the same run; writes benchmarks/RESULTS.md.

Absolute numbers move with the machine and its load (the development machine is shared); the figures that
carry are ratios taken in one run. Distillation measurements run in rounds, every other round in reverse
order (plain, v1 ... vn | vn ... v1, plain), so a load that drifts linearly over the run weighs on every
variant alike once the rounds are averaged.

    .venv/bin/python benchmarks/run.py                      # the papers' VGG11 setting, about 10-15 min on 2 cores
    .venv/bin/python benchmarks/run.py --rounds 4 --steps 3 # tighter numbers, longer
    .venv/bin/python benchmarks/run.py --tiny --out /tmp/R.md  # tiny model on digits, seconds (smoke test)
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

import bench_analysis
import bench_distill
import bench_machine
import bench_report
from bench_distill import BASELINES, PLAIN, VARIANTS, Workload

HERE = Path(__file__).resolve().parent
TINY = Workload(encoder="convnet", width=8, data="digits", n_samples=256, batch=64, hidden_dims=[64],
                bottleneck_dim=16, out_dim=64, warmup=1, steps=1)
# `make demo`'s step (the cpu preset): convnet width 16, head 512-512 -> 256 -> 4096, batch 64, Fashion-MNIST
DEMO = Workload(encoder="convnet", width=16, batch=64, hidden_dims=[512, 512], bottleneck_dim=256, out_dim=4096,
                warmup=10, steps=20)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="palindromic rounds of the distillation measurements")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 2; --workload demo: "
                   f"{DEMO.steps})")
    p.add_argument("--variants", help=f"comma list of {', '.join(VARIANTS)} (default: all that run on the device; "
                   "graphs needs a GPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared, oversubscribed machine two OpenMP threads "
                        "spend ~1.5x the CPU seconds of one on the same step, and vary 5x more; use the "
                        "core count on an idle machine)")
    p.add_argument("--probe-reps", type=int, default=2, help="repetitions of each probe")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"), help="where to write the results")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where both loops, the probes and the matmul "
                   "yardstick run (on a GPU the verdicts use the wall clock)")
    p.add_argument("--encoder", default=Workload.encoder, help="encoder of the workload, or a comma list "
                   "(e.g. vgg11,resnet18): one distillation table per encoder, all in this one run")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per measurement (default 1 on the "
                   "CPU, 3 on a GPU, where compilation and cuDNN autotuning take the first steps; --workload demo: "
                   f"{DEMO.warmup})")
    p.add_argument("--workload", choices=("paper", "demo"), default="paper",
                   help="paper: VGG11 with the paper's head at batch 256 (--encoder picks others); demo: the step "
                        "of `make demo` (convnet width 16, batch 64), where the CPU path's choices show")
    p.add_argument("--distill-only", action="store_true", help="skip the probe and landscape sections")
    p.add_argument("--tiny", action="store_true", help="tiny model and data, one thread, in-process, no "
                   "compile: checks the harness in seconds (the numbers mean nothing)")
    return p.parse_args(argv)


def _link_data_sets(root: Path) -> None:
    """The benchmark's data root is a fresh folder (its teacher cache must start empty): link the user's
    data sets into it, so a data set that lives only in the data root ($RANDTEACH_DATA) is found."""
    from randteach.data import resolve_root
    user = resolve_root(None)
    if user.is_dir():
        for entry in user.iterdir():
            if entry.name != "teacher-targets":
                (root / entry.name).symlink_to(entry.resolve())


def run_distill(w: Workload, variants: list[str], rounds: int, root: Path, isolate: bool) -> tuple[list, dict]:
    """The rounds, and {variant: error} of the variants whose worker failed: those are left out of every
    round and the others go on (a GPU session cannot afford to lose the whole call to one variant). The
    plain loop, every ratio's base, failing ends the run."""
    measure = bench_distill.measure_isolated if isolate else bench_distill.measure
    order = [PLAIN[0]] + variants
    out, failed = [], {}
    for r in range(rounds):
        seq = [k for k in (order if r % 2 == 0 else order[::-1]) if k not in failed]
        results = {}
        for key in seq:
            try:
                results[key] = (measure(key, w, root) if key in BASELINES
                                else measure("ours", w, root, VARIANTS[key][1]))
            except Exception as e:  # a worker's failure (RuntimeError), or the variant's own error in-process
                if key == PLAIN[0]:
                    raise
                failed[key] = f"{type(e).__name__}: {e}"
                print(f"  round {r + 1}/{rounds} {key}: FAILED, left out\n{e}", file=sys.stderr, flush=True)
                continue
            steps = ", ".join(f"{x:.2f}" for x in results[key]["step_s"])
            print(f"  round {r + 1}/{rounds} {key}: step s {steps}", file=sys.stderr, flush=True)
        out.append({"order": seq, "results": results})
    for r in out:
        r["order"] = [k for k in r["order"] if k not in failed]
        r["results"] = {k: v for k, v in r["results"].items() if k not in failed}
    return out, failed


def distill_tables(w: Workload, variants: list[str], rounds: int, root: Path, measure, isolate: bool) -> dict:
    """Everything the distillation table of workload `w` needs: FLOPs, the cache build, the rounds."""
    out = {"workload": asdict(w), "flops": measure("flops", w, root)}
    if any(VARIANTS[v][1].get("train.teacher_cache") == "true" for v in variants):
        out["cache_build"] = measure("cache", w, root)
    out["distill"], out["failed"] = run_distill(w, variants, rounds, root, isolate)
    return out


def workload_of(args, encoder: str) -> Workload:
    """The measured step: the paper's (VGG11 or `encoder`) or the demo's, with the steps asked for."""
    given = {k: v for k, v in (("steps", args.steps), ("warmup", args.warmup)) if v is not None}
    if args.workload == "demo":
        if args.encoder != Workload.encoder:
            sys.exit("--workload demo measures the demo's convnet: --encoder applies to --workload paper")
        return Workload(**{**asdict(DEMO), "device": args.device, **given})
    warmup = 3 if args.device.startswith("cuda") else 1
    return Workload(**{"steps": 2, "warmup": warmup, **given, "device": args.device, "encoder": encoder})


def main(argv=None) -> dict:
    args = parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    gpu_only = {v for v, (_, overrides) in VARIANTS.items() if overrides.get("train.cuda_graphs")}
    variants = ([v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else
                [v for v in VARIANTS if on_gpu or v not in gpu_only])
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not on_gpu and gpu_only & set(variants):
        sys.exit("variant graphs records CUDA graphs: it needs --device cuda (drop it from --variants on a CPU)")
    encoders = [e.strip() for e in args.encoder.split(",") if e.strip()]
    w = workload_of(args, encoders[0])
    if args.tiny:
        w, args.threads = Workload(**{**asdict(TINY), "steps": 1}), 1
        variants = [v for v in variants if VARIANTS[v][1].get("train.compile") != "true" and v != "tuned"]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    argv_shown = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    results = {"command": f".venv/bin/python benchmarks/run.py {argv_shown}".strip(),
               "machine": bench_machine.describe(onednn=not args.tiny), "load_start": bench_machine.load_average(),
               "workload": asdict(w), "tiny": args.tiny}
    print(f"machine: {results['machine']['cpu']}, load {results['load_start']}", file=sys.stderr)
    n_matmul = 256 if args.tiny else (8192 if on_gpu else 2048)
    results["matmul_start"] = bench_machine.matmul_flops(n_matmul, device=args.device)
    measure = bench_distill.measure if args.tiny else bench_distill.measure_isolated
    with tempfile.TemporaryDirectory(prefix="randteach-bench-") as tmp:
        root = Path(tmp)
        _link_data_sets(root)
        results.update(distill_tables(w, variants, args.rounds, root, measure, isolate=not args.tiny))
        results["more_encoders"] = []
        for i, e in enumerate(encoders[1:], start=1):
            _write(results, args, n_matmul, started, incomplete=f"after the step tables of {', '.join([w.encoder, *encoders[1:i]])}")
            results["more_encoders"].append(distill_tables(Workload(**{**asdict(w), "encoder": e}), variants,
                                                           args.rounds, root, measure, isolate=not args.tiny))
        if args.distill_only:
            results["probes"] = results["landscape"] = None
        else:
            _write(results, args, n_matmul, started, incomplete="after the step tables, before the probes")
            _analysis_sections(results, args, on_gpu, w, root)
    _write(results, args, n_matmul, started)
    for t in bench_report.summarize(results)["targets"]:
        print(f"{t['verdict']:>12}  {t['name']}: {bench_report._shown(t)} (goal {t['goal']})")
    print(f"wrote {args.out} in {results['wall_s'] / 60:.1f} min")
    return results


def _write(results: dict, args, n_matmul: int, started: float, incomplete: str | None = None) -> None:
    """Write the results file (its other sections kept). Also written `incomplete` between the parts, so that a
    run cut short (a GPU session's time limit) keeps what it measured, marked as such."""
    results["matmul_end"] = bench_machine.matmul_flops(n_matmul, device=args.device)
    results["load_end"] = bench_machine.load_average()
    results["wall_s"] = time.perf_counter() - started
    results["incomplete"] = incomplete
    out = Path(args.out)
    out.write_text(bench_report.keep_other_sections(bench_report.markdown(results),
                                                    out.read_text() if out.exists() else ""))


def _analysis_sections(results: dict, args, on_gpu: bool, w: Workload, root: Path) -> None:
    """The probe timings and the landscape rate."""
    print("probes", file=sys.stderr, flush=True)
    feature_kw = {"data": "digits", "dim": 32} if args.tiny else {}
    threads = (args.threads,) if args.tiny or on_gpu else tuple(sorted({args.threads, os.cpu_count() or 1}))
    results["probes"] = bench_analysis.probe_times(reps=1 if args.tiny else args.probe_reps, threads=threads,
                                                   device=args.device, **feature_kw)
    print("landscape", file=sys.stderr, flush=True)
    results["landscape"] = bench_analysis.landscape_rate(w.overrides(root / "unused", root),
                                                         n_loss=64 if args.tiny else 256, device=args.device)


if __name__ == "__main__":
    main()
