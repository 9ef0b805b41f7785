"""bfloat16 autocast against float32 for distillation on this CPU: step time, and accuracy after a short run.

    python bench/distil_precision.py [--shared ../shared] [--epochs 3] [--threads 2]

Students are vgg_seed with fixed plans (first conv kept), weights from SVD + least squares on 512
calibration images. Step time: median of 5 training steps (forward, backward, AdamW) on one batch of
128 training images, channels_last, after 3 warm-up steps. Accuracy: the spatial-separable cout/8
student distilled ``--epochs`` on train_0 (10k) in each precision, scored on the validation split
(first 5,000 of test.npz). Also prints what ``precision="auto"`` picks here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _vgg import parse_and_load  # bench/ is on the path when a script here runs

from search import BlockChoice, BlockFitter, apply_plan
from search.distil import DistilSettings, distil, resolve_precision, teacher_logits
from search.engine import accuracy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--shift", type=int, default=0, help="translation augmentation in pixels (0: cached teacher logits)")
    args, data = parse_and_load(parser)
    base, sites = data.base, data.sites
    cx, cy, vx, vy = data.calib_x, data.calib_y, data.val_x, data.val_y
    fitter = BlockFitter(base.module, sites, cx[:512])
    plans = {
        "ss r=cout/8": {s.name: BlockChoice("ss", rank=s.out_channels // 8) for s in sites[1:]},
        "ds m=1": {s.name: BlockChoice("ds", depth_multiplier=1) for s in sites[1:]},
        "base": {},
    }
    print(f"training step, batch 128, {args.threads} threads, CPU, channels_last (median of 5 after 3 warm-up):")
    for name, plan in plans.items():
        row = []
        for precision in ("fp32", "bf16"):
            model = apply_plan(base.module, plan, fitter).to(memory_format=torch.channels_last).train()  # type: ignore[call-overload]
            opt = torch.optim.AdamW(model.parameters(), 1e-3)
            x = cx[:128].contiguous(memory_format=torch.channels_last)
            target = torch.randn(128, 10)
            times = []
            for _ in range(8):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = model(x)
                loss = F.mse_loss(out.float(), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - start)
            row.append(statistics.median(times[3:]) * 1000)
        auto = resolve_precision(apply_plan(base.module, plan, fitter), cx, DistilSettings()).precision
        print(f"  {name:<12} fp32 {row[0]:6.1f} ms  bf16 {row[1]:6.1f} ms  ({row[0] / row[1]:.2f}x)  auto picks {auto}")
    teacher = teacher_logits(base.module, cx)
    print(f"{args.epochs:g} epochs of distillation on train_0 (10k), shift {args.shift}, ss r=cout/8 student,"
          " validation = first 5k of test:")
    for precision in ("bf16", "fp32"):
        model = apply_plan(base.module, plans["ss r=cout/8"], fitter)
        report = distil(model, cx, teacher, cy, DistilSettings(epochs=args.epochs, precision=precision, shift=args.shift))
        acc = accuracy(model, vx, vy)
        print(f"  {precision}: validation accuracy {acc:.2f} %, {report.seconds:.0f} s")


if __name__ == "__main__":
    main()
