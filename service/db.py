"""Database tables (SQLAlchemy 2.0) and engine: SQLite in WAL mode by default, PostgreSQL by URL."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

SQLITE_BUSY_MS = 30_000


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def new_id() -> str:
    return uuid.uuid4().hex[:16]


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ModelRow(Base):
    """An uploaded model: the stored archive (content-addressed) and its analysis."""

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    input_shape: Mapped[list[Any]] = mapped_column(JSON)
    mean: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    std: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    analysis: Mapped[dict[str, Any]] = mapped_column(JSON)
    latency: Mapped[list[Any]] = mapped_column(JSON, default=list)
    latency_status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    latency_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    latency_started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    """When a worker last took the baseline measurement on: one 'measuring' for longer than it may take was
    left by a worker that died, and is measured again."""
    latency_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class DatasetRow(Base):
    """An uploaded image set, stored as a checked ``.npz`` (uint8 NHWC ``x``, optional ``y``)."""

    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    count: Mapped[int] = mapped_column(Integer)
    shape: Mapped[list[Any]] = mapped_column(JSON)
    has_labels: Mapped[bool] = mapped_column(default=False)
    classes: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class JobRow(Base):
    """A slimming job: its request, its state in the queue and its progress."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    calib_dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    val_dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    holdout_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), nullable=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    worker_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    trials_done: Mapped[int] = mapped_column(Integer, default=0)
    trials_planned: Mapped[int] = mapped_column(Integer, default=0)
    phase: Mapped[str] = mapped_column(String(64), default="queued")
    eta_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    base: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    best: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """The fastest trial inside the budgets so far: number, latency ratio, validation score."""
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    candidates: Mapped[list[CandidateRow]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="CandidateRow.index")
    trials: Mapped[list[TrialRow]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="TrialRow.number")


class TrialRow(Base):
    """One trial of a job's study, copied from the study as it finishes (plan and everything measured)."""

    __tablename__ = "trials"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    record: Mapped[dict[str, Any]] = mapped_column(JSON)
    job: Mapped[JobRow] = relationship(back_populates="trials")


class CandidateRow(Base):
    """A final candidate of a job: its plan, figures and exported files."""

    __tablename__ = "candidates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    trial: Mapped[int] = mapped_column(Integer)
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    job: Mapped[JobRow] = relationship(back_populates="candidates")
    artifacts: Mapped[list[ArtifactRow]] = relationship(back_populates="candidate", cascade="all, delete-orphan")


class ArtifactRow(Base):
    """A downloadable file of a candidate (``pt2``, ``onnx``, ``safetensors``, ``report``)."""

    __tablename__ = "artifacts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"), index=True)
    format: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    candidate: Mapped[CandidateRow] = relationship(back_populates="artifacts")


class WorkerRow(Base):
    """A worker process and its last heartbeat."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and foreign keys on every connection."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def session_factory(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
