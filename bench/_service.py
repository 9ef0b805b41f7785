"""A running service for the benchmarks: `python -m service serve` on a free loopback port with a
fresh data folder (reachable by the sandbox user), plus extra workers on demand."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    def __init__(self, prefix: str, env: dict[str, str], workers: int) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.data_dir.chmod(0o755)
        self.env = {**os.environ, **env}
        self.port = free_port()
        self.log = (self.data_dir / "serve.log").open("ab")
        self.server = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
             "--workers", str(workers), "--log-level", "warning"],
            cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=300)
        while True:
            try:
                if self.client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

    def start_worker(self) -> None:
        self.workers.append(subprocess.Popen(
            [sys.executable, "-m", "service", "worker", "--data-dir", str(self.data_dir)],
            cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT))

    def stop(self) -> None:
        self.client.close()
        for proc in self.workers:
            proc.terminate()
        os.killpg(self.server.pid, 15)
        for proc in [*self.workers, self.server]:
            proc.wait(timeout=60)
        self.log.close()
