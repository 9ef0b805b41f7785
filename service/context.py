"""What the API's routes share: settings, database sessions, the file store, the sandbox."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

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
