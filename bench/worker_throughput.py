"""Trial throughput of one job with 1 vs 2 workers sharing its study (PostgreSQL by default).

    bash scripts/postgres-test-server.sh     # Debian's PostgreSQL on loopback (as the tests use it)
    python bench/worker_throughput.py [--model vgg_seed] [--trials 12] [--threads 1] [--sqlite]

Each worker runs its trials with `--threads` intra-op threads (training and latency timing), so 2
workers x 1 thread fill a 2-core machine. Throughput is measured between the first and the last trial
of the search (setup and final distillation excluded).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
from _service import REPO, Service  # bench/ is on the path when a script here runs

sys.path.insert(0, str(REPO))  # the test databases' helper lives with the tests, outside the packages
from tests.pg import fresh_postgres  # noqa: E402


def run(workers: int, args: argparse.Namespace, shared: Path) -> tuple[float, int, str]:
    env = {"SLIMCONV_RUNTIMES": "[]", "SLIMCONV_THREADS": str(args.threads)}
    if not args.sqlite:
        env.update(fresh_postgres())
    service = Service("slimconv-tput-", env, workers=0)
    c = service.client
    try:
        model = c.post("/models", files={"file": ("m.pt2", (shared / "models" / f"{args.model}.pt2").read_bytes())},
                       data={"input_shape": "3,32,32", "mean": "0.4914,0.4822,0.4465",
                             "std": "0.2470,0.2435,0.2616"}).json()
        train = np.load(shared / "data" / "cifar10" / "train_0.npz")
        buf = io.BytesIO()
        np.savez(buf, x=train["x"][:1000], y=train["y"][:1000])
        data = c.post("/datasets", files={"file": ("d.npz", buf.getvalue())}).json()
        job = c.post("/jobs", json={"model_id": model["id"], "calib_dataset_id": data["id"],
                                    "val_dataset_id": data["id"], "trials": args.trials, "max_workers": workers,
                                    "runtime": "onnxruntime", "threads": args.threads, "max_latency_ratio": 0.6,
                                    "trial_images": 500, "trial_epochs": 1, "final_epochs": 0, "final_candidates": 1,
                                    "eval_runtimes": ["onnxruntime"], "blocks": ["ds", "ss"]}).json()
        for _ in range(workers):
            service.start_worker()
        first = last = None
        while True:
            j = c.get(f"/jobs/{job['id']}").json()
            done = j["progress"]["trials_done"]
            if done >= 1 and first is None:
                first = (time.time(), done)
            if done >= args.trials and last is None:
                last = (time.time(), done)
            if j["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.25)
        assert first and last and j["status"] == "succeeded", j
        trials = c.get(f"/jobs/{job['id']}/trials").json()["items"]
        processes = {t["user_attrs"].get("process") for t in trials if t["state"] == "COMPLETE"}
        rate = (last[1] - first[1]) / (last[0] - first[0]) * 60
        return rate, len(processes), j["status"]
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--model", default="vgg_seed", choices=["vgg_seed", "resnet20"])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    args = parser.parse_args()
    storage = "SQLite" if args.sqlite else "PostgreSQL (loopback)"
    print(f"{args.model}, {args.trials} trials, {storage}, {args.threads} thread(s) per worker, {os.cpu_count()} cores")
    rates = {}
    for workers in (1, 2):
        rate, processes, status = run(workers, args, Path(args.shared))
        rates[workers] = rate
        print(f"{workers} worker(s): {rate:.2f} trials/min (processes that ran trials: {processes}, job {status})")
    print(f"speed-up with 2 workers: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
