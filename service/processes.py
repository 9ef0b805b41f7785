"""The service as real processes on loopback: ``python -m service serve`` on a free port (its own
process group, with its workers) plus extra ``python -m service worker`` processes on demand. The
tests and the benchmarks drive it over HTTP; nothing here is used by the service itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""Where ``service`` is a package: the processes start there, so ``-m service`` finds this copy."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def world_dir(prefix: str) -> Path:
    """A fresh data folder the sandbox user (nobody, when run as root) can reach."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


class ServiceProcesses:
    """``serve`` with ``workers`` workers on ``data_dir``; returns once ``/healthz`` answers 200.

    Both write to ``data_dir/serve.log``. ``env`` is added to this process's environment.

    Raises:
        RuntimeError: ``serve`` exited, or did not answer within ``start_timeout_s``.
    """

    def __init__(self, data_dir: Path, workers: int = 1, env: dict[str, str] | None = None,
                 start_timeout_s: float = 90.0) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.log = (data_dir / "serve.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(self.port), "--data-dir", str(data_dir),
             "--workers", str(workers), "--log-level", "warning"],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers: list[subprocess.Popen[bytes]] = []
        deadline = time.time() + start_timeout_s
        while not self._healthy():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log_tail()}")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as res:
                return bool(res.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def start_worker(self, **env: str) -> subprocess.Popen[bytes]:
        """One more worker process on the same data folder (``env`` added to the service's)."""
        proc = subprocess.Popen([sys.executable, "-m", "service", "worker", "--data-dir", str(self.data_dir)],
                                cwd=ROOT, env={**self.env, **env}, stdout=self.log, stderr=subprocess.STDOUT)
        self.workers.append(proc)
        return proc

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return (self.data_dir / "serve.log").read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGTERM to the extra workers and to ``serve``'s process group; SIGKILL after 30 s."""
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
                proc.wait()
        self.log.close()
