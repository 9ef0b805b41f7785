"""A real service for the tests: ``python -m service serve`` on loopback, real worker processes, real SQLite."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def world_dir(prefix: str) -> Path:
    """A data folder the sandbox user (nobody, when tests run as root) can reach."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


class Server:
    """The API (and its workers) as separate processes, plus extra workers on demand."""

    def __init__(self, data_dir: Path, workers: int = 1, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "SLIMCONV_RUNTIMES": '["onnxruntime"]', "SLIMCONV_HEARTBEAT_S": "0.5",
                    "SLIMCONV_POLL_S": "0.3", **(env or {})}
        self.log = (data_dir / "serve.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(self.port), "--data-dir", str(data_dir),
             "--workers", str(workers), "--log-level", "warning"],
            cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.client = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.time() + 90
        while True:
            try:
                if self.client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start:\n{(data_dir / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.2)

    def start_worker(self, **env: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "service", "worker", "--data-dir", str(self.data_dir)],
                                cwd=REPO, env={**self.env, **env}, stdout=self.log, stderr=subprocess.STDOUT)
        self.workers.append(proc)
        return proc

    def wait_job(self, job_id: str, timeout: float = 600, until: Callable[[dict[str, Any]], bool] | None = None
                 ) -> dict[str, Any]:
        done = until or (lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
        deadline = time.time() + timeout
        while True:
            job = self.client.get(f"/jobs/{job_id}").json()
            if done(job):
                return job
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id}: {job}\n{(self.data_dir / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        self.client.close()
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        for proc in [*self.workers, self.proc]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.log.close()


def npz_bytes(n: int, size: int = 16, labels: bool = True, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    if labels:
        np.savez(buf, x=x, y=rng.integers(0, 10, size=n))
    else:
        np.savez(buf, x=x)
    return buf.getvalue()


def png_zip(classes: dict[str, int], size: int = 16, sizes: list[int] | None = None) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        k = 0
        for cls, count in classes.items():
            for i in range(count):
                side = sizes[k] if sizes else size
                img = Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8))
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                z.writestr(f"{cls}/{i}.png", buf.getvalue())
                k += 1
    return out.getvalue()


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = Server(world_dir("slimconv-test-"), workers=1, env={"SLIMCONV_MAX_UPLOAD_BYTES": str(3 << 20)})
    yield srv
    srv.stop()


TINY_JOB = {"blocks": ["ds", "ss"], "trials": 3, "trial_epochs": 0.1, "trial_images": 64, "final_epochs": 0.2,
            "final_candidates": 1, "latency_rounds": 2, "latency_runs": 5, "latency_warmup": 2,
            "eval_runtimes": ["onnxruntime"], "runtime": "onnxruntime", "threads": 1}
