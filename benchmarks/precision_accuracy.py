"""Does bf16 change the probes? The demo recipe (cpu preset: conv net, DINO head to 4096, CE, AdamW 1e-3,
alpha = 1e-10) on a 10,000-image Fashion-MNIST subset for 2 epochs, once in fp32 and once with
--train.precision bf16, same seeds; linear and k-NN probes of teacher, student and input on 10,000 train /
2,000 test images. Under bf16 the probes' embeddings are computed under bf16 autocast too.

    .venv/bin/python benchmarks/precision_accuracy.py [--seeds 0 1] [--epochs 2] [--out DIR]

Each run is the command printed before it (`randteach distill ...`), run through the Python API.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from randteach.config import build_config
from randteach.runs.rundir import RunDir
from randteach.train.loop import distill


def overrides(precision: str, seed: int, epochs: float, out: Path) -> dict[str, str]:
    return {"data.n_samples": "10000", "train.epochs": str(epochs), "train.probe_every": str(epochs),
            "train.checkpoint_every": "0", "probe.n_train": "10000", "probe.n_test": "2000",
            "train.seed": str(seed), "train.precision": precision, "out": str(out)}


def run(precision: str, seed: int, epochs: float, out: Path) -> dict:
    o = overrides(precision, seed, epochs, out)
    print("randteach distill --preset cpu " + " ".join(f"--{k} {v}" for k, v in o.items() if k != "out"), flush=True)
    result = distill(build_config("cpu", None, o), progress=False)
    steps = RunDir(result.path).steps()
    switch = next((r["step"] for r in steps if r["bf16"]), None)
    return {"precision": precision, "seed": seed, "probe": result.summary["probe"],
            "wall_time_s": result.summary["wall_time_s"], "steps": result.summary["steps"],
            "final_loss": result.summary.get("final_loss"), "bf16_from_step": switch}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--out", default=None, help="keep the run directories here (default: a temporary folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out or tmp)
        rows = [run(prec, seed, args.epochs, base / f"{prec}-s{seed}")
                for seed in args.seeds for prec in ("fp32", "bf16")]
    print("\n| seed | precision | teacher linear / kNN | student linear / kNN | input linear / kNN | "
          "final loss | bf16 from step | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [" / ".join(f"{100 * r['probe'][role][k]:.2f}" for k in ("linear", "knn"))
                 for role in ("teacher", "student", "input")]
        print(f"| {r['seed']} | {r['precision']} | {' | '.join(cells)} | {r['final_loss']:.4f} | "
              f"{r['bf16_from_step'] or '-'} | {r['wall_time_s']:.0f} |")
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
