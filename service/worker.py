"""Worker process: claims queued jobs atomically, runs each in a sandboxed child, reports progress.

Claiming is one conditional ``UPDATE`` (queued, or running with a heartbeat older than
``stale_after_s``), so two workers never run the same job; a job whose worker died is taken over
and its study resumes (finished trials are kept). The worker also measures the baseline latency of
newly uploaded models. It holds the database; its children hold nothing but file paths.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.db import (
    ArtifactRow,
    CandidateRow,
    DatasetRow,
    JobRow,
    ModelRow,
    TrialRow,
    WorkerRow,
    make_engine,
    now,
    session_factory,
)
from service.errors import ApiError
from service.migrate import prepare_study_storage, upgrade
from service.runner import JobProcess, Sandbox, hand_over
from service.schemas import with_defaults
from service.settings import Settings
from service.storage import Store, sha256_file

log = logging.getLogger("slimconv.worker")
PHASES = {"loaded": "measuring the base model", "base measured": "timing blocks per site",
          "site latency table": "fitting blocks and sensitivity", "seeded": "searching", "trial": "searching",
          "screened": "searching", "search done": "verifying the front", "front timing": "verifying the front",
          "front verified": "verifying the front",
          "final candidates": "final distillation", "final distillation": "final distillation",
          "distillation progress": "final distillation",
          "candidate exported": "exporting candidates", "no feasible trial": "no feasible trial"}
MAX_MEASURE_ATTEMPTS = 3
"""Times a model's baseline measurement is started before it is marked failed (each time its worker died)."""
FILES = {"pt2": "model.pt2", "onnx": "model.onnx", "safetensors": "model.safetensors", "report": "report.json"}


