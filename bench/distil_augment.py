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

from _vgg import parse_and_load  # bench/ is on the path when a script here runs

from search import BlockChoice, BlockFitter, apply_plan
from search.distil import DistilSettings, distil, live_teacher, teacher_logits
from search.engine import accuracy

RANKS = {"features.2": 16, "features.5": 16, "features.7": 16, "features.10": 32, "features.12": 64}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=float, default=30.0)
    args, data = parse_and_load(parser)
    base, sites = data.base, data.sites
    cx, cy, vx, vy = data.calib_x, data.calib_y, data.val_x, data.val_y
    fitter = BlockFitter(base.module, sites, cx[:512])
    plan = {name: BlockChoice("ss", rank=rank) for name, rank in RANKS.items()}
    print(f"vgg_seed, first conv kept, SS r=16/16/16/32/64; {args.epochs:g} epochs on train_0 (10k), "
          f"{args.threads} threads, CPU; validation = first 5k of test")
    for shift in (0, 4):
        model = apply_plan(base.module, plan, fitter)
        teacher = live_teacher(base.module) if shift else teacher_logits(base.module, cx)
        report = distil(model, cx, teacher, cy, DistilSettings(epochs=args.epochs, shift=shift))
        acc = accuracy(model, vx, vy)
        print(f"  shift {shift}: validation accuracy {acc:.2f} %, {report.seconds:.0f} s ({report.precision})", flush=True)


if __name__ == "__main__":
    main()
