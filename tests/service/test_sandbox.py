"""From inside the sandbox that reads uploads (the same confinement as job processes): no network, no
secrets (environment, the service's own /proc environ, the database file), and the memory and CPU-time
limits stop it. Each case is tried by real code running in the confined child (its `selfcheck` request)."""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Iterator

import pytest

from service.errors import ApiError
from service.runner import Sandbox
from service.settings import Settings
from tests.service.conftest import world_dir

SECRET = "postgresql+psycopg://slimconv:hunter2@db.example:5432/slimconv"


@pytest.fixture()
def sandbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    data = world_dir("slimconv-sandbox-")
    (data / "slimconv.db").write_text("the whole database")
    (data / "slimconv.db").chmod(0o600)
    monkeypatch.setenv("SLIMCONV_DATABASE_URL", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # as `serve` and `worker` do: our /proc environ is not readable
    settings = Settings(data_dir=data, sandbox_memory_bytes=3 << 30, sandbox_cpu_s=4)
    box = Sandbox(settings)
    yield box
    box.stop()
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)


def test_no_network(sandbox: Sandbox) -> None:
    with socket.socket() as server:  # a listener the child would reach if it shared our network
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        report = sandbox.call({"op": "selfcheck", "connect": ["127.0.0.1", port]})
    assert report["connect"].startswith("refused"), report
    assert sandbox.confinement["network"].startswith("none")


def test_no_secrets(sandbox: Sandbox) -> None:
    db = str(sandbox.settings.data_dir.resolve() / "slimconv.db")
    report = sandbox.call({"op": "selfcheck", "read": [db, f"/proc/{os.getpid()}/environ"]})
    assert not any(name.startswith("SLIMCONV") or "SECRET" in name for name in report["env"]), report["env"]
    assert report["read"][db].startswith("denied"), report
    assert report["read"][f"/proc/{os.getpid()}/environ"].startswith("denied"), report
    if os.getuid() == 0:
        assert sandbox.confinement.get("capabilities") == "none" or sandbox.confinement["uid"] != 0


def test_memory_limit(sandbox: Sandbox) -> None:
    report = sandbox.call({"op": "selfcheck", "memory_bytes": 4 << 30})
    assert report["memory"] == "MemoryError"


def test_cpu_time_limit(sandbox: Sandbox) -> None:
    with pytest.raises(ApiError) as err:
        sandbox.call({"op": "selfcheck", "cpu_s": 60}, timeout=120)
    assert err.value.status == 422 and "limit" in err.value.detail
    assert sandbox.call({"op": "selfcheck"})["env"]  # a fresh child answers the next request


def test_child_outlives_the_thread_that_started_it(sandbox: Sandbox) -> None:
    """The API starts its sandbox from a short-lived thread; the child must live on (it died with it
    when it used PR_SET_PDEATHSIG, which follows the parent thread), and still die with the process."""
    import threading
    import time

    starter = threading.Thread(target=sandbox.warm)
    starter.start()
    starter.join()
    time.sleep(1.0)
    assert sandbox.proc is not None and sandbox.proc.poll() is None
    assert sandbox.call({"op": "selfcheck"})["env"]
