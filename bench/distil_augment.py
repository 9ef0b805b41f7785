"""Distillation with and without random translations, on one vgg_seed plan.

    python bench/distil_augment.py [--shared ../shared] [--epochs 30] [--threads 2]

Student: vgg_seed with the first conv kept and spatial-separable blocks of rank 16/16/16/32/64 on
the other five convs, weights from SVD + least squares on 512 calibration images. Distilled
``--epochs`` on train_0 (10k, labels used) with ``DistilSettings(shift=0)`` (flips only, cached
teacher logits) and ``shift=4`` (each image moved by up to 4 pixels, the teacher run on every
batch), in the precision ``auto`` picks; scored on the validation split (first 5,000 of test.npz).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from search import BlockChoice, BlockFitter, apply_plan, find_sites, load_pt2
from search.distil import DistilSettings, distil, live_teacher, teacher_logits
from search.engine import predict

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
RANKS = {"features.2": 16, "features.5": 16, "features.7": 16, "features.10": 32, "features.12": 64}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    parser.add_argument("--epochs", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shared = Path(args.shared)
    base = load_pt2(shared / "models" / "vgg_seed.pt2", "3,32,32", MEAN, STD)
    train = np.load(shared / "data" / "cifar10" / "train_0.npz")
    test = np.load(shared / "data" / "cifar10" / "test.npz")
    cx, cy = base.normalise(torch.from_numpy(train["x"])), torch.from_numpy(train["y"]).long()
    vx, vy = base.normalise(torch.from_numpy(test["x"][:5000])), torch.from_numpy(test["y"][:5000]).long()
    sites, _ = find_sites(base.module, base.input_shape)
    fitter = BlockFitter(base.module, sites, cx[:512])
    plan = {name: BlockChoice("ss", rank=rank) for name, rank in RANKS.items()}
    print(f"vgg_seed, first conv kept, SS r=16/16/16/32/64; {args.epochs:g} epochs on train_0 (10k), "
          f"{args.threads} threads, CPU; validation = first 5k of test")
    for shift in (0, 4):
        model = apply_plan(base.module, plan, fitter)
        teacher = live_teacher(base.module) if shift else teacher_logits(base.module, cx)
        report = distil(model, cx, teacher, cy, DistilSettings(epochs=args.epochs, shift=shift))
        acc = float((predict(model, vx).argmax(1) == vy).float().mean() * 100)
        print(f"  shift {shift}: validation accuracy {acc:.2f} %, {report.seconds:.0f} s ({report.precision})", flush=True)


if __name__ == "__main__":
    main()
