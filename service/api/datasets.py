"""``/datasets``: upload an ``.npz`` or a zip of class folders (checked in the sandbox), list, show, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from service.context import Ctx, Db, drop_blob_if_unused, store_upload
from service.db import DatasetRow, JobRow
from service.errors import ApiError
from service.runner import hand_over
from service.schemas import DatasetOut, ErrorOut, ItemsOut
from service.storage import sha256_file
from service.upload import multipart_body, receive_form

router = APIRouter(prefix="/datasets", tags=["datasets"])
ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorOut} for c in (400, 404, 409, 413, 415, 422)}
UPLOAD_FORM = multipart_body({
    "file": ("binary", ".npz with uint8 'x' (N,H,W,C) and optional integer 'y', or a zip of class "
                       "folders of PNG/JPEG images (class/image.png); at most SLIMCONV_MAX_UPLOAD_BYTES"),
    "name": ("string", "optional display name (default: the file name)"),
}, ["file"])


def dataset_out(row: DatasetRow) -> DatasetOut:
    return DatasetOut(id=row.id, name=row.name, sha256=row.sha256, size_bytes=row.size_bytes, count=row.count,
                      shape=row.shape, has_labels=row.has_labels, classes=row.classes, created_at=row.created_at)


@router.post("", status_code=201, response_model=DatasetOut, responses=ERRORS, openapi_extra=UPLOAD_FORM,
             summary="Upload images: counted, shape checked, labels found")
async def upload_dataset(request: Request, ctx: Ctx) -> DatasetOut:
    upload = await receive_form(request, ctx.store, ctx.settings.max_upload_bytes)
    out_dir = hand_over(ctx.settings.folder("sandbox", "out"), ctx.settings)
    converted = out_dir / f"{upload.sha256}.npz"
    try:
        unknown = set(upload.fields) - {"name"}
        if unknown:
            raise ApiError(422, f"unknown form fields: {sorted(unknown)}")
        info = await run_in_threadpool(ctx.sandbox.call, {
            "op": "dataset", "path": str(upload.file_path), "out": str(converted),
            "max_expanded": ctx.settings.max_expanded_bytes, "max_images": ctx.settings.max_images}, 600.0)
        assert upload.file_path is not None
        if info["converted"]:
            sha, size, source = sha256_file(converted), converted.stat().st_size, converted
        else:
            sha, size, source = upload.sha256, upload.size, upload.file_path
        name = (upload.fields.get("name") or upload.filename or "dataset").strip()[:200] or "dataset"
        row = DatasetRow(name=name, sha256=sha, size_bytes=size, count=info["count"], shape=info["shape"],
                         has_labels=info["has_labels"], classes=info["classes"])
        store_upload(ctx, row, source, ".npz")
        return dataset_out(row)
    finally:
        upload.discard()
        converted.unlink(missing_ok=True)



@router.get("", response_model=ItemsOut, summary="Every dataset, newest first")
def list_datasets(session: Db) -> ItemsOut:
    rows = session.scalars(select(DatasetRow).order_by(DatasetRow.created_at.desc())).all()
    return ItemsOut(items=[dataset_out(r) for r in rows])


def get_dataset_row(session: Session, dataset_id: str) -> DatasetRow:
    row = session.get(DatasetRow, dataset_id)
    if row is None:
        raise ApiError(404, f"no dataset with id {dataset_id!r}")
    return row


@router.get("/{dataset_id}", response_model=DatasetOut, responses=ERRORS, summary="One dataset")
def get_dataset(dataset_id: str, session: Db) -> DatasetOut:
    return dataset_out(get_dataset_row(session, dataset_id))


@router.delete("/{dataset_id}", status_code=204, responses=ERRORS,
               summary="Delete a dataset and its file; refused (409) while any job uses it")
def delete_dataset(dataset_id: str, ctx: Ctx) -> None:
    with ctx.sessions.begin() as session:
        row = get_dataset_row(session, dataset_id)
        jobs = session.scalars(select(JobRow.id).where(or_(
            JobRow.calib_dataset_id == dataset_id, JobRow.val_dataset_id == dataset_id,
            JobRow.holdout_dataset_id == dataset_id))).all()
        if jobs:
            raise ApiError(409, f"dataset {dataset_id} is used by jobs {list(jobs)}: delete those jobs first")
        sha = row.sha256
        session.delete(row)
    drop_blob_if_unused(ctx, DatasetRow, sha, ".npz")
