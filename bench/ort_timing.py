"""How onnxruntime latency ratios depend on the way they are timed, on this machine.

    python bench/ort_timing.py [--shared ../shared] [--repeats 3] [--drift SECONDS]

Fixed vgg_seed plans (first conv kept; SVD + least-squares weights), exported as the search exports
them for timing (TorchScript exporter, batch 1); onnxruntime CPU, 2 intra-op threads, batch 1; ratio
of medians to the base, per repeat. Three ways:

- alone: each model in its own process, one session, onnxruntime's defaults (spin-waiting on),
  200 warm-up runs, median of 1,000. This is what a user's process sees; too slow for a search.
- interleaved, spin-waiting on, spinning stopped after each Run: how the search times (``LatencySpec``
  default): all sessions in one process, 7 rounds x 30 runs, each session with
  ``session.force_spinning_stop``, so a pool parks its threads when its Run returns.
- interleaved, spin-waiting on, each model's turn after a 20 ms pause and 20 ms of untimed runs: how
  the search timed from 2026-11-23 to 2026-12-04 (pools left spinning after their turn).
- interleaved, spin-waiting off, no pause: how the search timed before.

With ``--drift SECONDS`` it shows instead how one process's latency moves over time: each model alone
in its own process for SECONDS, timed in blocks of 100 runs; per model the 10th, 50th and 90th
percentile of the block medians, and the share of blocks within 15 % of the 10th percentile (the
"fast" share). A share far from 100 % means the machine switches between a fast and a slow state, and
a median over a short window (a search trial's timing) lands on either: on a 2-core EPYC VM a small
vgg_seed candidate's blocks sat near 0.29 ms or near 0.50 ms (a 2-thread and a 1-thread speed) while
the base stayed within 1.6-2.0 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _vgg import parse_and_load  # bench/ is on the path when a script here runs

from search import BlockChoice, BlockFitter, apply_plan
from search._latency_child import _cpu_name, _ort_runner, _ort_session, _time_interleaved
from search.export import export_onnx

SOLO = """
import json, statistics, sys, time
import numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = 2
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
for _ in range(200):
    session.run(None, feed)


def median_ms(runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


if len(sys.argv) < 3:  # alone: the median of 1,000 runs
    print(median_ms(1000))
else:  # drift: the medians of blocks of 100 runs for sys.argv[2] seconds
    end = time.time() + float(sys.argv[2])
    blocks = []
    while time.time() < end:
        blocks.append(median_ms(100))
    print(json.dumps(blocks))
"""


def drift(names: list[str], paths: list[Path], seconds: float) -> None:
    print(f"each model alone for {seconds:.0f} s, blocks of 100 runs: block medians p10 / p50 / p90 ms, "
          "share of blocks within 15 % of p10, ratio to the base at p10 and p50")
    low = mid = 1.0
    for i, (name, path) in enumerate(zip(names, paths, strict=True)):
        out = subprocess.run([sys.executable, "-c", SOLO, str(path), str(seconds)], capture_output=True, text=True,
                             check=True).stdout
        blocks = np.array(json.loads(out))
        p10, p50, p90 = np.percentile(blocks, [10, 50, 90])
        if i == 0:
            low, mid = p10, p50
        fast = float(np.mean(blocks <= 1.15 * p10))
        print(f"  {name:12s} {p10:.3f} / {p50:.3f} / {p90:.3f} ms  fast {fast:4.0%}  "
              f"ratio {p10 / low:.3f} (p10)  {p50 / mid:.3f} (p50)  [{len(blocks)} blocks]", flush=True)


def paused(paths: list[Path], x: np.ndarray, pause_s: float = 0.02) -> list[float]:
    """Medians of interleaved default sessions (pools left spinning after their turn), each turn
    after a pause and untimed runs of ``pause_s`` each, 50 warm-up runs, 7 rounds x 30 runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]
    fns = [_ort_runner(s, x) for s in sessions]
    _time_interleaved(fns, 50, 1, 1)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(7):
        for fn, out in zip(fns, samples, strict=True):
            time.sleep(pause_s)
            start, n = time.perf_counter(), 0
            while n < 3 or time.perf_counter() - start < pause_s:
                fn()
                n += 1
            out += _time_interleaved([fn], 0, 30, 1)[0]
    return [statistics.median(s) for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--drift", type=float, default=0.0, metavar="SECONDS",
                        help="time each model alone for this long in blocks, instead of the three ways")
    args, data = parse_and_load(parser, threads=False)
    base, sites = data.base, data.sites
    fitter = BlockFitter(base.module, sites, data.calib_x[:256])
    rest = sites[1:]
    plans = {
        "base": {},
        "ss r=cout/2": {s.name: BlockChoice("ss", rank=s.out_channels // 2) for s in rest},
        "ss r=cout/4": {s.name: BlockChoice("ss", rank=s.out_channels // 4) for s in rest},
        "ss r=cout/8": {s.name: BlockChoice("ss", rank=s.out_channels // 8) for s in rest},
        "ds m=1": {s.name: BlockChoice("ds", depth_multiplier=1) for s in rest},
    }
    tmp = Path(tempfile.mkdtemp())
    paths = [export_onnx(apply_plan(base.module, plan, fitter), tmp / f"m{i}.onnx", (3, 32, 32), fast=True, batch=1)
             for i, plan in enumerate(plans.values())]
    if args.drift > 0:
        print(f"onnxruntime, CPU ({_cpu_name()}), 2 threads, batch 1")
        drift(list(plans), paths, args.drift)
        return
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    print(f"onnxruntime, CPU ({_cpu_name()}), 2 threads, batch 1; ratio of medians to the base, per repeat")

    def alone() -> list[float]:
        return [float(subprocess.run([sys.executable, "-c", SOLO, str(p)], capture_output=True, text=True,
                                     check=True).stdout) for p in paths]

    def interleaved(spinning: bool) -> list[float]:
        fns = [_ort_runner(_ort_session(str(p), 2, spinning), x) for p in paths]
        return [statistics.median(s) for s in _time_interleaved(fns, 50, 30, 7)]

    ways = {
        "alone, own process, spin-waiting on": alone,
        "interleaved, spin-waiting on, spinning stopped after each Run (search)": lambda: interleaved(True),
        "interleaved, spin-waiting on, 20 ms pause + 20 ms untimed (search until 2026-12-04)": lambda: paused(paths, x),
        "interleaved, spin-waiting off": lambda: interleaved(False),
    }
    for title, way in ways.items():
        print(title + ":")
        rows = []
        for _ in range(args.repeats):
            medians = way()
            rows.append([m / medians[0] for m in medians[1:]])
            print("  " + "  ".join(f"{name} {r:.3f}" for name, r in zip(list(plans)[1:], rows[-1], strict=True))
                  + f"  (base {medians[0]:.3f} ms)", flush=True)
        cols = np.array(rows)
        print("  mean ± sd: " + "  ".join(f"{name} {cols[:, i].mean():.3f} ± {cols[:, i].std():.3f}"
                                           for i, name in enumerate(list(plans)[1:])))


if __name__ == "__main__":
    main()
