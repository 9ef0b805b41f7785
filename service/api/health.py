"""``/healthz``: 200 once the database answers."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.context import Ctx

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="200 when the database is reachable, 503 otherwise")
def healthz(ctx: Ctx) -> JSONResponse:
    try:
        with ctx.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
        return JSONResponse({"status": "unhealthy", "database": str(exc)[:200]}, status_code=503)
    return JSONResponse({"status": "ok", "database": "ok"})
