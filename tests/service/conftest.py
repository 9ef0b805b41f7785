"""A real service for the tests: ``python -m service serve`` on loopback, real worker processes, real SQLite."""

from __future__ import annotations

import io
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service import processes
from service.processes import ServiceProcesses

__all__ = ["REPO", "TINY_JOB", "Server", "listing", "npz_bytes", "png_zip", "upload_inputs", "world_dir"]

REPO = Path(__file__).resolve().parents[2]
_WORLDS: list[Path] = []


def world_dir(prefix: str) -> Path:
    """``service.processes.world_dir``, removed when the test session ends (kept if a test failed:
    its ``serve.log`` and database tell what happened)."""
    path = processes.world_dir(prefix)
    _WORLDS.append(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _remove_worlds(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not request.session.testsfailed:
        for path in _WORLDS:
            shutil.rmtree(path, ignore_errors=True)


class Server(ServiceProcesses):
    """The API (and its workers) as separate processes, with the tests' short heartbeats and polls,
    plus an HTTP client."""

    def __init__(self, data_dir: Path, workers: int = 1, env: dict[str, str] | None = None) -> None:
        super().__init__(data_dir, workers, {"SLIMCONV_RUNTIMES": '["onnxruntime"]', "SLIMCONV_HEARTBEAT_S": "0.5",
                                             "SLIMCONV_POLL_S": "0.3", **(env or {})})
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def wait_job(self, job_id: str, timeout: float = 600, until: Callable[[dict[str, Any]], bool] | None = None
                 ) -> dict[str, Any]:
        done = until or (lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
        deadline = time.time() + timeout
        while True:
            reply = self.client.get(f"/jobs/{job_id}")
            assert reply.status_code == 200, f"GET /jobs/{job_id}: {reply.status_code} {reply.text[:500]}\n{self.traceback()}"
            job = reply.json()
            if done(job):
                return job
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id}: {job}\n{self.log_tail()}")
            time.sleep(0.3)

    def traceback(self) -> str:
        """The last traceback in ``serve.log`` (uvicorn logs an unhandled error's there), else its tail."""
        text = (self.data_dir / "serve.log").read_text(errors="replace")
        at = text.rfind("Traceback")
        return text[at:at + 6000] if at >= 0 else self.log_tail()

    def stop(self) -> None:
        self.client.close()
        super().stop()


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


def upload_inputs(server: Server, zoo_pt2: Callable[[str], bytes], images: int = 64) -> dict[str, str]:
    """Upload tiny_vgg and ``images`` labelled 16x16 images: the ids a job request names."""
    c = server.client
    res = c.post("/models", files={"file": ("m.pt2", zoo_pt2("tiny_vgg"))}, data={"input_shape": "3,16,16"})
    assert res.status_code == 201, res.text
    data = c.post("/datasets", files={"file": ("d.npz", npz_bytes(images))}).json()
    return {"model_id": res.json()["id"], "calib_dataset_id": data["id"], "val_dataset_id": data["id"]}


TINY_JOB = {"blocks": ["ds", "ss"], "trials": 3, "trial_epochs": 0.1, "trial_images": 64, "final_epochs": 0.2,
            "final_candidates": 1, "latency_rounds": 2, "latency_runs": 5, "latency_warmup": 2,
            "final_timing_repeats": 1, "eval_runtimes": ["onnxruntime"], "runtime": "onnxruntime", "threads": 1}
