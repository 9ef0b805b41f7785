"""Fixed plans on a GPU: measured CUDA latency (batch 1 and 32) against the base, and the per-site
table's prediction, for vgg_seed (or any .pt2). Weights are fitted on random images: speed only.

    python bench/cuda_front.py MODEL.pt2 [--batches 1,32]

The latency child times our .pt2 export in torch eager on the GPU (CUDA events, synchronised),
contiguous vs channels_last, warm-up then interleaved rounds; medians are printed with the device.
"""

from __future__ import annotations

import argparse

import torch

from search import (
    BlockChoice,
    BlockFitter,
    LatencySpec,
    apply_plan,
    count_flops,
    find_sites,
    load_pt2,
    measure_models,
    predict_latency,
    site_latency_table,
)
from search.latency import BASE_ROW
from search.space import BLOCK_KINDS, site_options


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--batches", default="1,32")
    args = parser.parse_args()
    base = load_pt2(args.model, "3,32,32")
    sites, _ = find_sites(base.module, base.input_shape)
    rest = sites[1:]
    plans = {
        "ss r=cout/4": {s.name: BlockChoice("ss", rank=s.out_channels // 4) for s in rest},
        "ss r=cout/8": {s.name: BlockChoice("ss", rank=s.out_channels // 8) for s in rest},
        "ds m=1": {s.name: BlockChoice("ds", depth_multiplier=1) for s in rest},
        "ir t=1,k=3": {s.name: BlockChoice("ir", exp_ratio=1, kernel=3) for s in rest},
    }
    calib = torch.randn(256, *base.input_shape)
    fitter = BlockFitter(base.module, sites, calib)
    models = {name: apply_plan(base.module, plan, fitter) for name, plan in plans.items()}
    base_flops = count_flops(base.module, base.input_shape)
    options = {s.name: site_options(s, BLOCK_KINDS) for s in sites}
    for batch in (int(b) for b in args.batches.split(",")):
        spec = LatencySpec("cuda", threads=2, batch=batch, warmup=50, runs_per_round=50, rounds=7)
        results = measure_models([base.module, *models.values()], base.input_shape, spec)
        table = site_latency_table(sites, options, spec)
        table.pop(BASE_ROW, None)
        b = results[0]
        print(f"\n{args.model}: cuda, batch {batch}, device {b.device}, base {b.median_ms:.3f} ms "
              f"(median, {b.memory_format})")
        print(f"{'plan (first conv kept)':<24}{'FLOPs':>8}{'latency':>11}{'ratio':>8}{'predicted':>11}")
        for (name, model), res in zip(models.items(), results[1:], strict=True):
            pred = predict_latency(b.median_ms, table, plans[name])
            print(f"{name:<24}{count_flops(model, base.input_shape) / base_flops:>7.2f}x{res.median_ms:>9.3f}ms"
                  f"{res.median_ms / b.median_ms:>7.2f}x{pred / b.median_ms:>10.2f}x")


if __name__ == "__main__":
    main()
