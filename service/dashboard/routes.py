"""Dashboard pages (``/``, ``/ui/jobs/{id}``, ``/ui/models/{id}``), their assets, and optuna-dashboard.

Pages are static HTML that fetch the JSON API; charts are plain SVG drawn by ``static/app.js``.
optuna-dashboard (its own WSGI app) is mounted under the absolute paths its page, bundle and API
use (``/dashboard``, ``/static``, ``/api``, ``/csv``; it has no prefix option), after our routes;
``/optuna`` redirects to ``/dashboard``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

STATIC = Path(__file__).with_name("static")
ICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
        'fill="#1f6feb"/><path d="M4 12V4h3v8zm5 0V7h3v5z" fill="#fff"/></svg>')

router = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/")
def home() -> FileResponse:
    return _page("index.html")


@router.get("/ui/jobs/{job_id}")
def job_page(job_id: str) -> FileResponse:
    return _page("job.html")


@router.get("/ui/models/{model_id}")
def model_page(model_id: str) -> FileResponse:
    return _page("model.html")


@router.get("/favicon.ico")
def favicon() -> Response:
    return Response(ICON, media_type="image/svg+xml")


@router.get("/optuna")
def optuna_dashboard() -> RedirectResponse:
    return RedirectResponse("/dashboard/")


class LazyOptunaDashboard:
    """optuna-dashboard's WSGI app on the studies' storage, built on first use (after migrations)."""

    def __init__(self, storage_url: str) -> None:
        self.url = storage_url
        self.app: Any = None
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        with self.lock:
            if self.app is None:
                import optuna
                from optuna_dashboard import wsgi

                if self.url.startswith("sqlite:///"):
                    Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
                self.app = wsgi(optuna.storages.RDBStorage(self.url))
        return self.app(environ, start_response)


OPTUNA_PREFIXES = ("/dashboard", "/api", "/static", "/csv")
"""Where optuna-dashboard's page, API and bundle live (absolute paths, no prefix option)."""


class FullPath:
    """Give a mounted app the whole path (optuna-dashboard routes on absolute paths)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app({**scope, "root_path": ""}, receive, send)


def install(app: FastAPI, study_url: str) -> None:
    """Add the pages and assets, and optuna-dashboard under its own absolute prefixes only, so our
    paths keep their 404/405 answers."""
    from a2wsgi import WSGIMiddleware

    app.include_router(router)
    app.mount("/assets", StaticFiles(directory=STATIC), name="assets")
    dashboard = FullPath(WSGIMiddleware(LazyOptunaDashboard(study_url)))  # type: ignore[arg-type]
    for prefix in OPTUNA_PREFIXES:
        app.mount(prefix, dashboard, name=f"optuna-dashboard{prefix.replace('/', '-')}")
