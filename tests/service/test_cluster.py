"""Several workers on one database (SQLite, and PostgreSQL where a server is up): jobs spread over workers,
one job's trials shared by two workers through its study, and a worker killed mid-job.

PostgreSQL: `.ci/run` installs Debian's server, starts it on loopback and creates the role and the two
databases named by SLIMCONV_TEST_PG (default below); without a reachable server these cases skip.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from tests.pg import TEST_PG, fresh_postgres
from tests.service.conftest import TINY_JOB, Server, upload_inputs, world_dir

PG = os.environ.get("SLIMCONV_TEST_PG", TEST_PG)


def _pg_reachable() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG.replace("+psycopg", ""), connect_timeout=3):
            return True
    except Exception:  # noqa: BLE001 - any failure: no server
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def cluster(request) -> Iterator[Server]:
    env = {"SLIMCONV_STALE_AFTER_S": "4"}
    if request.param == "postgresql":
        if not _pg_reachable():
            pytest.skip(f"no PostgreSQL server at {PG}")
        env.update(fresh_postgres(PG))
    server = Server(world_dir(f"slimconv-{request.param}-"), workers=0, env=env)
    yield server
    server.stop()


HELPER_WAIT_S = 240
"""Seconds the owner of the shared job is held back at most, waiting for the helper's first trial."""
PAUSE_S = 15
"""Seconds the owner is paused at a time."""
RESUME_S = 0.5
"""Seconds it runs between pauses: to finish a database transaction a pause caught it in."""


def _wait_trial(server: Server, job_id: str, process: Callable[[str], bool], timeout: float) -> str | None:
    """The ``process`` of the job's first measured trial whose process passes ``process`` (None if none
    came within ``timeout`` seconds, or the job ended first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = [t["user_attrs"]["process"] for t in _measured(server.client.get(f"/jobs/{job_id}/trials").json()["items"])
                 if process(t["user_attrs"]["process"])]
        if found:
            return found[0]
        if server.client.get(f"/jobs/{job_id}").json()["status"] in ("succeeded", "failed", "cancelled"):
            return None
        time.sleep(0.2)
    return None


def _measured(trials: list[dict]) -> list[dict]:
    return [t for t in trials if "duplicate_of" not in t["user_attrs"] and (
            t["state"] == "COMPLETE" or (t["state"] == "PRUNED" and not t["user_attrs"].get("screened")))]


def _pid(process: str) -> int:
    """The process id in a trial's ``process`` attribute ("host:pid", " (helper)" after a helper's)."""
    return int(process.split(" ")[0].rsplit(":", 1)[1])


def test_two_jobs_and_a_shared_job(cluster: Server, zoo_pt2: Callable[[str], bytes]) -> None:
    c = cluster.client
    ids = upload_inputs(cluster, zoo_pt2)
    cluster.start_worker()
    cluster.start_worker()
    # One job whose trials both workers share: the idle worker joins it once its search starts. Left
    # to race, the owner could finish every trial before the helper's process was up (all 24 trials
    # of a 24-trial job once in CI), so after its first trial the owner's job process is paused
    # (SIGSTOP) until the helper has finished one, HELPER_WAIT_S at most. A pause that catches the
    # owner inside a database transaction holds the helper up as well (in one SQLite run with a single
    # 180 s pause, three helper processes in a row began no trial, and the next began one 0.4 s after
    # the owner was resumed), so the owner runs on for RESUME_S every PAUSE_S.
    # The owner's trial goes stale while it is paused and is failed by the helper; its slot runs again.
    shared = c.post("/jobs", json={**ids, **TINY_JOB, "trials": 12, "trial_images": 128, "trial_epochs": 0.5,
                                   "max_workers": 2, "seed": 7}).json()["id"]
    first = _wait_trial(cluster, shared, lambda p: "helper" not in p, timeout=300)
    assert first, ("the shared job's owner finished no trial", cluster.log_tail())
    owner = _pid(first)
    helped = None
    deadline = time.time() + HELPER_WAIT_S
    while helped is None and time.time() < deadline:
        time.sleep(RESUME_S)
        os.kill(owner, signal.SIGSTOP)
        try:
            helped = _wait_trial(cluster, shared, lambda p: "helper" in p, timeout=PAUSE_S)
        finally:
            os.kill(owner, signal.SIGCONT)
    assert helped, ("the helper finished no trial while the owner was paused", cluster.log_tail())
    cluster.wait_job(shared, timeout=600)
    # ... then two jobs at once, one per worker.
    solo = [c.post("/jobs", json={**ids, **TINY_JOB, "trials": 3, "seed": i}).json()["id"] for i in range(2)]
    for job_id in [shared, *solo]:
        job = cluster.wait_job(job_id, timeout=600)
        assert job["status"] == "succeeded", (job["error"], job["progress"], cluster.log_tail())
        trials = c.get(f"/jobs/{job_id}/trials").json()["items"]
        numbers = [t["number"] for t in trials]
        assert len(numbers) == len(set(numbers)), "a trial number twice"
        assert len(_measured(trials)) == job["progress"]["trials_planned"] == job["progress"]["trials_done"]
        assert job["attempts"] == 1
    trials = c.get(f"/jobs/{shared}/trials").json()["items"]
    processes = {t["user_attrs"]["process"] for t in _measured(trials)}
    assert any("helper" in p for p in processes) and any("helper" not in p for p in processes), processes
    metrics = c.get("/metrics").text
    assert 'slimconv_jobs{status="succeeded"} 3' in metrics
    assert "slimconv_worker_heartbeat_age_seconds{" in metrics
    assert "slimconv_trials_completed_total " in metrics


def test_worker_killed_the_other_finishes(cluster: Server, zoo_pt2: Callable[[str], bytes]) -> None:
    c = cluster.client
    ids = upload_inputs(cluster, zoo_pt2)
    job_id = c.post("/jobs", json={**ids, **TINY_JOB, "trials": 8, "max_workers": 2}).json()["id"]
    first = cluster.start_worker()
    cluster.wait_job(job_id, timeout=300, until=lambda j: j["status"] == "running")
    cluster.start_worker()
    cluster.wait_job(job_id, timeout=300, until=lambda j: j["progress"]["trials_done"] >= 2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    job = cluster.wait_job(job_id, timeout=600)
    assert job["status"] == "succeeded", job
    trials = c.get(f"/jobs/{job_id}/trials").json()["items"]
    numbers = [t["number"] for t in trials]
    assert len(numbers) == len(set(numbers))
    assert len(_measured(trials)) == 8
