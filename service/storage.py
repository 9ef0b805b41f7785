"""Files on disk: uploads streamed with a size limit into a content-addressed store, job folders."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


class Store:
    """``blobs/<sha[:2]>/<sha>`` for uploads, ``jobs/<id>/`` for job work, ``tmp/`` for uploads in flight."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        for name in ("blobs", "jobs", "tmp"):
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def temp_path(self, suffix: str = "") -> Path:
        fd, name = tempfile.mkstemp(dir=self.root / "tmp", suffix=suffix)
        os.close(fd)
        return Path(name)


    def blob_path(self, sha: str, suffix: str) -> Path:
        return self.root / "blobs" / sha[:2] / f"{sha}{suffix}"

    def keep(self, temp: Path, sha: str, suffix: str) -> Path:
        """Move a checked temporary file into the store under its hash (one copy per content)."""
        dest = self.blob_path(sha, suffix)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            temp.unlink(missing_ok=True)
        else:
            os.replace(temp, dest)
        dest.chmod(0o644)
        return dest

    def job_dir(self, job_id: str) -> Path:
        path = self.root / "jobs" / job_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def remove_job(self, job_id: str) -> None:
        shutil.rmtree(self.root / "jobs" / job_id, ignore_errors=True)

    def remove_blob(self, sha: str, suffix: str) -> None:
        self.blob_path(sha, suffix).unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
