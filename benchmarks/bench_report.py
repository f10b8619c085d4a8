"""Turn one benchmark run's measurements into figures, target verdicts and benchmarks/RESULTS.md."""
from __future__ import annotations

import statistics

from bench_distill import PLAIN, VARIANTS

# The performance targets (ratios on this CPU kind, VGG11 at 32 px, batch 256).
TARGET_ALL_ON = 2.5          # distillation with everything on, x the plain fp32 loop
TARGET_CACHE = 1.25          # the teacher cache alone, x the plain fp32 loop
TARGET_LINEAR_S = 12.0       # linear probe, 60,000 x 512, on one CPU core
TARGET_LINEAR_GPU_S = 1.0    # the same on a GPU
TARGET_KNN_S = 5.0           # k-NN, 10,000 queries vs 60,000 x 512
TARGET_FLOP_FRACTION = 0.35  # the training step's FLOP/s / bf16 matmul FLOP/s
TARGET_VS_TUNED = 1.0        # our fastest variant, x the tuned hand-written loop (tuned, or tuned-cpu)
TARGET_COMPILE = 1.0         # train.compile (all) x the same without it (fast): never slower


def _label(key: str) -> str:
    return PLAIN[1] if key == PLAIN[0] else VARIANTS[key][0]


CLOCKS = {"cpu": "cpu_s", "wall": "step_s"}


def verdict_clock(workload: dict) -> str:
    """The CPU clock on the CPU (steady on a shared machine); the wall clock on a GPU, where the host's
    CPU seconds measure only the launching of kernels."""
    return "wall" if workload.get("device", "cpu").startswith("cuda") else "cpu"


def _per_step(runs: list[dict], field: str, warmup: int) -> tuple[float, list[float]]:
    """Mean over rounds of each round's mean timed step (warm-up dropped), and those means: our loop's step
    time is read from its own records, one per timed window, so every loop gets the window's mean."""
    per_round = [statistics.mean(run[field][warmup:]) for run in runs]
    return statistics.mean(per_round), per_round


def _teacher_flops_skipped(key: str, flops: dict) -> float:
    """The teacher FLOPs a variant does not compute: the tuned loops precompute the teacher's outputs, our
    teacher cache its encoder and bottleneck (a run of an older results file has no whole-forward count)."""
    if key in ("tuned", "tuned-cpu"):
        return flops.get("teacher_forward", flops["teacher_cached_part"])
    cached = key != PLAIN[0] and VARIANTS[key][1].get("train.teacher_cache") == "true"
    return flops["teacher_cached_part"] if cached else 0


