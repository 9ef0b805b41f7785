"""Run the slimming search on the shared CIFAR-10 models and print one table: base vs candidates.

    python bench/slim_cifar.py vgg_seed resnet20 --runtime onnxruntime --max-latency 0.25 0.70 --max-flops 0.25 1
    python bench/slim_cifar.py --table runs/bench/vgg_seed-onnxruntime runs/bench/resnet20-onnxruntime

Each job gets a wall-clock budget (``--time-budget``, default 24 minutes): the search stops at 40% of
it and the final candidates' distillation (together, up to ``--final-epochs``) is cut to fit the rest. The
models run one after the other; ``--max-latency`` and ``--max-flops`` take one value for all or one
per model (a FLOPs value of 1 is no FLOP budget). ``--table`` prints the same table from finished
jobs' ``summary.json`` without running anything.

Splits: calibration/distillation = train_0 (10k), validation = first 5,000 of test.npz (the search
looks at it), held-out = last 5,000 (final figures only). Latency: median of interleaved runs, base
and candidate in the same process, onnxruntime and torch eager, 2 threads, batch 1, CPU (see
report.json for the device); a base row's latency is the median of the base's timings beside its
candidates. Everything lands in runs/bench/<model>-<runtime>/ (summary.json, candidates/).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _vgg import MEAN, SHARED, STD  # bench/ is on the path when a script here runs

from search.distil import DistilSettings
from search.plan import BlockChoice
from search.study import SlimConfig, candidate_notes, final_distil_fields, run_slim

MODELS = ("vgg_seed", "resnet20")
RUNTIMES = ("onnxruntime", "torch")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", help=f"models to slim, in this order: {', '.join(MODELS)}")
    parser.add_argument("--table", nargs="+", metavar="OUT", help="print the table of finished jobs and stop")
    parser.add_argument("--shared", default=SHARED)
    parser.add_argument("--runtime", default="onnxruntime")
    parser.add_argument("--max-latency", type=float, nargs="+", default=[0.30])
    parser.add_argument("--max-flops", type=float, nargs="+", default=[1.0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--final-epochs", type=float, default=60.0, help="at most; the time budget may cut it")
    parser.add_argument("--time-budget", type=float, default=1440.0, help="seconds for each job")
    parser.add_argument("--final-candidates", type=int, default=3)
    parser.add_argument("--latency-steps", type=float, nargs="+", default=[],
                        help="further latency ratios under --max-latency: the most accurate plan inside each is a "
                        "final candidate too")
    parser.add_argument("--final-mixup", type=float, default=0.0, help="mixup in the final distillation (0 = none)")
    parser.add_argument("--final-lr", type=float,
                        help="peak learning rate of every final distillation (default: search.study.FAR_PLAN_LR's rule)")
    parser.add_argument("--final-timing-repeats", type=int, default=5,
                        help="timings of each final candidate on each runtime, each in a fresh process")
    parser.add_argument("--out", nargs="+", default=None, help="one output folder per model")
    args = parser.parse_args()
    if args.table:
        print_table([json.loads((Path(out) / "summary.json").read_text()) for out in args.table])
        return
    if not args.models or any(m not in MODELS for m in args.models):
        parser.error(f"name the models to slim ({', '.join(MODELS)}), or --table with finished jobs")
    n = len(args.models)
    per_model = {"--max-latency": args.max_latency, "--max-flops": args.max_flops, "--out": args.out}
    for flag, values in per_model.items():
        if values is not None and len(values) not in (1, n):
            parser.error(f"{flag} takes one value or one per model ({n})")
    summaries = []
    for i, model in enumerate(args.models):
        max_latency = args.max_latency[i % len(args.max_latency)]
        max_flops = args.max_flops[i % len(args.max_flops)]
        out = args.out[i] if args.out else f"runs/bench/{model}-{args.runtime}"
        summaries.append(run_job(args, model, max_latency, None if max_flops >= 1 else max_flops, out))
    print_table(summaries)


def run_job(args: argparse.Namespace, model: str, max_latency: float, max_flops: float | None, out: str) -> dict[str, Any]:
    shared = Path(args.shared)
    test = np.load(shared / "data" / "cifar10" / "test.npz")
    tmp = Path(tempfile.mkdtemp())
    np.savez(tmp / "val.npz", x=test["x"][:5000], y=test["y"][:5000])
    np.savez(tmp / "holdout.npz", x=test["x"][5000:], y=test["y"][5000:])
    config = SlimConfig(
        model=str(shared / "models" / f"{model}.pt2"), out_dir=out,
        calib=str(shared / "data" / "cifar10" / "train_0.npz"), val=str(tmp / "val.npz"),
        holdout=str(tmp / "holdout.npz"), input_shape=(3, 32, 32), mean=MEAN, std=STD,
        max_flops=max_flops, max_latency=max_latency, latency_steps=tuple(args.latency_steps),
        runtime=args.runtime, threads=2, batch=1,
        trials=args.trials, time_budget_s=args.time_budget,
        **final_distil_fields(args.final_epochs, args.final_mixup, args.final_lr),
        final_candidates=args.final_candidates, eval_runtimes=RUNTIMES, final_timing_repeats=args.final_timing_repeats,
    )

    def progress(event: dict[str, object]) -> None:
        if event["event"] == "trial":
            print(f"[{model} {event['t']:>7.1f}s] trial {event['number']} {event['state']} values={event['values']}",
                  file=sys.stderr, flush=True)
        else:
            print(f"[{model} {event['t']:>7.1f}s] {event['event']}", file=sys.stderr, flush=True)

    return run_slim(config, progress)


def print_table(summaries: list[dict[str, Any]]) -> None:
    """One table for all jobs: each base model, then its final candidates."""
    print(f"\n{'model':<22}{'FLOPs':>9}{'params':>11}{'ORT ms':>8}{'ORT x':>8}{'torch ms':>9}{'torch x':>8}"
          f"{'val %':>7}{'held %':>8}{'drop':>6}{'wall s':>8}  plan")
    for summary in summaries:
        cfg, base = summary["config"], summary["base"]
        name = Path(cfg["model"]).stem
        base_ms = {rt: statistics.median(e["base_latency_ms"] for c in summary["candidates"] for e in c["latency"]
                                          if e["runtime"] == rt) if summary["candidates"] else float("nan")
                   for rt in RUNTIMES}
        held = base["holdout_score"] if base["holdout_score"] is not None else float("nan")
        print(f"{name:<22}{base['flops'] / 1e6:>8.1f}M{base['params']:>11,}{base_ms['onnxruntime']:>8.3f}{'1':>8}"
              f"{base_ms['torch']:>9.3f}{'1':>8}{base['val_score']:>7.2f}{held:>8.2f}{'':>6}{summary['wall_s']:>8.0f}"
              f"  job: --runtime {cfg['runtime']} --max-latency {cfg['max_latency']} --max-flops {cfg['max_flops']}"
              + (f" --latency-steps {' '.join(map(str, steps))}" if (steps := cfg.get("latency_steps")) else "")
              + (f" --final-mixup {mixup}" if (mixup := cfg["final_distil"].get("mixup", 0.0)) else "")
              + ("" if cfg.get("final_lr_far") else f" --final-lr {cfg['final_distil'].get('lr', DistilSettings.lr):g}"))
        if not summary["candidates"]:
            none: dict[str, Any] = next((e for e in summary["events"] if e["event"] == "no feasible trial"), {})
            closest = (f"; the fastest timed, trial {none['fastest_trial']}, measured {none['fastest_latency_ratio']:.3f}x"
                       f" ({cfg['runtime']} {cfg['threads']} threads, batch {cfg['batch']}, median)"
                       if "fastest_trial" in none else "")
            print(f"{'':<2}no feasible trial: no candidate{closest}")
        for cand in summary["candidates"]:
            lat = {entry["runtime"]: entry for entry in cand["latency"]}
            acc = cand["accuracy"]
            ort, tch = lat.get("onnxruntime", {}), lat.get("torch", {})
            done = (cand.get("training") or {}).get("distillation") or {}
            plan = " ".join(f"{k}={BlockChoice.from_dict(v).key}"
                            for k, v in sorted(cand["plan"].items(), key=lambda kv: _natural(kv[0])))
            label = f"  cand {cand['id']} (trial {cand['trial']})"
            print(f"{label:<22}{cand['flops'] / 1e6:>8.1f}M{cand['params']:>11,}"
                  f"{ort.get('latency_ms', float('nan')):>8.3f}{ort.get('ratio', float('nan')):>7.3f}x"
                  f"{tch.get('latency_ms', float('nan')):>9.3f}{tch.get('ratio', float('nan')):>7.3f}x"
                  f"{acc['val_accuracy']:>7.2f}{acc['holdout_accuracy']:>8.2f}"
                  f"{held - acc['holdout_accuracy']:>6.2f}{'':>8}  {plan}; {done.get('epochs', 0):.1f} epochs"
                  + (f" at lr {lr:g}" if (lr := ((cand.get("training") or {}).get("settings") or {}).get("lr")) else ""))
            spread = [f"{rt} {e['ratio_min']:.3f}-{e['ratio_max']:.3f}x over {e['repeats']} timings"
                      for rt, e in lat.items() if e.get("repeats", 1) > 1]
            if spread:
                print(f"{'':<4}ratio range: " + ", ".join(spread))
            for note in candidate_notes(cand):
                print(f"{'':<4}{note}")
    print("latency: median, CPU, 2 threads, batch 1, interleaved with the base ('x' = over the base; with several "
          "timings, each in a fresh process, the median ms and the median ratio); "
          "val = first 5k of test.npz, held = last 5k (never seen by the search); drop in points; "
          f"device: {_devices(summaries)}")


def _natural(name: str) -> list[Any]:
    """``features.2`` before ``features.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _devices(summaries: list[dict[str, Any]]) -> str:
    found = {e.get("device", "?") for s in summaries for c in s["candidates"] for e in c["latency"]}
    return ", ".join(sorted(found)) or "?"


if __name__ == "__main__":
    main()
