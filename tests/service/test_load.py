"""4 jobs at once on SQLite with 2 workers, 20 clients polling: no 'database is locked', no lost trial."""

from __future__ import annotations

import threading
from collections.abc import Callable

from tests.service.conftest import TINY_JOB, Server, upload_inputs, world_dir


def test_four_jobs_two_workers_twenty_clients(zoo_pt2: Callable[[str], bytes]) -> None:
    server = Server(world_dir("slimconv-load-"), workers=2)
    try:
        c = server.client
        inputs = upload_inputs(server, zoo_pt2, images=48)
        ids = [c.post("/jobs", json={**inputs, **TINY_JOB, "seed": i}).json()["id"] for i in range(4)]
        statuses: list[int] = []
        stop = threading.Event()
        lock = threading.Lock()

        def poll(k: int) -> None:
            import httpx

            with httpx.Client(base_url=server.url, timeout=60) as client:
                i = k
                while not stop.is_set():
                    code = client.get(f"/jobs/{ids[i % 4]}").status_code
                    with lock:
                        statuses.append(code)
                    i += 1
                    stop.wait(0.05)

        threads = [threading.Thread(target=poll, args=(k,)) for k in range(20)]
        for t in threads:
            t.start()
        try:
            jobs = [server.wait_job(job_id, timeout=900) for job_id in ids]
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert all(j["status"] == "succeeded" for j in jobs), [j["status"] for j in jobs]
        assert len(statuses) > 100 and set(statuses) == {200}
        for job in jobs:
            trials = c.get(f"/jobs/{job['id']}/trials").json()["items"]
            numbers = [t["number"] for t in trials]
            assert len(numbers) == len(set(numbers))
            measured = [t for t in trials if t["state"] == "COMPLETE"
                        or (t["state"] == "PRUNED" and not t["user_attrs"].get("screened"))]
            assert len(measured) == 3 == job["progress"]["trials_done"]
        log = (server.data_dir / "serve.log").read_text(errors="replace")
        assert "database is locked" not in log
        workers = {j["id"]: None for j in jobs}
        assert len(workers) == 4
    finally:
        server.stop()
