"""Deployment files: the compose file validates with the compose CLI there is; the Dockerfile keeps its promises."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.service.conftest import REPO


def _compose() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_validates() -> None:
    cli = _compose()
    if cli is None:
        pytest.skip("no docker compose CLI here (.ci/run installs Debian's docker-compose)")
    res = subprocess.run([*cli, "-f", str(REPO / "docker-compose.yml"), "config"], capture_output=True, text=True,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for needle in ("api:", "worker:", "postgres:", "condition: service_healthy", "pgdata:", "data:",
                   "/healthz", "pg_isready", "SLIMCONV_DATABASE_URL", "SLIMCONV_STUDY_STORAGE"):
        assert needle in out, needle
    scaled = subprocess.run([*cli, "-f", str(REPO / "docker-compose.yml"), "config", "--services"],
                            capture_output=True, text=True, cwd=REPO)
    assert set(scaled.stdout.split()) == {"api", "worker", "postgres"}


def test_dockerfile() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    assert "download.pytorch.org/whl/cpu" in text and "torch==2.13.0" in text  # CPU build, pinned
    assert "\nUSER slimconv" in text  # not root
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert '"service", "serve"' in text and "python -m service worker" in text
