"""``/healthz`` (200 once the database answers) and ``/metrics`` (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import func, select, text

from service.context import Ctx
from service.db import JobRow, TrialRow, WorkerRow, now

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="200 when the database is reachable, 503 otherwise")
def healthz(ctx: Ctx) -> JSONResponse:
    try:
        with ctx.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
        return JSONResponse({"status": "unhealthy", "database": str(exc)[:200]}, status_code=503)
    return JSONResponse({"status": "ok", "database": "ok"})


@router.get("/metrics", summary="Prometheus text format: jobs by status, trials completed, worker heartbeats",
            response_class=PlainTextResponse)
def metrics(ctx: Ctx) -> PlainTextResponse:
    with ctx.sessions() as session:
        by_status = dict(session.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all())
        trials = dict(session.execute(select(TrialRow.state, func.count()).group_by(TrialRow.state)).all())
        workers = session.execute(select(WorkerRow.id, WorkerRow.heartbeat_at, WorkerRow.job_id)).all()
    lines = ["# HELP slimconv_jobs Jobs by status.", "# TYPE slimconv_jobs gauge"]
    lines += [f'slimconv_jobs{{status="{s}"}} {by_status.get(s, 0)}'
              for s in ("queued", "running", "succeeded", "failed", "cancelled")]
    lines += ["# HELP slimconv_trials Trials recorded, by state (COMPLETE: measured and scored).",
              "# TYPE slimconv_trials gauge"]
    lines += [f'slimconv_trials{{state="{s}"}} {n}' for s, n in sorted(trials.items())]
    lines += ["# HELP slimconv_trials_completed_total Trials completed (measured and scored).",
              "# TYPE slimconv_trials_completed_total counter", f"slimconv_trials_completed_total {trials.get('COMPLETE', 0)}",
              "# HELP slimconv_worker_heartbeat_age_seconds Seconds since each worker's last heartbeat.",
              "# TYPE slimconv_worker_heartbeat_age_seconds gauge"]
    current = now()
    for worker_id, beat, job_id in workers:
        label = worker_id.replace("\\", "").replace('"', "")
        lines.append(f'slimconv_worker_heartbeat_age_seconds{{worker="{label}",busy="{int(job_id is not None)}"}} '
                     f"{(current - beat).total_seconds():.1f}")
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
