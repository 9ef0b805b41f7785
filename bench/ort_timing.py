"""How onnxruntime latency ratios depend on the way they are timed, on this machine.

    python bench/ort_timing.py [--shared ../shared] [--repeats 3]

Fixed vgg_seed plans (first conv kept; SVD + least-squares weights), exported as the search exports
them for timing (TorchScript exporter, batch 1); onnxruntime CPU, 2 intra-op threads, batch 1; ratio
of medians to the base, per repeat. Three ways:

- alone: each model in its own process, one session, onnxruntime's defaults (spin-waiting on),
  200 warm-up runs, median of 1,000. This is what a user's process sees; too slow for a search.
- interleaved, spin-waiting on: how the search times (``LatencySpec`` default): all sessions in one
  process, 7 rounds x 30 runs, each model's turn after a 20 ms pause and 20 ms of untimed runs.
- interleaved, spin-waiting off, no pause: how the search timed before.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _vgg import parse_and_load  # bench/ is on the path when a script here runs

from search import BlockChoice, BlockFitter, apply_plan
from search._latency_child import SETTLE_S, _cpu_name, _ort_runner, _ort_session, _time_interleaved
from search.export import export_onnx

ALONE = """
import statistics, sys, time
import numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = 2
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
for _ in range(200):
    session.run(None, feed)
times = []
for _ in range(1000):
    start = time.perf_counter()
    session.run(None, feed)
    times.append(time.perf_counter() - start)
print(statistics.median(times) * 1000)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
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
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    print(f"onnxruntime, CPU ({_cpu_name()}), 2 threads, batch 1; ratio of medians to the base, per repeat")

    def alone() -> list[float]:
        return [float(subprocess.run([sys.executable, "-c", ALONE, str(p)], capture_output=True, text=True,
                                     check=True).stdout) for p in paths]

    def interleaved(spinning: bool) -> list[float]:
        fns = [_ort_runner(_ort_session(str(p), 2, spinning), x) for p in paths]
        samples = _time_interleaved(fns, 50, 30, 7, SETTLE_S if spinning else 0.0)
        return [statistics.median(s) for s in samples]

    ways = {
        "alone, own process, spin-waiting on": alone,
        "interleaved, spin-waiting on, 20 ms pause + 20 ms untimed (search)": lambda: interleaved(True),
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
