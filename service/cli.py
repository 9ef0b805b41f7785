"""``python -m service serve|worker|migrate``."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.worker import Worker


def _settings_env(args: argparse.Namespace) -> None:
    if getattr(args, "data_dir", None):
        os.environ["SLIMCONV_DATA_DIR"] = str(Path(args.data_dir).resolve())
    if getattr(args, "database_url", None):
        os.environ["SLIMCONV_DATABASE_URL"] = args.database_url


def _not_dumpable() -> None:
    """Sandboxed children may keep our uid: without this they could read our /proc/PID/environ."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except (OSError, AttributeError):
        pass


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.db import make_engine
    from service.migrate import upgrade
    from service.settings import Settings

    _settings_env(args)
    _not_dumpable()
    settings = Settings()
    if args.workers is not None:
        settings.workers = args.workers
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.url)
    upgrade(engine)
    engine.dispose()
    workers = [subprocess.Popen([sys.executable, "-m", "service", "worker", "--parent", str(os.getpid())])
               for _ in range(settings.workers)]
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        for proc in workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


def _worker(args: argparse.Namespace) -> int:
    from service.settings import Settings
    from service.worker import Worker

    _settings_env(args)
    _not_dumpable()
    worker = Worker(Settings())
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    if args.parent:
        _stop_with_parent(worker, args.parent)
    worker.run(once=args.once)
    return 0


def _stop_with_parent(worker: Worker, parent: int) -> None:
    """Workers started by `serve` stop when it is gone, however it went: uvicorn re-raises the signal
    that stopped it, so `serve` does not always get to stop its workers itself."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        worker.stop()

    threading.Thread(target=watch, daemon=True, name="stop-with-serve").start()


def _migrate(args: argparse.Namespace) -> int:
    from service.db import make_engine
    from service.migrate import upgrade
    from service.settings import Settings

    _settings_env(args)
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(make_engine(settings.url))
    print(f"database at head: {make_engine(settings.url).url.render_as_string(hide_password=True)}")
    return 0


def _selfcheck(args: argparse.Namespace) -> int:
    import json

    from service.runner import Sandbox
    from service.settings import Settings

    _settings_env(args)
    _not_dumpable()
    settings = Settings()
    sandbox = Sandbox(settings)
    try:
        report = sandbox.call({"op": "selfcheck", "connect": [args.connect_host, args.connect_port],
                               "read": [str(settings.data_dir.resolve() / "slimconv.db"), f"/proc/{os.getpid()}/environ"]})
        print(json.dumps({"confinement": sandbox.confinement, "tried": report}, indent=1))
    finally:
        sandbox.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="the API and its worker processes (SQLite in the data folder by default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", help="data folder (default ./data, or SLIMCONV_DATA_DIR)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default SQLite in the data folder)")
    p.add_argument("--workers", type=int, help="worker processes to start beside the API (default 1)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_serve)
    p = sub.add_parser("worker", help="one more worker process")
    p.add_argument("--data-dir")
    p.add_argument("--database-url")
    p.add_argument("--once", action="store_true", help="handle the work there is, then exit")
    p.add_argument("--parent", type=int, help=argparse.SUPPRESS)  # set by `serve`: stop when that process is gone
    p.set_defaults(func=_worker)
    p = sub.add_parser("migrate", help="bring the database to the newest schema")
    p.add_argument("--data-dir")
    p.add_argument("--database-url")
    p.set_defaults(func=_migrate)
    p = sub.add_parser("selfcheck", help="start a sandboxed process and show what it can and cannot do")
    p.add_argument("--data-dir")
    p.add_argument("--database-url")
    p.add_argument("--connect-host", default="1.1.1.1")
    p.add_argument("--connect-port", type=int, default=53)
    p.set_defaults(func=_selfcheck)
    args = parser.parse_args(argv)
    return int(args.func(args))
