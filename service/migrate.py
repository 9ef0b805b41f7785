"""Schema migrations with Alembic, run by ``serve`` and ``worker`` before they start (idempotent)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).with_name("migrations")
LOCK_KEY = 0x51_1C_0F  # PostgreSQL advisory lock: one process migrates at a time


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine) -> None:
    """Bring the database behind ``engine`` to the newest schema."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def prepare_study_storage(url: str, attempts: int = 10) -> None:
    """Create Optuna's tables in the studies' storage before any job process opens it.

    Job processes opening a fresh storage at the same time race to create the schema (one fails
    on Optuna's ``alembic_version``); done here first, by each worker with retries, they never do.
    """
    import time

    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        try:
            optuna.storages.RDBStorage(url).remove_session()
            return
        except (IntegrityError, OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + attempt * 0.5)
