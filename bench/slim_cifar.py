"""Run the slimming search on a shared CIFAR-10 model and print base vs candidates.

    python bench/slim_cifar.py vgg_seed --runtime onnxruntime --max-latency 0.30 --max-flops 0.25 --trials 40

The job gets a wall-clock budget (``--time-budget``, default 24 minutes): the search stops at 40% of
it and each final candidate's distillation (up to ``--final-epochs``) is cut to fit the rest.

Splits: calibration/distillation = train_0 (10k), validation = first 5,000 of test.npz (the search
looks at it), held-out = last 5,000 (final figures only). Latency: median of interleaved runs, base
and candidate in the same process, on the runtime named, 2 threads, batch 1 (see report.json for the
device). Everything lands in runs/bench/<model>-<runtime>/ (summary.json, candidates/).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from search.distil import DistilSettings
from search.study import SlimConfig, run_slim

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=["vgg_seed", "resnet20"])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    parser.add_argument("--runtime", default="onnxruntime")
    parser.add_argument("--max-latency", type=float, default=0.30)
    parser.add_argument("--max-flops", type=float, default=None)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--final-epochs", type=float, default=30.0, help="at most; the time budget may cut it")
    parser.add_argument("--time-budget", type=float, default=1440.0, help="seconds for the whole job")
    parser.add_argument("--final-candidates", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    shared = Path(args.shared)
    test = np.load(shared / "data" / "cifar10" / "test.npz")
    tmp = Path(tempfile.mkdtemp())
    np.savez(tmp / "val.npz", x=test["x"][:5000], y=test["y"][:5000])
    np.savez(tmp / "holdout.npz", x=test["x"][5000:], y=test["y"][5000:])
    out = args.out or f"runs/bench/{args.model}-{args.runtime}"
    config = SlimConfig(
        model=str(shared / "models" / f"{args.model}.pt2"), out_dir=out,
        calib=str(shared / "data" / "cifar10" / "train_0.npz"), val=str(tmp / "val.npz"),
        holdout=str(tmp / "holdout.npz"), input_shape=(3, 32, 32), mean=MEAN, std=STD,
        max_flops=args.max_flops, max_latency=args.max_latency, runtime=args.runtime, threads=2, batch=1,
        trials=args.trials, final_distil=DistilSettings(epochs=args.final_epochs), time_budget_s=args.time_budget,
        final_candidates=args.final_candidates,
    )
    start = time.time()

    def progress(event: dict[str, object]) -> None:
        if event["event"] == "trial":
            print(f"[{event['t']:>7.1f}s] trial {event['number']} {event['state']} values={event['values']}",
                  file=sys.stderr, flush=True)
        else:
            print(f"[{event['t']:>7.1f}s] {event['event']}", file=sys.stderr, flush=True)

    summary = run_slim(config, progress)
    base = summary["base"]
    print(f"\n{args.model}: runtime {args.runtime}, 2 threads, batch 1; budgets latency {args.max_latency}x, "
          f"FLOPs {args.max_flops}x; {args.trials} trials at most, time budget {args.time_budget:.0f} s; "
          f"job wall time {time.time() - start:.0f} s")
    print(f"{'model':<12}{'FLOPs':>10}{'params':>11}{'ORT ms':>9}{'ORT x':>8}{'torch ms':>10}{'torch x':>9}"
          f"{'val %':>8}{'held-out %':>12}{'drop pt':>9}  plan")
    held = base["holdout_score"]
    print(f"{'base':<12}{base['flops'] / 1e6:>9.1f}M{base['params']:>11,}{'':>9}{'':>8}{'':>10}{'':>9}"
          f"{base['val_score']:>8.2f}{held if held is not None else float('nan'):>12.2f}")
    if not summary["candidates"]:
        print("no feasible trial: no candidate")
    for cand in summary["candidates"]:
        lat = {entry["runtime"]: entry for entry in cand["latency"]}
        acc = cand["accuracy"]
        ort, tch = lat.get("onnxruntime", {}), lat.get("torch", {})
        plan = " ".join(f"{k}={v['kind']}" + "".join(f"{x}" for kk, x in v.items() if kk != "kind") for k, v in cand["plan"].items())
        print(f"{'cand ' + str(cand['id']):<12}{cand['flops'] / 1e6:>9.1f}M{cand['params']:>11,}"
              f"{ort.get('latency_ms', float('nan')):>9.3f}{ort.get('ratio', float('nan')):>7.3f}x"
              f"{tch.get('latency_ms', float('nan')):>10.3f}{tch.get('ratio', float('nan')):>8.3f}x"
              f"{acc['val_accuracy']:>8.2f}{acc['holdout_accuracy']:>12.2f}"
              f"{base['holdout_score'] - acc['holdout_accuracy']:>9.2f}  {plan}")
    for cand in summary["candidates"]:
        done = (cand.get("training") or {}).get("distillation")
        if done:
            print(f"cand {cand['id']}: trial {cand['trial']}, {done['epochs']:.1f} epochs of distillation on "
                  f"{cand['training']['images']} images ({done['precision']}, {done['seconds']:.0f} s)")
    trials = summary["trials"]
    states = {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    print(f"trials: {states}; Pareto set: {summary['pareto']}")


if __name__ == "__main__":
    main()
