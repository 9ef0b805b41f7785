"""The FastAPI app, built by ``create_app`` from settings (environment variables ``SLIMCONV_*``)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api import datasets, health, jobs, models
from service.context import Context
from service.dashboard import routes as dashboard
from service.db import make_engine, session_factory
from service.errors import ApiError
from service.migrate import upgrade
from service.runner import Sandbox
from service.settings import Settings
from service.storage import Store

log = logging.getLogger("slimconv")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API; the database is migrated to the newest schema on start-up."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.url)
        upgrade(engine)
        _protect_sqlite(settings)
        app.state.ctx = Context(settings, engine, session_factory(engine), Store(settings.data_dir),
                                Sandbox(settings))
        threading.Thread(target=app.state.ctx.sandbox.warm, daemon=True).start()
        try:
            yield
        finally:
            app.state.ctx.sandbox.stop()
            engine.dispose()

    app = FastAPI(
        title="slimconv",
        version="0.1.0",
        description="Make trained CNNs faster and smaller: upload a model (.pt2) and images, run a search "
                    "that replaces conv layers under FLOP and measured-latency budgets, download the result. "
                    "Latencies are medians in milliseconds on the named runtime, threads and batch; "
                    "accuracies are percent on the named split; FLOPs count one image, a multiply-add as 2.",
        lifespan=lifespan,
    )

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"detail": problems or "invalid request"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        detail = str(exc.detail)
        if exc.status_code == 405:  # name every method the path has, not only the first route's
            headers["Allow"] = ", ".join(sorted(_allowed(app, request.url.path)))
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "the request body is not valid JSON"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers)

    for module in (health, models, datasets, jobs):
        app.include_router(module.router)
    dashboard.install(app, settings.study_url)  # last: optuna-dashboard takes every path left over
    return app


def _allowed(app: FastAPI, path: str) -> set[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, APIRoute) and route.path_regex.match(path):
            methods |= set(route.methods or ())
    return methods | ({"HEAD"} if "GET" in methods else set())


def _protect_sqlite(settings: Settings) -> None:
    """The SQLite file holds everything: readable by the service's user only, never by the sandbox user."""
    if settings.database_url is None:
        for suffix in ("", "-wal", "-shm"):
            path = settings.data_dir / f"slimconv.db{suffix}"
            if path.exists():
                os.chmod(path, 0o600)