class Worker:
    def __init__(self, settings: Settings, worker_id: str | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(settings.url)
        upgrade(self.engine)
        self.sessions = session_factory(self.engine)
        self.store = Store(settings.data_dir)
        prepare_study_storage(settings.study_url)
        if settings.study_storage is None:
            hand_over(settings.folder("studies"), settings)
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self.sandbox: Sandbox | None = None
        with self.sessions.begin() as session:
            session.merge(WorkerRow(id=self.id, host=socket.gethostname(), pid=os.getpid()))

    def stop(self) -> None:
        self._stop.set()

    # -- loop ------------------------------------------------------------------------------------
    def run(self, once: bool = False) -> None:
        log.info("worker %s started", self.id)
        try:
            while not self._stop.is_set():
                did = self.run_one_job() or self.help_one_job() or self.measure_one_model()
                self._beat(None)
                if once and not did:
                    break
                if not did:
                    self._stop.wait(self.settings.poll_s)
        finally:
            if self.sandbox is not None:
                self.sandbox.stop()
            with self.sessions.begin() as session:  # a clean exit leaves no heartbeat behind
                session.execute(delete(WorkerRow).where(WorkerRow.id == self.id))
            self.engine.dispose()

    def _beat(self, job_id: str | None) -> None:
        with self.sessions.begin() as session:
            session.execute(update(WorkerRow).where(WorkerRow.id == self.id).values(heartbeat_at=now(), job_id=job_id))

    # -- claiming --------------------------------------------------------------------------------
    def claim(self) -> str | None:
        """Take one job: queued ones first (oldest first), then running ones whose worker went silent."""
        stale = now() - dt.timedelta(seconds=self.settings.stale_after_s)
        with self.sessions() as session:
            ids = session.scalars(
                select(JobRow.id).where(or_(JobRow.status == "queued",
                                            (JobRow.status == "running") & (JobRow.heartbeat_at < stale)))
                .order_by(JobRow.created_at).limit(10)).all()
        for job_id in ids:
            with self.sessions.begin() as session:
                claimed = session.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id,
                           or_(JobRow.status == "queued", (JobRow.status == "running") & (JobRow.heartbeat_at < stale)))
                    .values(status="running", worker_id=self.id, heartbeat_at=now(), attempts=JobRow.attempts + 1,
                            phase="starting", started_at=now()))
                if claimed.rowcount == 1:  # type: ignore[attr-defined]
                    return job_id
        return None

    # -- jobs ------------------------------------------------------------------------------------
    def _spec(self, session: Session, job: JobRow, out_dir: Path) -> dict[str, Any]:
        model = session.get(ModelRow, job.model_id)
        assert model is not None
        req = with_defaults(job.request)

        def data(dataset_id: str | None) -> str | None:
            if dataset_id is None:
                return None
            row = session.get(DatasetRow, dataset_id)
            assert row is not None
            return str(self.store.blob_path(row.sha256, ".npz"))

        eval_runtimes = [req["runtime"]] + [r for r in req["eval_runtimes"] if r != req["runtime"]]
        return {
            "model": str(self.store.blob_path(model.sha256, ".pt2")), "out_dir": str(out_dir),
            "storage": self.settings.study_url, "study_name": job.id,
            "trial_grace_s": self.settings.stale_after_s,
            "calib": data(job.calib_dataset_id), "val": data(job.val_dataset_id),
            "holdout": data(job.holdout_dataset_id), "input_shape": model.input_shape,
            "mean": model.mean, "std": model.std, "max_flops": req.get("resolved_max_flops_ratio"),
            "max_latency": req["max_latency_ratio"], "max_latency_ms": req["max_latency_ms"],
            "runtime": req["runtime"], "threads": req["threads"], "batch": req["batch"], "trials": req["trials"],
            "blocks": req["blocks"], "time_budget_s": req["time_budget_s"], "seed": req["seed"],
            "trial_images": req["trial_images"], "final_candidates": req["final_candidates"],
            "latency_steps": req["latency_steps"],
            "trial_distil": {"epochs": req["trial_epochs"]},
            "final_distil": {"epochs": req["final_epochs"], "mixup": req["final_mixup"],
                             **({} if req.get("final_lr") is None else {"lr": req["final_lr"]})},
            **({} if req.get("final_lr") is None else {"final_lr_far": None}),
            "eval_runtimes": eval_runtimes, "latency_rounds": req["latency_rounds"],
            "latency_runs": req["latency_runs"], "latency_warmup": req["latency_warmup"],
            "final_timing_repeats": req["final_timing_repeats"],
        }

    def run_one_job(self) -> bool:
        job_id = self.claim()
        if job_id is None:
            return False
        log.info("worker %s runs job %s", self.id, job_id)
        self._beat(job_id)
        job_dir = self.store.job_dir(job_id)
        if self.settings.study_storage is None:
            hand_over(self.settings.folder("studies"), self.settings)
        with self.sessions() as session:
            job = session.get(JobRow, job_id)
            assert job is not None
            spec = self._spec(session, job, job_dir / "run")
        proc = JobProcess(self.settings, job_dir, spec, inputs=_inputs(spec))
        final: dict[str, Any] | None = None
        outcome = ""
        last_beat = 0.0
        while True:
            for msg in proc.drain(self.settings.heartbeat_s):
                if "event" in msg:
                    self._on_event(job_id, msg["event"])
                elif "done" in msg:
                    final = msg
            if time.time() - last_beat >= self.settings.heartbeat_s:
                last_beat = time.time()
                state = self._heartbeat(job_id)
                if state != "ok":
                    proc.kill()
                    outcome = state
                    break
            if self._stop.is_set():
                proc.kill()
                outcome = "worker stopped"
                break
            if not proc.alive() and proc.events.empty():
                for msg in proc.drain(0.2):
                    if "event" in msg:
                        self._on_event(job_id, msg["event"])
                    elif "done" in msg:
                        final = msg
                code = proc.wait()
                outcome = f"exit {code}"
                break
        self._finish(job_id, job_dir, outcome, final)
        self._beat(None)
        return True

    def help_one_job(self) -> bool:
        """Join a running job that allows more workers: run trials of its study beside its owner."""
        fresh = now() - dt.timedelta(seconds=self.settings.stale_after_s)
        with self.sessions() as session:
            jobs = session.scalars(select(JobRow).where(JobRow.status == "running", JobRow.phase == "searching",
                                                        JobRow.cancel_requested.is_(False), JobRow.worker_id != self.id)
                                   .order_by(JobRow.created_at)).all()
            choice = None
            for job in jobs:
                wanted = int(with_defaults(job.request)["max_workers"])
                if wanted <= 1:
                    continue
                active = len(session.scalars(select(WorkerRow.id).where(
                    WorkerRow.job_id == job.id, WorkerRow.heartbeat_at >= fresh)).all())
                if active < wanted and job.trials_done < job.trials_planned:
                    choice = job
                    break
            if choice is None:
                return False
            job_id = choice.id
            spec = {**self._spec(session, choice, self.store.job_dir(job_id) / "run"), "helper": True}
        self._beat(job_id)
        log.info("worker %s helps with job %s", self.id, job_id)
        proc = JobProcess(self.settings, self.store.job_dir(job_id), spec, tag=f"helper-{self.id}",
                          inputs=_inputs(spec))
        last_beat = 0.0
        while True:
            for msg in proc.drain(self.settings.heartbeat_s):
                if "event" in msg:
                    self._on_event(job_id, msg["event"], owner=False)
            if time.time() - last_beat >= self.settings.heartbeat_s:
                last_beat = time.time()
                self._beat(job_id)
                with self.sessions() as session:
                    row = session.get(JobRow, job_id)
                    gone = row is None or row.status != "running" or row.cancel_requested
                if gone or self._stop.is_set():
                    proc.kill()
                    break
            if not proc.alive() and proc.events.empty():
                for msg in proc.drain(0.2):
                    if "event" in msg:
                        self._on_event(job_id, msg["event"], owner=False)
                proc.wait()
                break
        self._beat(None)
        return True

    def _heartbeat(self, job_id: str) -> str:
        """Beat for the job; 'cancel' when asked to, 'lost' when another worker owns it now."""
        with self.sessions.begin() as session:
            done = session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.worker_id == self.id,
                                                        JobRow.status == "running").values(heartbeat_at=now()))
            if done.rowcount != 1:  # type: ignore[attr-defined]
                return "lost"
            cancel = session.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id))
        self._beat(job_id)
        return "cancel" if cancel else "ok"

    def _on_event(self, job_id: str, event: dict[str, Any], owner: bool = True) -> None:
        try:
            self._record_event(job_id, event, owner)
        except SQLAlchemyError as exc:  # the job was deleted meanwhile, say: the worker lives on
            log.warning("job %s: event %s not recorded: %s", job_id, event.get("event"), exc)

    def _record_event(self, job_id: str, event: dict[str, Any], owner: bool) -> None:
        name = event.get("event", "")
        values: dict[str, Any] = {}
        if name in PHASES and owner:
            values["phase"] = PHASES[name]
        if name == "trial":
            done = int(event.get("done", 0))
            with self.sessions.begin() as session:  # counts come from the shared study: keep the largest
                session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.trials_done < done)
                                .values(trials_done=done, eta_s=event.get("eta_s")))
        if owner and name == "base measured":
            values["base"] = {"latency_ms": event.get("latency_ms"), "flops": event.get("flops")}
        if owner and name == "site latency table":
            with self.sessions() as session:
                base = dict(session.scalar(select(JobRow.base).where(JobRow.id == job_id)) or {})
            values["base"] = {**base, "site_keep_ms": event.get("keep_ms"), "table_base_ms": event.get("base_ms")}
        with self.sessions.begin() as session:
            if values:
                session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.worker_id == self.id).values(**values))
            record = event.get("trial")
            if name == "trial" and isinstance(record, dict) and record.get("state") == "COMPLETE":
                best = session.scalar(select(JobRow.best).where(JobRow.id == job_id))
                ratio, score = record["values"][1], record["values"][0]
                if best is None or ratio < best["latency_ratio"]:
                    session.execute(update(JobRow).where(JobRow.id == job_id).values(
                        best={"trial": record["number"], "latency_ratio": ratio, "val_score": score}))
            if isinstance(record, dict) and "number" in record:
                row = session.scalar(select(TrialRow).where(TrialRow.job_id == job_id,
                                                            TrialRow.number == record["number"]))
                if row is None:
                    session.add(TrialRow(job_id=job_id, number=int(record["number"]), state=str(record["state"]),
                                         record=_clean(record)))
                else:
                    row.state, row.record = str(record["state"]), _clean(record)

    def _finish(self, job_id: str, job_dir: Path, outcome: str, final: dict[str, Any] | None) -> None:
        if outcome == "lost":
            log.warning("job %s was taken over by another worker", job_id)
            return
        with self.sessions.begin() as session:
            job = session.get(JobRow, job_id)
            if job is None:
                return
            if outcome == "worker stopped":
                # Leave it running with an old heartbeat: another worker takes it over and resumes.
                job.heartbeat_at = now() - dt.timedelta(days=1)
                job.phase = "waiting for a worker"
                return
            job.finished_at = now()
            job.eta_s = None
            if outcome == "cancel":
                job.status, job.phase = "cancelled", "cancelled"
                return
            summary_path = job_dir / "run" / "summary.json"
            if final is not None and final.get("done") and summary_path.is_file():
                summary = json.loads(summary_path.read_text())
                self._store_results(session, job, job_dir, summary)
                job.status, job.phase = "succeeded", "done"
                return
            job.status, job.phase = "failed", "failed"
            if final is not None and final.get("message"):
                job.error = f"{final.get('kind')}: {final.get('message')}"
            else:
                log_file = job_dir / "job.stderr.log"
                tail = log_file.read_text(errors="replace")[-1500:] if log_file.exists() else ""
                job.error = f"the job process ended ({outcome}) without finishing: a resource limit was hit or it " \
                            f"crashed. Last output: {tail}"

    def _store_results(self, session: Session, job: JobRow, job_dir: Path, summary: dict[str, Any]) -> None:
        job.base = {**(job.base or {}), **_clean(summary.get("base") or {})}
        for cand in list(job.candidates):
            session.delete(cand)
        session.flush()
        for record in summary.get("trials", []):
            row = session.scalar(select(TrialRow).where(TrialRow.job_id == job.id, TrialRow.number == record["number"]))
            if row is None:
                session.add(TrialRow(job_id=job.id, number=record["number"], state=record["state"], record=_clean(record)))
        for cand in summary.get("candidates", []):
            folder = job_dir / "run" / "candidates" / str(cand["id"])
            cand_row = CandidateRow(job_id=job.id, index=int(cand["id"]), trial=int(cand.get("trial", -1)),
                                    report=_clean(cand))
            for fmt, name in FILES.items():
                path = folder / name
                if path.is_file():
                    cand_row.artifacts.append(ArtifactRow(format=fmt, path=str(path), size_bytes=path.stat().st_size,
                                                     sha256=sha256_file(path)))
            session.add(cand_row)
        job.trials_done = int(summary["trials_measured"])

    # -- model latency ---------------------------------------------------------------------------
    def measure_one_model(self) -> bool:
        """Measure the baseline latency of one newly uploaded model (claimed like a job).

        A model still 'measuring' after the longest a measurement may take was left by a worker that
        died (the measurement sets no heartbeat): it is claimed again, up to ``MAX_MEASURE_ATTEMPTS``
        times in all; rows 'measuring' with no start time were left by a version that never retried.
        """
        stale = now() - dt.timedelta(seconds=self.settings.model_latency_timeout_s + self.settings.stale_after_s)
        claimable = or_(ModelRow.latency_status == "pending",
                        (ModelRow.latency_status == "measuring")
                        & or_(ModelRow.latency_started_at.is_(None), ModelRow.latency_started_at < stale))
        with self.sessions() as session:
            model_id = session.scalar(select(ModelRow.id).where(claimable).order_by(ModelRow.created_at).limit(1))
        if model_id is None:
            return False
        with self.sessions.begin() as session:
            got = session.execute(update(ModelRow).where(ModelRow.id == model_id, claimable)
                                  .values(latency_status="measuring", latency_started_at=now(),
                                          latency_attempts=ModelRow.latency_attempts + 1))
            if got.rowcount != 1:  # type: ignore[attr-defined]
                return True
            model = session.get(ModelRow, model_id)
            assert model is not None
            attempt = model.latency_attempts
            if attempt > MAX_MEASURE_ATTEMPTS:
                model.latency_status = "failed"
                model.latency_error = (f"the measurement was started {attempt - 1} times and its worker died "
                                       "each time before it ended")
                return True
            request = {"op": "latency", "path": str(self.store.blob_path(model.sha256, ".pt2")),
                       "input_shape": model.input_shape, "mean": model.mean, "std": model.std,
                       "runtimes": list(self.settings.runtimes), "threads": self.settings.threads, "batch": 1}
        if self.sandbox is None:
            self.sandbox = Sandbox(self.settings)
        try:
            result = self.sandbox.call(request, timeout=self.settings.model_latency_timeout_s)
            values: dict[str, Any] = {"latency": result["latency"], "latency_status": "measured"}
        except ApiError as exc:
            values = {"latency_status": "failed", "latency_error": exc.detail}
        with self.sessions.begin() as session:  # unless another worker took it over meanwhile
            session.execute(update(ModelRow).where(ModelRow.id == model_id, ModelRow.latency_attempts == attempt,
                                                   ModelRow.latency_status == "measuring").values(**values))
        return True


def _inputs(spec: dict[str, Any]) -> list[Path]:
    """The stored files a job reads: its model and its datasets (all a job process sees of other uploads)."""
    return [Path(spec[k]) for k in ("model", "calib", "val", "holdout") if spec.get(k)]


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN and infinity become None, tuples lists, anything else its string."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
