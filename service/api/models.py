"""``/models``: upload a ``.pt2`` (read by our allowlisted reader in the sandbox), list, show, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from search.errors import InvalidInputError
from search.loading import parse_floats, parse_shape
from service.context import Ctx, Db, drop_blob_if_unused, store_upload
from service.db import JobRow, ModelRow
from service.errors import ApiError
from service.schemas import ErrorOut, ItemsOut, ModelOut
from service.upload import multipart_body, receive_form

router = APIRouter(prefix="/models", tags=["models"])
ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorOut} for c in (400, 404, 409, 413, 415, 422)}
UPLOAD_FORM = multipart_body({
    "file": ("binary", "the model: a torch.export archive (.pt2), at most SLIMCONV_MAX_UPLOAD_BYTES"),
    "input_shape": ("string", "C,H,W of one input image, e.g. 3,32,32"),
    "mean": ("string", "optional per-channel mean for images scaled to [0,1], comma-separated"),
    "std": ("string", "optional per-channel std for images scaled to [0,1], comma-separated"),
    "name": ("string", "optional display name (default: the file name)"),
}, ["file", "input_shape"], {"input_shape": r"^\s*[0-9]+\s*,\s*[0-9]+\s*,\s*[0-9]+\s*$",
                              "mean": r"^[0-9eE.+\-]+(\s*,\s*[0-9eE.+\-]+)*$",
                              "std": r"^[0-9eE.+\-]+(\s*,\s*[0-9eE.+\-]+)*$"})


def model_out(row: ModelRow) -> ModelOut:
    a = row.analysis
    return ModelOut(id=row.id, name=row.name, sha256=row.sha256, size_bytes=row.size_bytes,
                    input_shape=row.input_shape, mean=row.mean, std=row.std, flops=a["flops"], params=a["params"],
                    sites=a["sites"], skipped=a["skipped"], min_flops=a.get("min_flops", {}),
                    latency_status=row.latency_status,  # type: ignore[arg-type]
                    latency=[{**r, "median_ms": r["median_ms"]} for r in row.latency],
                    latency_error=row.latency_error, created_at=row.created_at)


@router.post("", status_code=201, response_model=ModelOut, responses=ERRORS, openapi_extra=UPLOAD_FORM,
             summary="Upload a model (.pt2): validated without executing anything, stored, analysed")
async def upload_model(request: Request, ctx: Ctx) -> ModelOut:
    upload = await receive_form(request, ctx.store, ctx.settings.max_upload_bytes)
    try:
        fields = upload.fields
        unknown = set(fields) - {"input_shape", "mean", "std", "name"}
        if unknown:
            raise ApiError(422, f"unknown form fields: {sorted(unknown)}")
        if "input_shape" not in fields:
            raise ApiError(422, "input_shape is required (C,H,W, e.g. 3,32,32)")
        try:
            shape = parse_shape(fields["input_shape"])
            mean = parse_floats(fields.get("mean") or None, "mean")
            std = parse_floats(fields.get("std") or None, "std")
        except InvalidInputError as exc:
            raise ApiError(422, str(exc)) from None
        analysis = await run_in_threadpool(ctx.sandbox.call, {
            "op": "analyse", "path": str(upload.file_path), "input_shape": list(shape),
            "mean": list(mean) if mean else None, "std": list(std) if std else None}, 300.0)
        name = (fields.get("name") or upload.filename or "model").strip()[:200] or "model"
        assert upload.file_path is not None
        row = ModelRow(name=name, sha256=upload.sha256, size_bytes=upload.size, input_shape=list(shape),
                       mean=list(mean) if mean else None, std=list(std) if std else None, analysis=analysis,
                       latency=[], latency_status="pending" if ctx.settings.runtimes else "skipped")
        store_upload(ctx, row, upload.file_path, ".pt2")
        return model_out(row)
    finally:
        upload.discard()



@router.get("", response_model=ItemsOut, summary="Every uploaded model, newest first")
def list_models(session: Db) -> ItemsOut:
    rows = session.scalars(select(ModelRow).order_by(ModelRow.created_at.desc())).all()
    return ItemsOut(items=[model_out(r) for r in rows])


def get_model_row(session: Session, model_id: str) -> ModelRow:
    row = session.get(ModelRow, model_id)
    if row is None:
        raise ApiError(404, f"no model with id {model_id!r}")
    return row


@router.get("/{model_id}", response_model=ModelOut, responses=ERRORS, summary="One model and its analysis")
def get_model(model_id: str, session: Db) -> ModelOut:
    return model_out(get_model_row(session, model_id))


@router.delete("/{model_id}", status_code=204, responses=ERRORS,
               summary="Delete a model and its file; refused (409) while any job uses it")
def delete_model(model_id: str, ctx: Ctx) -> None:
    with ctx.sessions.begin() as session:
        row = get_model_row(session, model_id)
        jobs = session.scalars(select(JobRow.id).where(JobRow.model_id == model_id)).all()
        if jobs:
            raise ApiError(409, f"model {model_id} is used by jobs {list(jobs)}: delete those jobs first "
                           "(cancel a running one, then delete it)")
        sha = row.sha256
        session.delete(row)
    drop_blob_if_unused(ctx, ModelRow, sha, ".pt2")
