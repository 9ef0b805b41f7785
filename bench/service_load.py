"""Service figures: upload time of vgg_seed.pt2 (analysis included, latency measured later by a worker),
and GET /jobs/{id} latency under 20 concurrent polling clients while a job runs.

    python bench/service_load.py [--shared ../shared] [--clients 20] [--seconds 30] [--interval 0.5]

Starts `python -m service serve` (one worker, SQLite) on a free loopback port with a fresh data
folder, like the README's first command. Times are wall-clock on this machine, printed with it.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from _service import REPO, Service  # bench/ is on the path when a script here runs


def npz(x: np.ndarray, y: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    return buf.getvalue()


def load(port: int, job_id: str, client: httpx.Client, clients: int, seconds: float, interval: float) -> None:
    """``clients`` threads each GET /jobs/{id}, waiting ``interval`` s between requests (0: back to back)."""
    latencies: list[float] = []
    errors: list[str] = []
    stop = time.perf_counter() + seconds
    lock = threading.Lock()

    def poll(offset: float) -> None:
        time.sleep(offset)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = c.get(f"/jobs/{job_id}")
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if r.status_code != 200:
                        errors.append(str(r.status_code))
                if interval:
                    time.sleep(max(0.0, interval - dt))

    threads = [threading.Thread(target=poll, args=(interval * i / clients,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = client.get(f"/jobs/{job_id}").json()
    latencies.sort()

    def q(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    how = f"each polling every {interval:g} s" if interval else "back to back (saturation)"
    print(f"GET /jobs/{{id}}: {clients} clients {how}, {seconds:.0f} s, while the job ran "
          f"(phase '{status['progress']['phase']}', {status['progress']['trials_done']} trials done): "
          f"{len(latencies)} requests ({len(latencies) / seconds:.0f}/s), {len(errors)} errors, "
          f"p50 {q(0.5):.1f} ms, p99 {q(0.99):.1f} ms, max {latencies[-1] * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--uploads", type=int, default=5)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between one client's polls")
    args = parser.parse_args()
    shared = Path(args.shared)
    service = Service("slimconv-bench-", {"SLIMCONV_RUNTIMES": '["onnxruntime"]'}, workers=1)
    client, port = service.client, service.port
    try:
        model_bytes = (shared / "models" / "vgg_seed.pt2").read_bytes()
        times = []
        model = {}
        for i in range(args.uploads):
            start = time.perf_counter()
            res = client.post("/models", files={"file": ("vgg_seed.pt2", model_bytes)},
                              data={"input_shape": "3,32,32", "name": f"vgg {i}",
                                    "mean": "0.4914,0.4822,0.4465", "std": "0.2470,0.2435,0.2616"})
            times.append(time.perf_counter() - start)
            assert res.status_code == 201, res.text
            model = res.json()
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
        print(f"upload vgg_seed.pt2 ({len(model_bytes) / 1e6:.1f} MB) incl. analysis, excl. latency: "
              f"first {times[0]:.3f} s (starts the sandbox process), then median {statistics.median(times[1:]):.3f} s, "
              f"max {max(times[1:]):.3f} s over {len(times) - 1}")
        train = np.load(shared / "data" / "cifar10" / "train_0.npz")
        test = np.load(shared / "data" / "cifar10" / "test.npz")
        calib = client.post("/datasets", files={"file": ("calib.npz", npz(train["x"][:2000], train["y"][:2000]))}).json()
        val = client.post("/datasets", files={"file": ("val.npz", npz(test["x"][:1000], test["y"][:1000]))}).json()
        job = client.post("/jobs", json={"model_id": model["id"], "calib_dataset_id": calib["id"],
                                         "val_dataset_id": val["id"], "max_latency_ratio": 0.5, "trials": 200,
                                         "runtime": "onnxruntime", "threads": 1, "final_epochs": 0,
                                         "trial_images": 500}).json()
        job_id = job["id"]
        while client.get(f"/jobs/{job_id}").json()["status"] == "queued":
            time.sleep(0.2)
        for interval in (args.interval, 0.0):
            load(port, job_id, client, args.clients, args.seconds, interval)
        client.post(f"/jobs/{job_id}/cancel")
    finally:
        service.stop()


if __name__ == "__main__":
    main()
