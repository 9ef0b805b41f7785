"""A running service for the benchmarks (``service.processes``) with a fresh data folder and an
HTTP client."""

from __future__ import annotations

from pathlib import Path

import httpx

from service.processes import ServiceProcesses, world_dir

REPO = Path(__file__).resolve().parents[1]


class Service(ServiceProcesses):
    def __init__(self, prefix: str, env: dict[str, str], workers: int) -> None:
        super().__init__(world_dir(prefix), workers, env)
        self.client = httpx.Client(base_url=self.url, timeout=300)

    def stop(self) -> None:
        self.client.close()
        super().stop()
