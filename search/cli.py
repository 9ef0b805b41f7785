"""``python -m search``: analyse a model, or write a zoo net as ``.pt2`` (no download needed)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from search.distil import DistilSettings
from search.errors import SearchError
from search.latency import RUNTIMES, LatencySpec
from search.space import BLOCK_KINDS
from search.study import FAR_PLAN_DROP, FAR_PLAN_LR, FINAL_EPOCHS, TRIAL_EPOCHS, SlimConfig


def _analyse(args: argparse.Namespace) -> int:
    from search.engine import analyse
    from search.loading import load_pt2, parse_floats

    base = load_pt2(
        args.model, args.input_shape, parse_floats(args.mean, "mean"), parse_floats(args.std, "std")
    )
    runtimes = [r for r in args.runtime.split(",") if r] if args.runtime else []
    specs = [LatencySpec(runtime=r, threads=args.threads, batch=args.batch) for r in runtimes]
    result = analyse(base, specs)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model {result['name']}: input {result['input_shape']}, "
          f"{result['flops'] / 1e6:.1f} MFLOPs, {result['params']:,} params")
    for lat in result["latency"]:
        print(f"latency {lat['runtime']} ({lat['threads']} threads, batch {lat['batch']}, {lat['device']}, "
              f"{lat['memory_format']}): median {lat['median_ms']:.3f} ms over {lat['runs']} runs")
    print(f"\n{'site':<28}{'in':>6}{'out':>6}{'kernel':>8}{'stride':>8}{'output':>10}{'MFLOPs':>10}{'share':>8}")
    for s in result["sites"]:
        print(f"{s['name']:<28}{s['in_channels']:>6}{s['out_channels']:>6}{'x'.join(map(str, s['kernel'])):>8}"
              f"{'x'.join(map(str, s['stride'])):>8}{'x'.join(map(str, s['output_size'])):>10}"
              f"{s['flops'] / 1e6:>10.2f}{s['flops_share'] * 100:>7.1f}%")
    for s in result["skipped"]:
        print(f"kept as is: {s['name']} ({s['reason']})")
    if not result["sites"]:
        print("no conv site to slim")
    return 0


def _zoo(args: argparse.Namespace) -> int:
    from models import build_zoo_model
    from search.export import export_pt2

    module, shape = build_zoo_model(args.name, seed=args.seed)
    export_pt2(module, args.out, shape)
    print(f"wrote {args.out}: {args.name}, input shape {','.join(map(str, shape))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m search", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("analyse", help="conv sites, FLOPs, params and latency of a .pt2 model")
    p.add_argument("model", help="a torch.export archive (.pt2)")
    p.add_argument("--input-shape", help="C,H,W (default: from the archive)")
    p.add_argument("--mean", help="per-channel mean for images scaled to [0,1], comma-separated")
    p.add_argument("--std", help="per-channel std, comma-separated")
    p.add_argument("--runtime", default="onnxruntime",
                   help=f"comma-separated runtimes to time ({', '.join(RUNTIMES)}); empty: none")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_analyse)
    s = sub.add_parser("slim", help="search a per-site block plan under FLOP and latency budgets")
    s.add_argument("model", help="a torch.export archive (.pt2)")
    s.add_argument("--input-shape", help="C,H,W (default: from the archive)")
    s.add_argument("--mean", help="per-channel mean for images scaled to [0,1], comma-separated")
    s.add_argument("--std", help="per-channel std, comma-separated")
    s.add_argument("--calib", required=True, help=".npz (x uint8 NHWC, optional y): fitting and distillation")
    s.add_argument("--val", required=True, help=".npz: scores every trial")
    s.add_argument("--holdout", help=".npz: final figures only, read after the search")
    s.add_argument("--max-flops", type=float, help="budget, fraction of the base model's FLOPs")
    s.add_argument("--max-latency", type=float, help="budget, fraction of the base model's measured latency")
    s.add_argument("--runtime", default=SlimConfig.runtime, choices=RUNTIMES)
    s.add_argument("--threads", type=int, default=SlimConfig.threads)
    s.add_argument("--batch", type=int, default=SlimConfig.batch)
    s.add_argument("--trials", type=int, default=SlimConfig.trials)
    s.add_argument("--blocks", default=",".join(BLOCK_KINDS), help="allowed block types, comma-separated")
    s.add_argument("--time-budget", type=float, help="wall-clock budget of the whole job (s): the search stops at 40%% "
                   "of it and the final distillations are shortened to fit the rest")
    s.add_argument("--trial-images", type=int, default=SlimConfig.trial_images,
                   help="training images per trial fine-tune")
    s.add_argument("--trial-epochs", type=float, default=TRIAL_EPOCHS)
    s.add_argument("--final-epochs", type=float, default=FINAL_EPOCHS)
    s.add_argument("--final-mixup", type=float, default=DistilSettings.mixup,
                   help="mixup strength (Beta alpha) in the final distillation, 0 = none; 0.3 helped long "
                   "(~55-epoch) runs a little, see DistilSettings.mixup")
    s.add_argument("--final-lr", type=float,
                   help=f"peak learning rate of every final candidate's distillation (one-cycle); default: "
                   f"{DistilSettings.lr:g}, or {FAR_PLAN_LR:g} for a plan whose trial scored {FAR_PLAN_DROP:g} points "
                   "or more under the base (far from the original), see search.study.FAR_PLAN_LR")
    s.add_argument("--final-candidates", type=int, default=SlimConfig.final_candidates,
                   help="Pareto plans given the long distillation, at most: the most accurate inside the budgets, "
                   "then the most accurate inside each --latency-steps ratio, then each the most accurate at least "
                   "10%% faster than the fastest pick")
    s.add_argument("--latency-steps", default="",
                   help="further latency ratios under --max-latency, comma-separated: the most accurate plan inside "
                   "each is a final candidate too (e.g. --max-latency 0.20 --latency-steps 0.18)")
    s.add_argument("--final-timing-repeats", type=int, default=SlimConfig.final_timing_repeats,
                   help="times each final candidate is timed on each runtime, each in a fresh process; the "
                   "report gives the median and range of the ratios")
    s.add_argument("--seed", type=int, default=SlimConfig.seed)
    s.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    s.set_defaults(func=_slim)
    z = sub.add_parser("zoo", help="write one of our reference nets as .pt2 (random weights)")
    z.add_argument("name")
    z.add_argument("--out", required=True)
    z.add_argument("--seed", type=int, default=0)
    z.set_defaults(func=_zoo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (SearchError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _slim(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from search.loading import parse_floats, parse_shape
    from search.study import candidate_notes, final_distil_fields, run_slim

    config = SlimConfig(
        model=args.model, out_dir=args.out, calib=args.calib, val=args.val, holdout=args.holdout,
        input_shape=parse_shape(args.input_shape) if args.input_shape else None,
        mean=parse_floats(args.mean, "mean"), std=parse_floats(args.std, "std"),
        max_flops=args.max_flops, max_latency=args.max_latency, runtime=args.runtime,
        latency_steps=parse_floats(args.latency_steps, "latency-steps") or (),
        threads=args.threads, batch=args.batch, trials=args.trials,
        blocks=tuple(b for b in args.blocks.split(",") if b), time_budget_s=args.time_budget, seed=args.seed,
        trial_images=args.trial_images, trial_distil=DistilSettings(epochs=args.trial_epochs),
        **final_distil_fields(args.final_epochs, args.final_mixup, args.final_lr),
        final_candidates=args.final_candidates, final_timing_repeats=args.final_timing_repeats,
    )
    bar = tqdm(total=config.trials, desc="trials", unit="trial", file=sys.stderr)

    def progress(event: dict[str, object]) -> None:
        if event["event"] == "trial":
            bar.n = int(event["done"])  # type: ignore[call-overload]
            bar.set_postfix_str(f"#{event['number']} {event['state']}")
            bar.refresh()
        else:
            bar.write(f"[{event['t']:>7.1f}s] {event['event']}")

    summary = run_slim(config, progress)
    bar.close()
    base = summary["base"]
    print(f"base: {base['flops'] / 1e6:.1f} MFLOPs, {base['params']:,} params, {base['latency_ms']:.3f} ms "
          f"(median, {config.runtime}, {config.threads} threads, batch {config.batch}), "
          f"val {base['val_metric']} {base['val_score']:.2f}%, held-out {base['holdout_score']}")
    for cand in summary["candidates"]:
        lat = cand["latency"][0]
        acc = cand["accuracy"]
        print(f"candidate {cand['id']} (trial {cand['trial']}): {cand['flops'] / base['flops']:.3f}x FLOPs, "
              f"{lat['ratio']:.3f}x latency ({lat['latency_ms']:.3f} ms vs {lat['base_latency_ms']:.3f} ms; "
              f"{lat['ratio_min']:.3f}-{lat['ratio_max']:.3f}x over {lat['repeats']} timings), "
              + ", ".join(f"{k} {v:.2f}" for k, v in acc.items() if isinstance(v, float)))
        for note in candidate_notes(cand):
            print(f"  {note}")
    print(f"wrote {args.out}/summary.json and {len(summary['candidates'])} candidates in {summary['wall_s']:.0f} s")
    return 0
