from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from search.study import VERIFY_MEASUREMENTS


def test_slim_command_writes_the_run_folder(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "search", "zoo", "tiny_vgg", "--out", str(tmp_path / "m.pt2")], check=True,
                   capture_output=True)
    rng = np.random.default_rng(0)
    for name in ("calib", "val"):
        np.savez(tmp_path / f"{name}.npz", x=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8),
                 y=rng.integers(0, 10, 40).astype(np.uint8))
    args = [sys.executable, "-m", "search", "slim", str(tmp_path / "m.pt2"), "--input-shape", "3,16,16",
            "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--calib", str(tmp_path / "calib.npz"),
            "--val", str(tmp_path / "val.npz"), "--max-flops", "0.8", "--max-latency", "4", "--runtime",
            "onnxruntime", "--threads", "1", "--batch", "1", "--trials", "3", "--blocks", "ds,ss",
            "--trial-images", "32", "--trial-epochs", "0.5", "--final-epochs", "0.5", "--final-mixup", "0.3", "--final-lr", "2e-3",
            "--final-candidates", "2", "--latency-steps", "3.5", "--final-timing-repeats", "2",
            "--out", str(tmp_path / "run")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "candidate 0" in proc.stdout and "over 2 timings" in proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["trials"]) >= 3 and (tmp_path / "run" / "study.db").exists()
    assert summary["config"]["final_distil"]["mixup"] == 0.3 and summary["config"]["trial_distil"]["mixup"] == 0.0
    assert summary["config"]["final_distil"]["lr"] == 2e-3 and summary["config"]["trial_distil"]["lr"] == 1e-3
    assert summary["config"]["final_timing_repeats"] == 2 and summary["candidates"][0]["latency"][0]["repeats"] == 2
    assert summary["config"]["latency_steps"] == [3.5]
    # The tiny net's plans verify well under the 3.5x step: each candidate is held to it.
    budget = summary["candidates"][0]["latency_budget"]
    assert budget["max_latency"] == 3.5 and budget["job_max_latency"] == 4
    assert budget["ratio"] == summary["candidates"][0]["latency"][0]["ratio"]
    assert budget["within"] is (budget["ratio"] <= 3.5) and budget["verified_in_search"] is not None
    assert budget["verified_timings"] >= VERIFY_MEASUREMENTS  # how many timings that median is of
    bad = subprocess.run([*args[:-2], "--out", str(tmp_path / "run2"), "--max-flops", "0.001"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "smallest reachable" in bad.stderr
    for steps, says in (("4.5", "latency_steps must be under"), ("0.5,x", "comma-separated numbers"),
                        ("0.5,0.4", "final_candidates")):
        bad = subprocess.run([*args[:-2], "--out", str(tmp_path / "run3"), "--latency-steps", steps],
                             capture_output=True, text=True, timeout=600)
        assert bad.returncode == 2 and says in bad.stderr, (steps, bad.stderr[-500:])
        assert not (tmp_path / "run3").exists()  # refused before anything was written
