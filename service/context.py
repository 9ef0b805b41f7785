"""What the API's routes share: settings, database sessions, the file store, the sandbox."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.db import DatasetRow, ModelRow
from service.runner import Sandbox
from service.settings import Settings
from service.storage import Store


@dataclass
class Context:
    settings: Settings
    engine: Engine
    sessions: sessionmaker
    store: Store
    sandbox: Sandbox


def get_context(request: Request) -> Context:
    return request.app.state.ctx  # type: ignore[no-any-return]


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.ctx.sessions() as session:
        yield session


Ctx = Annotated[Context, Depends(get_context)]
Db = Annotated[Session, Depends(get_session)]


def store_upload(ctx: Context, row: ModelRow | DatasetRow, source: Path, suffix: str) -> None:
    """Move a checked upload into the store under ``row.sha256`` and add ``row``; if the row cannot be
    written, the file goes again (unless another row holds the same content): nothing half-stored."""
    ctx.store.keep(source, row.sha256, suffix)
    try:
        with ctx.sessions.begin() as session:
            session.add(row)
    except Exception:
        drop_blob_if_unused(ctx, type(row), row.sha256, suffix)
        raise


def drop_blob_if_unused(ctx: Context, table: type[ModelRow] | type[DatasetRow], sha: str, suffix: str) -> None:
    """Remove a stored file once no row of ``table`` refers to its content any more."""
    with ctx.sessions() as session:
        if session.scalar(select(table.id).where(table.sha256 == sha).limit(1)) is None:
            ctx.store.remove_blob(sha, suffix)
