"""``/jobs``: queue a slimming job, follow it (JSON or server-sent events), cancel, download, delete."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.context import Ctx, Db
from service.db import ArtifactRow, CandidateRow, DatasetRow, JobRow, ModelRow, TrialRow, now
from service.errors import ApiError
from service.runner import hand_over
from service.schemas import CandidateOut, CreatedOut, ErrorOut, ItemsOut, JobIn, JobOut, ProgressOut, TrialOut

router = APIRouter(prefix="/jobs", tags=["jobs"])
ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorOut} for c in (400, 404, 409, 422)}
TERMINAL = ("succeeded", "failed", "cancelled")
FORMATS = {"pt2": ("model.pt2", "application/octet-stream"), "onnx": ("model.onnx", "application/octet-stream"),
           "safetensors": ("model.safetensors", "application/octet-stream"),
           "report": ("report.json", "application/json")}


def cuda_available() -> bool:
    from search.latency import cuda_available as available

    return available()


def _check_request(session: Session, body: JobIn) -> tuple[ModelRow, float | None]:
    """Refuse a job that cannot run (before it is queued); returns the model and the FLOPs ratio."""
    model = session.get(ModelRow, body.model_id)
    if model is None:
        raise ApiError(422, f"model_id {body.model_id!r}: no such model")
    c, h, w = model.input_shape
    roles = {"calib_dataset_id": body.calib_dataset_id, "val_dataset_id": body.val_dataset_id,
             "holdout_dataset_id": body.holdout_dataset_id}
    for role, dataset_id in roles.items():
        if dataset_id is None:
            continue
        data = session.get(DatasetRow, dataset_id)
        if data is None:
            raise ApiError(422, f"{role} {dataset_id!r}: no such dataset")
        if list(data.shape) != [h, w, c]:
            raise ApiError(422, f"{role}: images are {tuple(data.shape)} (H,W,C) but the model takes "
                           f"{(h, w, c)}: the dataset shape does not match the model")
    sites = model.analysis.get("sites", [])
    if not sites:
        raise ApiError(422, "nothing to slim: the model has no groups=1 convolution with a kernel above 1x1")
    if body.runtime == "cuda" or "cuda" in body.eval_runtimes:
        if not cuda_available():
            raise ApiError(422, "runtime 'cuda' asked for, but this server has no CUDA GPU")
    flops_ratio = body.max_flops_ratio
    base_flops = int(model.analysis["flops"])
    if body.max_flops is not None:
        absolute = body.max_flops / base_flops
        flops_ratio = absolute if flops_ratio is None else min(flops_ratio, absolute)
    if flops_ratio is not None:
        reachable = base_flops
        for per_kind in model.analysis.get("min_flops", {}).values():
            allowed = [v for k, v in per_kind.items() if k == "keep" or k in body.blocks]
            reachable += min(allowed) - per_kind["keep"]
        if reachable > flops_ratio * base_flops:
            raise ApiError(422, f"budget infeasible: no plan with blocks {body.blocks} reaches "
                           f"{flops_ratio:.4f}x the base FLOPs ({int(flops_ratio * base_flops)} FLOPs); the "
                           f"smallest reachable is {reachable / base_flops:.4f}x ({reachable} FLOPs)")
    if flops_ratio is not None and flops_ratio > 10:
        raise ApiError(422, f"max_flops is {flops_ratio:.1f}x the base: budgets above 10x are not meaningful")
    return model, flops_ratio


@router.post("", status_code=202, response_model=CreatedOut, responses=ERRORS,
             summary="Queue a slimming job (checked first: ids, shapes, runtime, reachable FLOPs)")
def create_job(body: JobIn, response: Response, ctx: Ctx) -> CreatedOut:
    with ctx.sessions.begin() as session:
        _, flops_ratio = _check_request(session, body)
        if body.trials > ctx.settings.max_trials:
            raise ApiError(422, f"trials {body.trials} is above this server's limit of {ctx.settings.max_trials}")
        request = body.model_dump()
        request["resolved_max_flops_ratio"] = flops_ratio
        job = JobRow(model_id=body.model_id, calib_dataset_id=body.calib_dataset_id,
                     val_dataset_id=body.val_dataset_id, holdout_dataset_id=body.holdout_dataset_id,
                     request=request, status="queued", trials_planned=body.trials, phase="queued")
        session.add(job)
    response.headers["Location"] = f"/jobs/{job.id}"
    return CreatedOut(id=job.id, status="queued")


def candidate_out(job: JobRow, cand: CandidateRow) -> CandidateOut:
    report = cand.report
    runtime = job.request.get("runtime")
    own: dict[str, Any] = next((e for e in report.get("latency", []) if e.get("runtime") == runtime), {})
    acc = report.get("accuracy", {})
    return CandidateOut(
        id=cand.index, trial=cand.trial, plan=report.get("plan", {}), flops=report.get("flops", 0),
        params=report.get("params", 0), latency_ms=own.get("latency_ms"), base_latency_ms=own.get("base_latency_ms"),
        latency=report.get("latency", []), val_accuracy=acc.get("val_accuracy"),
        holdout_accuracy=acc.get("holdout_accuracy"), val_agreement=acc.get("val_agreement"),
        holdout_agreement=acc.get("holdout_agreement"), latency_budget=report.get("latency_budget"),
        downloads={f: f"/jobs/{job.id}/candidates/{cand.index}/download?format={f}" for f in FORMATS})


def job_out(job: JobRow) -> JobOut:
    return JobOut(id=job.id, model_id=job.model_id, status=job.status,  # type: ignore[arg-type]
                  request=job.request,
                  progress=ProgressOut(trials_done=job.trials_done, trials_planned=job.trials_planned,
                                       phase=job.phase, eta_s=job.eta_s),
                  candidates=[candidate_out(job, c) for c in job.candidates], base=job.base, best=job.best,
                  error=job.error,
                  attempts=job.attempts, created_at=job.created_at, started_at=job.started_at,
                  finished_at=job.finished_at)


def get_job_row(session: Session, job_id: str) -> JobRow:
    job = session.get(JobRow, job_id)
    if job is None:
        raise ApiError(404, f"no job with id {job_id!r}")
    return job


@router.get("", response_model=ItemsOut, summary="Every job, newest first")
def list_jobs(session: Db) -> ItemsOut:
    rows = session.scalars(select(JobRow).order_by(JobRow.created_at.desc())).all()
    return ItemsOut(items=[job_out(r) for r in rows])


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS, summary="A job: status, progress, candidates")
def get_job(job_id: str, session: Db) -> JobOut:
    return job_out(get_job_row(session, job_id))


@router.get("/{job_id}/trials", response_model=ItemsOut, responses=ERRORS,
            summary="Every trial of the job's study: per-site plan and everything measured")
def list_trials(job_id: str, session: Db) -> ItemsOut:
    get_job_row(session, job_id)
    rows = session.scalars(select(TrialRow).where(TrialRow.job_id == job_id).order_by(TrialRow.number)).all()
    return ItemsOut(items=[trial_out(r) for r in rows])


def trial_out(row: TrialRow) -> TrialOut:
    rec = row.record
    attrs = rec.get("user_attrs", {})
    return TrialOut(number=row.number, state=row.state, plan=attrs.get("plan", {}), values=rec.get("values"),
                    user_attrs=attrs)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=ERRORS,
             summary="Cancel a queued or running job (409 once it has finished)")
def cancel_job(job_id: str, ctx: Ctx) -> JobOut:
    with ctx.sessions.begin() as session:
        job = get_job_row(session, job_id)
        if job.status in TERMINAL:
            raise ApiError(409, f"job {job_id} has already {job.status}")
        session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "queued")
                        .values(status="cancelled", phase="cancelled", finished_at=now()))
        session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "running")
                        .values(cancel_requested=True, phase="cancelling"))
    with ctx.sessions() as session:
        return job_out(get_job_row(session, job_id))


@router.get("/{job_id}/events", responses=ERRORS, response_class=StreamingResponse,
            summary="Server-sent events: a `progress` event (the job as JSON) on every change, until it ends")
async def job_events(job_id: str, request: Request, ctx: Ctx) -> StreamingResponse:
    with ctx.sessions() as session:
        get_job_row(session, job_id)

    async def stream() -> AsyncIterator[str]:
        last = None
        while not await request.is_disconnected():
            with ctx.sessions() as session:
                job = session.get(JobRow, job_id)
                if job is None:
                    yield "event: deleted\ndata: {}\n\n"
                    return
                data = job_out(job).model_dump_json()
                status = job.status
            if data != last:
                yield f"event: progress\ndata: {data}\n\n"
                last = data
            if status in TERMINAL:
                yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                return
            await asyncio.sleep(0.5)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/{job_id}/candidates/{candidate_id}/download", responses={**ERRORS, 200: {"content": {
    "application/octet-stream": {}, "application/json": {}}}}, response_class=FileResponse,
            summary="Download a candidate: .pt2, ONNX, safetensors or its report (JSON)")
def download(job_id: str, candidate_id: int, session: Db,
             format: Annotated[Literal["pt2", "onnx", "safetensors", "report"],  # noqa: A002 - the API's name
                               Query(description="pt2, onnx, safetensors or report")] = "onnx") -> FileResponse:
    job = get_job_row(session, job_id)
    cand = next((c for c in job.candidates if c.index == candidate_id), None)
    if cand is None:
        raise ApiError(404, f"job {job_id} has no candidate {candidate_id}")
    art = session.scalar(select(ArtifactRow).where(ArtifactRow.candidate_id == cand.id,
                                                   ArtifactRow.format == format))
    if art is None or not Path(art.path).is_file():
        raise ApiError(404, f"candidate {candidate_id} of job {job_id} has no {format} file")
    filename, media = FORMATS[format]
    return FileResponse(art.path, media_type=media, filename=f"{job_id}-{candidate_id}-{filename}")


@router.delete("/{job_id}", status_code=204, responses=ERRORS,
               summary="Delete a job, its trials, candidates and files (409 while it runs: cancel it first)")
def delete_job(job_id: str, ctx: Ctx) -> None:
    with ctx.sessions.begin() as session:
        job = get_job_row(session, job_id)
        if job.status == "running":
            raise ApiError(409, f"job {job_id} is running: cancel it first (POST /jobs/{job_id}/cancel)")
        gone = session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status != "running")
                               .values(status="cancelled", phase="deleting"))
        if gone.rowcount != 1:  # type: ignore[attr-defined]
            raise ApiError(409, f"job {job_id} started running: cancel it first")
        session.delete(job)
    ctx.store.remove_job(job_id)
    _delete_study(ctx.settings.study_url, job_id)
    if ctx.settings.study_storage is None:
        hand_over(ctx.settings.folder("studies"), ctx.settings)  # files SQLite made as us go back to the sandbox


def _delete_study(url: str, name: str) -> None:
    import optuna

    try:
        optuna.delete_study(study_name=name, storage=url)
    except KeyError:
        pass  # never started


