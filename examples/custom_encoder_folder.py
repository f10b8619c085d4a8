"""Bring your own encoder and your own images: random-teacher distillation of a small custom network
on an image folder, through the Python API.

    python examples/custom_encoder_folder.py                    # 30 train + 10 test images per class
    python examples/custom_encoder_folder.py --per-class 5 --epochs 1         # seconds

1. writes an image folder of PNGs (DIR/train/<class>/*.png, DIR/test/<class>/*.png) from a few hundred
   Fashion-MNIST images, the way your own data would look;
2. defines a small encoder (any nn.Module mapping a batch of images to a batch of vectors);
3. loads the folder (decoded once, then cached under the data root), distills a student into the
   encoder's random teacher and probes teacher, student and raw pixels on the test split;
4. prints the probe table. Re-running it reuses the finished run (runs are content-addressed);
5. measures every layer of teacher and student (`randteach.signal_report`: effective rank, dead
   channels, per-layer linear probe) on the same folder.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image
from torch import nn

import randteach
from randteach.data import load_dataset, stratified_subset
from randteach.reports.run import probe_table


def write_image_folder(root: Path, per_class: int) -> Path:
    """root/train/<class>/<i>.png and root/test/<class>/<i>.png from Fashion-MNIST (test: a third as many)."""
    for split, n in (("train", per_class), ("test", max(1, per_class // 3))):
        data = load_dataset("fashion-mnist", split)
        picked = data.subset(stratified_subset(data.labels, n * data.num_classes, seed=0))
        for i, (image, label) in enumerate(zip(picked.images, picked.labels.tolist())):
            path = root / split / data.classes[label].replace("/", "-") / f"{i:05d}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image[0].numpy()).save(path)
    return root


class SmallEncoder(nn.Module):
    """Two conv blocks with batch norm, global average pooling: (B, C, H, W) -> (B, 64).

    randteach builds it through this constructor (passing in_channels and image_size since the
    signature asks for them), once for the teacher and once for the student's fresh init; the
    embedding size is found by one forward pass, as there is no `embed_dim` attribute."""

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-class", type=int, default=30, help="training images per class (test: a third as many)")
    p.add_argument("--epochs", type=float, default=20, help="distillation epochs")
    p.add_argument("--images", type=Path, default=Path("runs/example-images"),
                   help="where to write the image folder (the run itself goes to runs/cpu-<hash>-<hash>)")
    args = p.parse_args()

    folder = write_image_folder(args.images / f"per-class-{args.per_class}", args.per_class)
    train = load_dataset("folder", "train", path=str(folder))   # prints how many images and classes it found
    test = load_dataset("folder", "test", path=str(folder))
    result = randteach.distill(
        encoder=SmallEncoder, train=train, probe_train=train, probe_test=test, preset="cpu",
        **{"train.epochs": args.epochs, "train.batch_size": 64, "train.probe_every": 0, "train.precision": "fp32",
           "head.hidden_dims": [512], "head.bottleneck_dim": 64, "head.out_dim": 1024})
    print(f"\n{result.summary['status']}: {result.path} ({result.summary['wall_time_s']:.0f} s)")
    print(probe_table(result.summary))

    # The run's encoder exists only in this script: `architecture` says how to rebuild its checkpoints.
    signal = randteach.signal_report(result, train, test, architecture=SmallEncoder, n_samples=len(train))
    print(f"\nper layer, teacher -> student ({signal['figures']['propagation']}):")
    for k, layer in enumerate(signal["layers"]):
        t, s = signal["metrics"]["teacher"][k], signal["metrics"]["student"][k]
        print(f"  {layer['name']:10s} effective rank {t['effective_rank']:5.1f} -> {s['effective_rank']:5.1f}   "
              f"dead {t['dead_neurons']:3d} -> {s['dead_neurons']:3d} of {layer['dim']:3d}   "
              f"linear probe {100 * t['probe']['linear']:5.1f}% -> {100 * s['probe']['linear']:5.1f}%")


if __name__ == "__main__":
    main()
