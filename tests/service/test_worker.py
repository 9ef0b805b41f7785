"""Workers: a job survives the SIGKILL of its worker; a new worker resumes its study without redoing trials."""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from collections.abc import Callable

from search import SlimConfig
from search.cli import build_parser
from search.distil import DistilSettings
from search.study import FAR_PLAN_LR
from service.db import JobRow, ModelRow, make_engine, now, session_factory
from service.schemas import JobIn
from tests.service.conftest import TINY_JOB, Server, upload_inputs, world_dir


def test_killed_worker_job_is_resumed(zoo_pt2: Callable[[str], bytes]) -> None:
    server = Server(world_dir("slimconv-kill-"), workers=0, env={"SLIMCONV_STALE_AFTER_S": "3"})
    try:
        c = server.client
        body = {**upload_inputs(server, zoo_pt2), **TINY_JOB, "trials": 8}
        job_id = c.post("/jobs", json=body).json()["id"]
        first = server.start_worker()
        server.wait_job(job_id, timeout=300, until=lambda j: j["progress"]["trials_done"] >= 2)
        before = {t["number"]: t for t in c.get(f"/jobs/{job_id}/trials").json()["items"] if t["state"] == "COMPLETE"}
        assert before
        first.send_signal(signal.SIGKILL)
        first.wait()
        job = c.get(f"/jobs/{job_id}").json()
        assert job["status"] == "running"  # nobody knows yet
        deadline = time.time() + 10
        while [p for p in os.listdir("/proc") if p.isdigit() and _is_job_child(p, job_id)]:
            assert time.time() < deadline, "the job process outlived its worker"
            time.sleep(0.2)
        server.start_worker()
        job = server.wait_job(job_id, timeout=400)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        trials = c.get(f"/jobs/{job_id}/trials").json()["items"]
        numbers = [t["number"] for t in trials]
        assert len(numbers) == len(set(numbers))
        after = {t["number"]: t for t in trials}
        for number, trial in before.items():  # kept, not redone
            assert after[number]["state"] == "COMPLETE"
            assert after[number]["values"] == trial["values"]
        # What counts against the budget: measured, and not a repeat of a measured plan (a trial whose
        # plan was measured before takes that outcome, is marked duplicate_of and does not count).
        measured = [t for t in trials if "duplicate_of" not in t["user_attrs"] and (
                    t["state"] == "COMPLETE" or (t["state"] == "PRUNED" and not t["user_attrs"].get("screened")))]
        assert len(measured) == 8 == job["progress"]["trials_done"], [(t["number"], t["state"]) for t in trials]
    finally:
        server.stop()


def test_a_job_stored_by_an_older_version_runs_at_todays_defaults(zoo_pt2: Callable[[str], bytes]) -> None:
    server = Server(world_dir("slimconv-old-"), workers=0)
    try:
        c = server.client
        job_id = c.post("/jobs", json={**upload_inputs(server, zoo_pt2, images=32), **TINY_JOB, "trials": 2,
                                       "final_lr": 2e-3, "final_mixup": 0.3, "seed": 5}).json()["id"]
        gone = ("final_lr", "final_mixup", "seed", "max_workers", "time_budget_s", "max_latency_ms")
        with session_factory(make_engine(f"sqlite:///{server.data_dir / 'slimconv.db'}")).begin() as session:
            row = session.get(JobRow, job_id)
            row.request = {k: v for k, v in row.request.items() if k not in gone}  # as stored before these existed
        assert not set(gone) & set(c.get(f"/jobs/{job_id}").json()["request"])
        server.start_worker()
        job = server.wait_job(job_id, timeout=300)
        assert job["status"] == "succeeded", job
        report = c.get(job["candidates"][0]["downloads"]["report"]).json()
        settings = report["training"]["settings"]
        assert settings["mixup"] == 0.0  # and the learning rate by today's rule, not the 2e-3 asked then
        assert settings["lr"] == (FAR_PLAN_LR if report["training"]["lr_from"] == "far plan" else DistilSettings.lr)
    finally:
        server.stop()


