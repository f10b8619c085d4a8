"""The CPU step, part by part: what each choice of the CPU path is worth, each against its alternative in
the same run (one thread, median of repeated timings, alternating order). Writes (or replaces) the section
"## CPU step, part by part" of benchmarks/RESULTS-demo.md.

- optimizer: one torch.optim AdamW step over the demo student's parameters, default (for-loop) vs fused;
- layout: one fp32 training step (student forward, loss, backward, fused AdamW) per encoder, in the memory
  format `randteach.models.common.fp32_channels_last` picks for the encoder ("ours") vs the other one;
- gradient norm: the demo's fp32 step (channels-last) followed by the norm of all gradients, as torch's
  float64 foreach norm (a float64 copy of every gradient on a CPU) vs `init.l2_total` (fp32 norms, float64
  only where fp32 could get them wrong), which the loop takes every step;
- weight-normalized layer: forward + backward of the head's last layer (64 x 256 -> 4096), F.normalize
  of the weight then F.linear (autograd) vs `unit_row_linear` (output scaling, gradient written out);
- probe embedding: the 10,000 Fashion-MNIST test images through the demo's convnet (`probes.embedding.embed`),
  the encoder in NCHW (as a checkpoint loads) vs the channels-last copy `embed` makes;
- stacked convolution: forward + backward of one grouped convolution over K runs (what a vmap stack of K runs
  computes, `randteach.train.stack_layers`) vs K separate convolutions, K = 4 and 16;
- compile scope: the demo's step eager, with the whole step compiled, with the student's head and the loss
  compiled, and with the loss compiled (what `train.compile` does to the student's side on a CPU).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/cpu_step_parts.py          # ~4 min on 2 cores
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/cpu_step_parts.py --quick  # seconds, no compile
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bench_machine
from bench_stacked import upsert_section
from randteach.config import build_config
from randteach.init import l2_total
from randteach.losses import distill_loss
from randteach.models.common import fp32_channels_last
from randteach.models.heads import unit_row_linear
from randteach.train.setup import build_teacher_and_student

HERE = Path(__file__).resolve().parent
SECTION = "## CPU step, part by part"
DEMO_HEAD = {"head.hidden_dims": "[512, 512]", "head.bottleneck_dim": "256", "head.out_dim": "4096"}
# encoder, its overrides, image side, batch: the demo's convnet, a wider one, a CIFAR ResNet, the papers' VGG11
ENCODERS = [("convnet w16", {"model.encoder": "convnet", "model.width": "16"}, 28, 64),
            ("convnet w32", {"model.encoder": "convnet", "model.width": "32"}, 28, 64),
            ("resnet20 (layer norm)", {"model.encoder": "resnet20", "model.norm": "layer"}, 32, 64),
            ("vgg11", {"model.encoder": "vgg11"}, 32, 32)]


def ms_per_call(fn, inner: int) -> float:
    """Wall milliseconds per call of `inner` calls of fn."""
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner * 1e3


def alternating(cases: dict, reps: int, inner: int) -> dict:
    """Each case warmed up with two untimed calls, then timed `reps` times, the cases alternating so that a
    drifting load weighs on all alike; the median per case."""
    for fn in cases.values():
        fn(), fn()
    times = {name: [] for name in cases}
    for r in range(reps):
        for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            times[name].append(ms_per_call(cases[name], inner))
    return {name: statistics.median(t) for name, t in times.items()}


def student(overrides: dict, side: int, layout, seed: int = 0):
    torch.manual_seed(seed)
    cfg = build_config("cpu", None, {**DEMO_HEAD, **overrides, "init.mode": "independent"})
    _, model = build_teacher_and_student(cfg, 1, side)
    return model.train().to(memory_format=layout)


def step_fn(model, side: int, batch: int, layout, loss_of=None):
    """One training step of `model` on a fixed batch against fixed targets (the teacher cache's situation)."""
    x = torch.empty(batch, 1, side, side, memory_format=layout).normal_()
    target = torch.randn(batch, model.head.out_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    loss_of = loss_of or (lambda x, t: distill_loss("ce", model(x), t))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_of(x, target).backward()
        optimizer.step()
    return step


def optimizer_rows(reps: int) -> list[tuple]:
    params = [p for p in student(ENCODERS[0][1], 28, torch.contiguous_format).parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    cases = {kind: torch.optim.AdamW(params, lr=1e-3, fused=(kind == "fused")).step for kind in ("for-loop", "fused")}
    t = alternating(cases, reps, 20)
    return [("AdamW step, demo student", f"{n / 1e6:.2f} M parameters", "for-loop (torch's CPU default)",
             t["for-loop"], "fused", t["fused"])]


def layout_rows(reps: int) -> list[tuple]:
    rows = []
    for name, overrides, side, batch in ENCODERS:
        cases = {fmt: step_fn(student(overrides, side, layout), side, batch, layout)
                 for fmt, layout in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last))}
        inner = 2 if name == "vgg11" else 10
        t = alternating(cases, reps, inner)
        rule = fp32_channels_last(student(overrides, side, torch.contiguous_format).encoder, torch.device("cpu"))
        ours, alt = ("NHWC", "NCHW") if rule else ("NCHW", "NHWC")
        label = {"NHWC": "channels-last", "NCHW": "NCHW"}
        rows.append((f"fp32 step, {name}", f"batch {batch}, {side} px", label[alt], t[alt], label[ours], t[ours]))
    return rows


def norm_rows(reps: int) -> list[tuple]:
    name, overrides, side, batch = ENCODERS[0]
    model = student(overrides, side, torch.channels_last)
    step = step_fn(model, side, batch, torch.channels_last)
    params = list(model.parameters())

    def float64_foreach():
        step()
        torch.stack(torch._foreach_norm([p.grad for p in params], 2, dtype=torch.float64)).pow(2).sum().sqrt()

    def ours():
        step()
        l2_total([p.grad for p in params])
    t = alternating({"float64": float64_foreach, "ours": ours}, reps, 10)
    return [(f"fp32 step + gradient norm, {name}", f"batch {batch}, {side} px", "float64 foreach norm", t["float64"],
             "l2_total", t["ours"])]


def head_rows(reps: int) -> list[tuple]:
    torch.manual_seed(0)
    w = (torch.randn(4096, 256) * 0.02).requires_grad_()
    z = F.normalize(torch.randn(64, 256), dim=-1).requires_grad_()
    g = torch.randn(64, 4096)

    def normalized():
        F.linear(z, F.normalize(w, dim=1)).backward(g)

    def ours():
        unit_row_linear(z, w).backward(g)
    t = alternating({"normalize": normalized, "ours": ours}, reps, 20)
    return [("weight-normalized last layer, forward + backward", "64 x 256 -> 4096", "F.normalize(W) then F.linear",
             t["normalize"], "unit_row_linear", t["ours"])]


def embed_rows(reps: int) -> list[tuple]:
    from randteach.data import Preprocess, load_dataset
    from randteach.probes.embedding import embed
    test = load_dataset("fashion-mnist", "test")
    preprocess = Preprocess.fit(test, size=28)
    encoder = student(ENCODERS[0][1], 28, torch.contiguous_format).encoder.eval()
    cpu = torch.device("cpu")
    cases = {"NCHW": lambda: encoder(preprocess(test.images)),   # the forward embed would run without the copy
             "ours": lambda: embed(encoder, test.images, preprocess, device=cpu, batch_size=len(test.images))}
    with torch.inference_mode():
        t = alternating(cases, reps, 1)
    return [("probe embedding, 10,000 test images", "convnet w16, one batch", "NCHW forward", t["NCHW"],
             "embed (channels-last copy)", t["ours"])]


def grouped_conv_rows(reps: int) -> list[tuple]:
    """A vmap stack's convolution (`sweep --stack K --stack-mode vmap`, stack_layers): one grouped convolution over K runs' channels
    against K separate ones, forward + backward, the convnet's first layer on Fashion-MNIST (1 -> 16 channels,
    28 px, no input gradient) and its second (16 -> 32 channels, 14 px)."""
    rows = []
    for c_in, c_out, side in ((1, 16, 28), (16, 32, 14)):
        for k in (4, 16):
            rows.append(_grouped_conv_row(k, c_in, c_out, side, reps))
    return rows


def _grouped_conv_row(k: int, c_in: int, c_out: int, side: int, reps: int) -> tuple:
    layout = torch.channels_last
    x = torch.randn(64, k * c_in, side, side).contiguous(memory_format=layout).requires_grad_(c_in > 1)
    w = torch.randn(k * c_out, c_in, 3, 3).contiguous(memory_format=layout).requires_grad_()
    xs = [x.detach()[:, c_in * i:c_in * (i + 1)].contiguous(memory_format=layout).requires_grad_(c_in > 1)
          for i in range(k)]
    ws = [w.detach()[c_out * i:c_out * (i + 1)].contiguous(memory_format=layout).requires_grad_()
          for i in range(k)]
    cases = {"separate": lambda: [F.conv2d(a, b, padding=1).sum().backward() for a, b in zip(xs, ws)],
             "grouped": lambda: F.conv2d(x, w, padding=1, groups=k).sum().backward()}
    t = alternating(cases, reps, 2)
    return (f"stacked convolution, forward + backward, K = {k}", f"batch 64, {c_in} -> {c_out} channels, {side} px",
            f"{k} separate convolutions", t["separate"], "one grouped convolution", t["grouped"])


def compile_rows(reps: int) -> list[tuple]:
    name, overrides, side, batch = ENCODERS[0]
    layout = torch.channels_last
    models = {k: student(overrides, side, layout) for k in ("eager", "whole", "head", "loss")}
    whole, with_head, with_loss = models["whole"], models["head"], models["loss"]
    head = torch.compile(lambda f: with_head.head(f), dynamic=False)
    loss = torch.compile(lambda s, t: distill_loss("ce", s, t), dynamic=False)  # one graph for both cases
    cases = {"eager": step_fn(models["eager"], side, batch, layout),
             "whole": step_fn(whole, side, batch, layout,
                              torch.compile(lambda x, t: distill_loss("ce", whole(x), t), dynamic=False)),
             "head": step_fn(with_head, side, batch, layout, lambda x, t: loss(head(with_head.encoder(x)), t)),
             "loss": step_fn(with_loss, side, batch, layout, lambda x, t: loss(with_loss(x), t))}
    t = alternating(cases, reps, 10)
    where = f"{name}, batch {batch}"
    return [("demo step, whole step compiled", where, "eager", t["eager"], "torch.compile", t["whole"]),
            ("demo step, student head and loss compiled", where, "eager", t["eager"], "torch.compile", t["head"]),
            ("demo step, loss compiled (train.compile on a CPU)", where, "eager", t["eager"], "torch.compile",
             t["loss"])]


def markdown(rows: list[tuple], argv: list[str], started: float) -> str:
    cmd = "OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/cpu_step_parts.py " + " ".join(argv)
    lines = [SECTION, "",
             f"- command: `{cmd.strip()}`",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}; wall time "
             f"{(time.time() - started) / 60:.1f} min",
             f"- machine: {bench_machine.cpu_model()}, torch {torch.__version__} with {torch.get_num_threads()} "
             f"thread(s); load average at the end {bench_machine.load_average()[0]:.2f}",
             "- each case timed in alternation with its alternative, median of the repetitions, ms per call", "",
             "| what | setting | alternative | ms | ours | ms | ours × alternative |", "|---|---|---|---|---|---|---|"]
    for what, setting, alt, t_alt, ours, t_ours in rows:
        lines.append(f"| {what} | {setting} | {alt} | {t_alt:.2f} | {ours} | {t_ours:.2f} | **{t_alt / t_ours:.2f}×** |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="timings per case (alternating)")
    p.add_argument("--quick", action="store_true", help="two repetitions, no VGG11, no compile (a smoke test)")
    p.add_argument("--out", default=str(HERE / "RESULTS-demo.md"))
    args = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    started = time.time()
    reps = 2 if args.quick else args.reps
    if args.quick:
        ENCODERS[:] = ENCODERS[:1]
    rows = (optimizer_rows(reps) + layout_rows(reps) + norm_rows(reps) + head_rows(reps) + embed_rows(reps)
            + grouped_conv_rows(reps))
    rows += [] if args.quick else compile_rows(reps)
    upsert_section(Path(args.out), markdown(rows, argv, started))
    print(markdown(rows, argv, started))


if __name__ == "__main__":
    main()