def summarize(results: dict) -> dict:
    """Per variant and clock (wall, CPU): seconds per step, images/s, ratios to the plain loop and to our
    loop with everything off, FLOP/s against the matmul yardstick; peak RSS; and the target verdicts."""
    w = results["workload"]
    rounds = results["distill"]
    keys = [PLAIN[0]] + [k for k in (rounds[0]["order"] if rounds else []) if k != PLAIN[0]]
    peak = {k: statistics.mean([results["matmul_start"][k], results["matmul_end"][k]])
            for k in ("fp32", "bf16", "fp32_cpu", "bf16_cpu")}
    flops = results["flops"]
    per = {}
    for key in keys:
        runs = [r["results"][key] for r in rounds]
        v = {"label": _label(key), "warmup_s": [run["step_s"][:w["warmup"]] for run in runs],
             "peak_rss": max(run["peak_rss"] for run in runs), "bf16_steps": [run.get("bf16") for run in runs],
             "step_flops": flops["step"] - _teacher_flops_skipped(key, flops)}
        for clock, field in CLOCKS.items():
            t, per_round = _per_step(runs, field, w["warmup"])
            suffix = "" if clock == "wall" else "_cpu"
            v[clock] = {"s_per_step": t, "per_round": per_round, "images_per_s": w["batch"] / t,
                        "flop_s": v["step_flops"] / t, "frac_bf16": v["step_flops"] / t / peak["bf16" + suffix],
                        "frac_fp32": v["step_flops"] / t / peak["fp32" + suffix]}
        per[key] = v
    for clock in CLOCKS:
        base = per[PLAIN[0]][clock]["s_per_step"] if PLAIN[0] in per else None
        off = per["off"][clock]["s_per_step"] if "off" in per else None
        for v in per.values():
            v[clock]["x_plain"] = base / v[clock]["s_per_step"] if base else None
            v[clock]["x_off"] = off / v[clock]["s_per_step"] if off else None
    targets = []

    def target(name, value, shown, goal, ok):
        targets.append({"name": name, "value": value, "shown": shown, "goal": goal,
                        "verdict": "not measured" if value is None else ("PASS" if ok else "FAIL")})

    clock = verdict_clock(w)
    other = "wall" if clock == "cpu" else "cpu"

    def ratio(key):
        if key not in per:
            return None, ""
        v = per[key]
        return v[clock]["x_plain"], f"{v[clock]['x_plain']:.3f}x {clock} clock ({v[other]['x_plain']:.3f}x {other})"

    value, shown = ratio("all")
    target("distill, all on, x plain fp32 loop", value, shown, f">= {TARGET_ALL_ON}x", (value or 0) >= TARGET_ALL_ON)
    value, shown = ratio("cache")
    target("teacher cache alone, x plain fp32 loop", value, shown, f">= {TARGET_CACHE}x", (value or 0) >= TARGET_CACHE)
    probes = results.get("probes") or {}
    linear_goal = TARGET_LINEAR_S if clock == "cpu" else TARGET_LINEAR_GPU_S
    for name, key, goal in (("linear probe 60,000 x 512", "linear", linear_goal),
                            ("k-NN 10,000 vs 60,000 x 512", "knn", TARGET_KNN_S)):
        r = probes.get(key, {})
        value = r.get("median_cpu_s" if clock == "cpu" else "median_s")
        shown = f"{r.get('median_cpu_s') or 0:.1f} CPU s ({r.get('median_s') or 0:.1f} s wall)"
        target(name, value, shown, f"<= {goal:g} s", (value or 1e9) <= goal)
    tuned = {k: per[k][clock]["x_plain"] for k in ("tuned", "tuned-cpu") if k in per}
    fastest = max(tuned, key=tuned.get) if tuned else None  # the harder baseline of the two, where both ran
    ours = [v[clock]["x_plain"] for k, v in per.items() if k not in ("plain", "tuned", "tuned-cpu")]
    best = max(ours) / tuned[fastest] if tuned and ours else None
    target("our fastest variant, x the tuned hand-written loop", best,
           f"{best:.3f}x {clock} clock (against {fastest})" if best else "", f">= {TARGET_VS_TUNED}x",
           (best or 0) >= TARGET_VS_TUNED)
    compiled = per["all"][clock]["x_plain"] / per["fast"][clock]["x_plain"] if {"all", "fast"} <= per.keys() else None
    target("train.compile (all) x the same without it (fast)", compiled,
           f"{compiled:.3f}x {clock} clock" if compiled else "", f">= {TARGET_COMPILE}x",
           (compiled or 0) >= TARGET_COMPILE)
    allon = per.get("all")
    frac = allon[clock]["frac_bf16"] if allon else None
    shown = (f"{100 * frac:.0f} % {clock} clock ({100 * allon[other]['frac_bf16']:.0f} % {other})" if allon else "")
    target("training step (all on) FLOP/s / bf16 matmul FLOP/s", frac, shown,
           f">= {100 * TARGET_FLOP_FRACTION:.0f} %", (frac or 0) >= TARGET_FLOP_FRACTION)
    return {"variants": per, "peak": peak, "targets": targets}


def _is_probe(t: dict) -> bool:
    return t["name"].startswith(("linear probe", "k-NN"))


def _target(t: dict, encoder: str) -> str:
    """A target's name, with the encoder for the training step's (the probes' features are not an encoder's)."""
    return t["name"] if _is_probe(t) else f"{t['name']} ({encoder})"


def _shown(t: dict) -> str:
    return t["shown"] if t["value"] is not None else "-"


