"""Settings from the environment (``SLIMCONV_*``), with defaults that run on one machine with SQLite."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the API and the workers read from the environment.

    ``SLIMCONV_DATABASE_URL`` defaults to a SQLite file in the data folder; a PostgreSQL URL
    (``postgresql+psycopg://...``) works the same way.
    """

    model_config = SettingsConfigDict(env_prefix="SLIMCONV_")

    data_dir: Path = Path("data")
    database_url: str | None = None
    max_upload_bytes: int = Field(512 << 20, gt=0, description="largest accepted upload, bytes")
    max_expanded_bytes: int = Field(4 << 30, gt=0, description="largest expanded size of an archive, bytes")
    max_images: int = Field(200_000, gt=0, description="largest number of images in a dataset")
    workers: int = Field(1, ge=0, description="worker processes started beside the API by `serve`")
    runtimes: tuple[str, ...] = ("onnxruntime", "torch")
    """Runtimes a model's baseline latency is measured on after upload."""
    threads: int = Field(2, ge=1, description="threads for baseline latency measurements")
    heartbeat_s: float = Field(2.0, gt=0)
    stale_after_s: float = Field(30.0, gt=0, description="a running job whose heartbeat is older is taken over")
    poll_s: float = Field(1.0, gt=0, description="how often an idle worker looks for work")
    model_latency_timeout_s: float = Field(900.0, gt=0, description=(
        "longest a model's baseline latency measurement may take; one still 'measuring' this plus stale_after_s "
        "after it started was left by a worker that died, and is measured again"))
    sandbox_memory_bytes: int = Field(16 << 30, gt=0, description="address-space limit of a sandboxed process")
    sandbox_cpu_s: int = Field(6 * 3600, gt=0, description="CPU-time limit of a sandboxed job process")
    sandbox_open_files: int = Field(1024, gt=16)
    sandbox_user: str | None = "nobody"
    """Unprivileged user sandboxed processes run as when the service runs as root (none: stay)."""
    max_trials: int = Field(2000, gt=0)

    study_storage: str | None = None
    """Optuna storage for every job's study (default: ``studies/studies.db``, SQLite, in the data folder).
    Sandboxed job processes get this URL and nothing else; give it its own database and role."""

    @property
    def study_url(self) -> str:
        return self.study_storage or f"sqlite:///{(self.data_dir / 'studies' / 'studies.db').resolve()}"

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'slimconv.db').resolve()}"

    def folder(self, *parts: str) -> Path:
        path = self.data_dir.resolve().joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path