def test_a_job_through_the_api_and_the_cli_default_to_the_same_settings() -> None:
    # Each default is written once, in search (SlimConfig, TRIAL_EPOCHS, FINAL_EPOCHS, DistilSettings);
    # the Literal-typed ones JobIn must spell out are checked here.
    args = build_parser().parse_args(["slim", "m.pt2", "--calib", "c.npz", "--val", "v.npz", "--out", "o"])
    job = JobIn(model_id="m", calib_dataset_id="c", val_dataset_id="v")
    cfg = SlimConfig(model="m.pt2", out_dir="o", calib="c.npz", val="v.npz")
    for name in ("runtime", "threads", "batch", "trials", "final_candidates", "trial_images", "final_timing_repeats",
                 "seed"):
        assert getattr(job, name) == getattr(args, name) == getattr(cfg, name), name
    for name in ("latency_rounds", "latency_runs", "latency_warmup"):
        assert getattr(job, name) == getattr(cfg, name), name
    assert job.blocks == args.blocks.split(",") == list(cfg.blocks)
    assert job.eval_runtimes == list(cfg.eval_runtimes)
    assert job.trial_epochs == args.trial_epochs == cfg.trial_distil.epochs
    final = cfg.final_distil
    assert (job.final_epochs, job.final_mixup) == (args.final_epochs, args.final_mixup) == (final.epochs, final.mixup)
    # No learning rate asked: each candidate's by how far its plan is from the original (SlimConfig.final_lr_far).
    assert job.final_lr is None and args.final_lr is None and cfg.final_lr_far == FAR_PLAN_LR


def test_a_model_left_measuring_by_a_dead_worker_is_measured_again(zoo_pt2: Callable[[str], bytes]) -> None:
    # A worker killed while it measured a model's baseline latency left it 'measuring' for good.
    server = Server(world_dir("slimconv-measure-"), workers=0, env={"SLIMCONV_MODEL_LATENCY_TIMEOUT_S": "300"})
    try:
        c = server.client
        ids = [c.post("/models", files={"file": (f"{name}.pt2", zoo_pt2(name))}, data={"input_shape": "3,16,16"}
                      ).json()["id"] for name in ("tiny_vgg", "tiny_resnet", "odd_net")]
        left, given_up, fresh = ids
        long_ago, recent = now() - dt.timedelta(hours=1), now()
        with session_factory(make_engine(f"sqlite:///{server.data_dir / 'slimconv.db'}")).begin() as session:
            for model_id, started, attempts in ((left, long_ago, 1), (given_up, long_ago, 3), (fresh, recent, 1)):
                row = session.get(ModelRow, model_id)
                row.latency_status, row.latency_started_at, row.latency_attempts = "measuring", started, attempts
        server.start_worker()
        deadline = time.time() + 300
        while c.get(f"/models/{left}").json()["latency_status"] == "measuring":
            assert time.time() < deadline, "the model its worker left was never measured again"
            time.sleep(0.5)
        model = c.get(f"/models/{left}").json()
        assert model["latency_status"] == "measured" and model["latency"], model
        gave_up = c.get(f"/models/{given_up}").json()
        assert gave_up["latency_status"] == "failed" and "died each time" in gave_up["latency_error"], gave_up
        time.sleep(3)  # a measurement started a moment ago (its worker may be alive) is left alone
        assert c.get(f"/models/{fresh}").json()["latency_status"] == "measuring"
    finally:
        server.stop()


def _is_job_child(pid: str, job_id: str) -> bool:
    cmd = _cmdline(pid)
    return "service.sandbox" in cmd and job_id in cmd


def test_workers_stop_with_serve() -> None:
    """SIGTERM to `serve` alone (not its process group): its workers must not outlive it."""
    server = Server(world_dir("slimconv-stop-"), workers=1)
    try:
        def workers() -> list[str]:
            return [p for p in os.listdir("/proc")
                    if p.isdigit() and f"service worker --parent {server.proc.pid}" in _cmdline(p)]

        deadline = time.time() + 30
        while not workers():  # serve starts it beside the API
            assert time.time() < deadline
            time.sleep(0.2)
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=60)
        deadline = time.time() + 30
        while workers():
            assert time.time() < deadline, "a worker outlived `serve`"
            time.sleep(0.2)
    finally:
        server.stop()


def _cmdline(pid: str) -> str:
    """The process's command line with spaces between arguments ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""