def _secs(x: float) -> str:
    """Seconds with three significant digits: 9.83, 0.0274 (a 27 ms CPU step keeps its digits)."""
    return f"{x:.3g}"


def _gib(b: float) -> str:
    return f"{b / 2 ** 30:.2f} GiB"


def _load(triple) -> str:
    return " / ".join(f"{x:.2f}" for x in triple)


def _distill_section(results: dict, title: str) -> list[str]:
    """The distillation table of one workload (`results` holds its workload, flops, distill rounds)."""
    s = summarize(results)
    w = results["workload"]
    head = (f"{w['encoder']} encoder, DINO head {w['hidden_dims']} → bottleneck {w['bottleneck_dim']} → "
            f"{w['out_dim']}, {w['data']} ({w['n_samples']} images cycled, "
            f"padded to 32 px when the encoder needs it), batch {w['batch']}, AdamW lr 1e-3; the baselines' loss "
            "is the cross-entropy, ours the cpu preset's KL (the cross-entropy's gradient, and its value)")
    lines = [f"## {title}", "",
              f"Workload: {head}; init.mode independent (so bf16, when asked for, is on from step 1). "
              f"{w['warmup']} warm-up step(s) then {w['steps']} timed step(s) per measurement, "
              f"{len(results['distill'])} rounds in palindromic order (plain, v1…vn | vn…v1, plain); "
              "every loop runs the same untimed and timed steps; s/step = mean over rounds of each round's "
              "mean timed step. Our loop's step time is read from its own metrics.jsonl (one record per "
              "window), so logging, distances, gradient norm and the bf16 switch are included; the baselines "
              "run under the same exact fp32 (no TF32 on a GPU). "
              "Each measurement is its own process; peak RSS = that process's `ru_maxrss` (whole process: "
              "Python, torch, data, both models, optimizer state).", "",
              "| variant | wall s/step (per round) | images/s | × plain, wall | CPU s/step (per round) | "
              "× plain, CPU | × ours-off, CPU | FLOP/step | % bf16 matmul, CPU | % fp32 matmul, CPU | peak RSS | "
              "warm-up s, per round |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def ratio(x: float, clock: str) -> str:  # in bold on the clock the verdicts use
        return f"**{x:.2f}**" if clock == verdict_clock(w) else f"{x:.2f}"

    for key, v in s["variants"].items():
        wl, cp = v["wall"], v["cpu"]
        warm = ", ".join(_secs(sum(run)) for run in v["warmup_s"])  # per round: all its warm-up steps
        xo = f"{cp['x_off']:.2f}" if cp["x_off"] else "-"
        lines.append(f"| {v['label']} | {_secs(wl['s_per_step'])} ({', '.join(_secs(x) for x in wl['per_round'])}) | "
                     f"{wl['images_per_s']:.1f} | {ratio(wl['x_plain'], 'wall')} | {_secs(cp['s_per_step'])} "
                     f"({', '.join(_secs(x) for x in cp['per_round'])}) | {ratio(cp['x_plain'], 'cpu')} | {xo} | "
                     f"{v['step_flops'] / 1e9:.4g} G | {100 * cp['frac_bf16']:.0f} % | {100 * cp['frac_fp32']:.0f} % | "
                     f"{_gib(v['peak_rss'])} | {warm} |")
    f = results["flops"]
    lines += ["", f"FLOPs (torch.utils.flop_counter.FlopCounterMode, one plain step: teacher forward + student "
              f"forward and backward): {f['step'] / 1e9:.4g} GFLOP; the teacher's encoder and bottleneck "
              f"forward, which the cache removes: {f['teacher_cached_part'] / 1e9:.4g} GFLOP "
              f"({100 * f['teacher_cached_part'] / f['step']:.0f} %, so the cache can give at most "
              f"{f['step'] / (f['step'] - f['teacher_cached_part']):.2f}×). The optimizer's elementwise work is "
              "not counted."]
    bf16_ok = all(all(flags) for key, v in s["variants"].items() if key != PLAIN[0]
                  and VARIANTS[key][1].get("train.precision") == "bf16" for flags in v["bf16_steps"])
    lines.append(f"Every step of the bf16 variants ran under bf16: {'yes' if bf16_ok else 'NO'} "
                 "(metrics.jsonl `bf16` field).")
    cb = results.get("cache_build")
    if cb:
        lines.append(f"Teacher cache build ({cb['origin']}): {cb['images']} images in {cb['seconds']:.1f} s "
                     f"({cb['images'] / cb['seconds']:.0f} images/s, fp32), {cb['bytes'] / 2 ** 20:.1f} MiB; "
                     "paid once per teacher and data set, then read from disk by every run.")
    for key, error in results.get("failed", {}).items():  # a variant whose worker failed (run.py went on)
        lines += ["", f"**{_label(key)} failed** and is left out of the table; its error:", "", "```",
                  error.strip(), "```"]
    return lines


def markdown(results: dict) -> str:
    s = summarize(results)
    m = results["machine"]
    w = results["workload"]
    lines = ["# Benchmark results", "",
             "Written by `make bench` (`benchmarks/run.py`); how to read it and what the numbers mean: "
             "`docs/PERFORMANCE.md`. Every ratio compares measurements taken in this one run.", "",
             f"- command: `{results['command']}`",
             f"- date: {m['date']}; wall time {results['wall_s'] / 60:.1f} min",
             f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads, "
             f"Python {m['python']}, host `{m['host']}`",
             f"- code: commit {m.get('code', 'unknown')}",
             f"- bf16 hardware: AMX flags {', '.join(m['amx']) if m['amx'] else 'absent'}; avx512_bf16 "
             f"{'present' if m['avx512_bf16'] else 'absent'}; oneDNN dispatches to ISA `{m['onednn']['isa']}`, "
             f"bf16 matmul kernel `{m['onednn']['bf16_matmul']}`",
             f"- load average (1/5/15 min): start {_load(results['load_start'])}, end {_load(results['load_end'])}"
             f" (the machine is shared; {m['cores']} cores)",
             f"- GPU: {m['cuda'] or 'none in this session (no CUDA device; the device tool lent none)'}", "",
             *([f"**Incomplete**: written {results['incomplete']}; the benchmark did not finish (the rest is "
                "missing, not failed).", ""] if results.get("incomplete") else []),
             "## Targets", "",
             *(["`--tiny`: a smoke test of the script on a tiny model and digits features; the verdicts below "
                "judge nothing.", ""] if results.get("tiny") else []),
             "| target | measured | goal | verdict |", "|---|---|---|---|"]
    for t in s["targets"]:
        lines.append(f"| {_target(t, w['encoder'])} | {_shown(t)} | {t['goal']} | **{t['verdict']}** |")
    for more in results.get("more_encoders", []):  # the step's targets for every encoder; the probes' once
        for t in summarize({**results, **more, "probes": None})["targets"]:
            if not _is_probe(t):
                lines.append(f"| {_target(t, more['workload']['encoder'])} | {_shown(t)} | {t['goal']} | "
                             f"**{t['verdict']}** |")
    pk = s["peak"]
    ms, me = results["matmul_start"], results["matmul_end"]
    lines += ["", f"Matmul yardstick ({ms['n']}² @ {ms['n']}², fp32 and bf16 alternating, median; start → end of "
              f"the run): fp32 {ms['fp32'] / 1e9:.1f} → {me['fp32'] / 1e9:.1f} GFLOP/s wall, "
              f"{ms['fp32_cpu'] / 1e9:.1f} → {me['fp32_cpu'] / 1e9:.1f} GFLOP per CPU-second; bf16 "
              f"{ms['bf16'] / 1e9:.1f} → {me['bf16'] / 1e9:.1f} GFLOP/s wall, {ms['bf16_cpu'] / 1e9:.1f} → "
              f"{me['bf16_cpu'] / 1e9:.1f} GFLOP per CPU-second. bf16/fp32 = {pk['bf16_cpu'] / pk['fp32_cpu']:.2f} "
              f"(CPU clock), {pk['bf16'] / pk['fp32']:.2f} (wall).", "",
              ("Verdicts use the CPU clock (process CPU seconds, all threads), which other work on a shared "
               "machine does not stretch; the wall-clock figure is shown beside it." if verdict_clock(w) == "cpu" else
               f"Workload on {w['device']}: verdicts use the wall clock (after a device synchronize); the host's "
               "CPU seconds are shown but measure only kernel launches."), ""]
    lines += _distill_section(results, "1. Distillation step")
    for i, more in enumerate(results.get("more_encoders", [])):
        lines += [""] + _distill_section({**results, **more}, f"1.{i + 1}. Distillation step, {more['workload']['encoder']}")
    p = results.get("probes")
    if p:
        lines += ["", "## 2. Probes", "",
                  f"Features: {p['source']}, train {p['shape']['train']}, test {p['shape']['test']}; "
                  "`randteach.probes.linear_knn.linear_probe` (L-BFGS logistic regression, defaults) and `knn_probe` "
                  "(k = 20, cosine), alternating, median of the repetitions, per torch thread count. With one "
                  "thread the CPU seconds are the time on one dedicated core: the verdicts use them.", "",
                  "| probe | threads | wall s (each repetition) | CPU s (each repetition) | median wall | median CPU | "
                  "test accuracy |", "|---|---|---|---|---|---|---|"]
        for n, by in p["threads"].items():
            for name in ("linear", "knn"):
                r = by[name]
                lines.append(f"| {name} | {n} | {', '.join(f'{x:.2f}' for x in r['seconds'])} | "
                             f"{', '.join(f'{x:.2f}' for x in r['cpu_seconds'])} | {r['median_s']:.2f} s | "
                             f"{r['median_cpu_s']:.2f} s | {100 * r['accuracy']:.2f} % |")
    ls = results.get("landscape")
    if ls:
        lines += ["", "## 3. Landscape", "",
                  f"`randteach.analysis.landscape.compute_landscape` (functional_call per point, loss and "
                  f"embedding KL, no probe) of the workload's model on a plane through three random inits, "
                  f"{ls['n_loss']} loss inputs per point, on {ls.get('device', 'cpu')}: "
                  f"**{ls['points_per_s']:.2f} points/s** wall, "
                  f"{ls['points_per_cpu_s']:.2f} points per CPU-second "
                  f"({ls['points']} points in {ls['k_points_s']:.1f} s including setup = "
                  f"{ls['points_per_s_with_setup']:.2f} points/s; one point with setup {ls['one_point_s']:.1f} s)."]
    lines += ["", "## 4. GPU", "",
              f"{'Device: ' + m['cuda'] if m['cuda'] else 'No GPU was available to this session (the device tool reported none), so no GPU figures were taken.'}",
              "", "## Raw measurements", "", "| round | order | variant | wall s per step (warm-up first) | CPU s per step | load start → end |",
              "|---|---|---|---|---|---|"]
    for i, r in enumerate(results["distill"]):
        for key in r["order"]:
            res = r["results"][key]
            lines.append(f"| {i + 1} | {r['order'].index(key) + 1} | {_label(key)} | "
                         f"{', '.join(_secs(x) for x in res['step_s'])} | {', '.join(_secs(x) for x in res['cpu_s'])} | "
                         f"{res['load'][0]:.1f} → {res['load'][1]:.1f} |")
    return "\n".join(lines) + "\n"


# Sections other scripts write into the same file (bench_stacked.py, cpu_step_parts.py): kept when run.py
# rewrites it.
OTHER_SCRIPTS_SECTIONS = ("## Stacked runs", "## CPU step, part by part")


def keep_other_sections(new: str, old: str) -> str:
    """`new` followed by the sections of `old` that other scripts wrote (each from its heading to the next
    '## ' heading), so that re-running run.py does not erase their measurements."""
    kept = []
    for part in ("\n" + old).split("\n## ")[1:]:
        section = "## " + part
        if section.startswith(OTHER_SCRIPTS_SECTIONS):
            kept.append(section.rstrip("\n"))
    return new.rstrip("\n") + "".join("\n\n" + k for k in kept) + "\n"
