"""Fixed plans on vgg_seed with SVD + least-squares weights (no distillation): cost, speed, accuracy.

    python bench/engine_front.py [--shared ../shared] [--calib 512]

Accuracy is on the validation split (first 5,000 images of test.npz); latency is the median of
interleaved runs (base and candidates) in a separate process, per runtime, 2 threads, batch 1.
"""

from __future__ import annotations

import argparse
import time

from _vgg import parse_and_load  # bench/ is on the path when a script here runs

from search import (
    BlockChoice,
    BlockFitter,
    LatencySpec,
    accuracy,
    apply_plan,
    count_flops,
    count_params,
    measure_models,
    predict_latency,
    site_latency_table,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calib", type=int, default=512)
    args, data = parse_and_load(parser)
    base, sites = data.base, data.sites
    calib, val_x, val_y = data.calib_x[: args.calib], data.val_x, data.val_y
    rest = sites[1:]
    plans = {
        "ss r=cout/4": {s.name: BlockChoice("ss", rank=s.out_channels // 4) for s in rest},
        "ss r=cout/8": {s.name: BlockChoice("ss", rank=s.out_channels // 8) for s in rest},
        "ss r=cout/2": {s.name: BlockChoice("ss", rank=s.out_channels // 2) for s in rest},
        "ds m=1": {s.name: BlockChoice("ds", depth_multiplier=1) for s in rest},
        "2 ss cout/2 + 3 ds m=1": {
            **{s.name: BlockChoice("ss", rank=s.out_channels // 2) for s in rest[:2]},
            **{s.name: BlockChoice("ds", depth_multiplier=1) for s in rest[2:]},
        },
        # Not candidates: how fast a plan can get, where per-op overhead is most of what is left. The
        # issue's floor (rank cout/32, 2-16 channels) and rank 16 everywhere: onnxruntime on AVX-512
        # packs channels in blocks of 16 and reorders around a conv with fewer.
        "every conv ss r=cout/32": {s.name: BlockChoice("ss", rank=max(1, s.out_channels // 32)) for s in sites},
        "every conv ss r=16": {s.name: BlockChoice("ss", rank=16) for s in sites},
    }
    start = time.perf_counter()
    fitter = BlockFitter(base.module, sites, calib)
    models = {name: apply_plan(base.module, plan, fitter) for name, plan in plans.items()}
    fit_s = time.perf_counter() - start
    base_flops = count_flops(base.module, base.input_shape)
    rows = {name: {"flops": count_flops(m, base.input_shape), "params": count_params(m),
                   "val": accuracy(m, val_x, val_y)} for name, m in models.items()}
    base_val = accuracy(base.module, val_x, val_y)
    lat: dict[str, dict[str, float]] = {}
    pred: dict[str, dict[str, float]] = {}
    for runtime in ("onnxruntime", "torch"):
        spec = LatencySpec(runtime, threads=args.threads, batch=1, warmup=20, runs_per_round=20, rounds=5)
        results = measure_models([base.module, *models.values()], base.input_shape, spec)
        lat[runtime] = {"base": results[0].median_ms}
        lat[runtime].update({n: r.median_ms for n, r in zip(models, results[1:], strict=True)})
        choices = {s.name: sorted({p[s.name] for p in plans.values() if s.name in p}) for s in sites}
        table = site_latency_table(sites, choices, spec)
        pred[runtime] = {n: predict_latency(results[0].median_ms, table, p) for n, p in plans.items()}
        print(f"{runtime}: device {results[0].device}, base memory format {results[0].memory_format}")
    print(f"fitting all blocks on {args.calib} calibration images: {fit_s:.1f} s ({fitter.fits} fits)")
    print(f"\nbase: {base_flops / 1e6:.1f} MFLOPs, {count_params(base.module):,} params, val {base_val:.2f}%, "
          f"onnxruntime {lat['onnxruntime']['base']:.3f} ms, torch {lat['torch']['base']:.3f} ms "
          f"(median, {args.threads} threads, batch 1)")
    header = f"{'plan (first conv kept unless said)':<36}{'FLOPs':>8}{'params':>10}{'ORT x':>8}{'ORT pred err':>14}{'torch x':>9}{'torch pred err':>16}{'val % (no distil)':>19}"
    print(header)
    for name, row in rows.items():
        ort_ratio = lat["onnxruntime"][name] / lat["onnxruntime"]["base"]
        torch_ratio = lat["torch"][name] / lat["torch"]["base"]
        ort_err = pred["onnxruntime"][name] / lat["onnxruntime"][name] - 1
        torch_err = pred["torch"][name] / lat["torch"][name] - 1
        print(f"{name:<36}{row['flops'] / base_flops:>7.2f}x{row['params']:>10,}{ort_ratio:>7.2f}x{ort_err:>+13.0%}"
              f"{torch_ratio:>8.2f}x{torch_err:>+15.0%}{row['val']:>19.2f}")


if __name__ == "__main__":
    main()
