"""Parent side of the sandbox: start confined children, talk to them, stop them."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from service.errors import ApiError, from_kind
from service.sandbox import MARK, child_env, unreachable_for_others
from service.settings import Settings


def sandbox_user(settings: Settings) -> tuple[int, int] | None:
    """(uid, gid) children run as, or None when they keep ours (not root, or no user configured)."""
    if os.getuid() != 0 or not settings.sandbox_user or unreachable_for_others() is not None:
        return None  # the child keeps uid 0 without capabilities: what it writes must stay ours
    import pwd

    try:
        entry = pwd.getpwnam(settings.sandbox_user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def hand_over(path: Path, settings: Settings) -> Path:
    """Make ``path`` (a folder the child writes to) belong to the sandbox user."""
    path.mkdir(parents=True, exist_ok=True)
    owner = sandbox_user(settings)
    if owner is not None:
        for root, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), *owner)
        os.chown(path, *owner)
    return path


def _env(settings: Settings, home: Path) -> dict[str, str]:
    limits = {"SANDBOX_MEMORY": str(settings.sandbox_memory_bytes), "SANDBOX_CPU_S": str(settings.sandbox_cpu_s),
              "SANDBOX_OPEN_FILES": str(settings.sandbox_open_files), "SANDBOX_THREADS": str(settings.threads)}
    if sandbox_user(settings) is not None and settings.sandbox_user:
        limits["SANDBOX_USER"] = settings.sandbox_user
    return child_env(limits, home)


def start_child(settings: Settings, args: list[str], home: Path, stderr: IO[bytes] | int,
                extra_env: dict[str, str] | None = None, visible: list[Path] | None = None
                ) -> subprocess.Popen[str]:
    """Start ``python -m service.sandbox ARGS``; of the data folder it sees only ``home`` and ``visible``."""
    hand_over(home, settings)
    env = _env(settings, home)
    env.update(extra_env or {})
    env["SANDBOX_PARENT"] = str(os.getpid())
    env["SANDBOX_HIDE"] = str(settings.data_dir.resolve())
    env["SANDBOX_VISIBLE"] = os.pathsep.join(str(p.resolve()) for p in [home, *(visible or [])])
    return subprocess.Popen([sys.executable, "-m", "service.sandbox", *args], env=env, cwd=home, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)


def _pump(stream: IO[str], out: queue.Queue[dict[str, Any] | None]) -> None:
    for line in stream:
        if line.startswith(MARK):
            try:
                out.put(json.loads(line[len(MARK):]))
            except json.JSONDecodeError:
                continue
    out.put(None)


class Sandbox:
    """A long-lived confined ``serve`` child answering one request at a time (thread-safe).

    It is restarted when it dies (a limit hit, say) and after ``max_requests`` requests, so its
    CPU-time limit bounds any one request's work.
    """

    def __init__(self, settings: Settings, max_requests: int = 100) -> None:
        self.settings = settings
        self.home = settings.folder("sandbox")
        self.max_requests = max_requests
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[str] | None = None
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.served = 0
        self.confinement: dict[str, Any] = {}

    def _start(self) -> None:
        self.stop()
        log = (self.home / "serve.log").open("ab")
        # It reads uploads in flight (tmp/) and stored models (blobs/, for latency); nothing else of the data.
        visible = [self.settings.folder("tmp"), self.settings.folder("blobs")]
        self.proc = start_child(self.settings, ["serve"], self.home, log, visible=visible)
        log.close()
        self.replies = queue.Queue()
        threading.Thread(target=_pump, args=(self.proc.stdout, self.replies), daemon=True).start()
        hello = self.replies.get(timeout=120)
        if not hello or "hello" not in hello:
            raise ApiError(503, "the sandbox process did not start")
        self.confinement = hello["hello"]
        self.served = 0

    def warm(self) -> None:
        """Start the child ahead of the first request (its imports take seconds)."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                try:
                    self._start()
                except (ApiError, OSError, queue.Empty):
                    self.stop()  # the first request retries

    def call(self, request: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        """Send one request; its result, or ``ApiError`` (422 for a refused input, 503 when the child died)."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None or self.served >= self.max_requests:
                self._start()
            assert self.proc is not None and self.proc.stdin is not None
            self.served += 1
            try:
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
                reply = self.replies.get(timeout=timeout)
            except (BrokenPipeError, queue.Empty):
                reply = None
            if reply is None:
                code = self.stop()
                raise ApiError(422, f"the {request.get('op')} step stopped: the sandboxed process "
                               f"{'timed out' if code is None else f'ended with status {code}'} "
                               "(a memory, CPU-time or file limit was hit by this upload)")
        if reply.get("ok"):
            return dict(reply["result"])
        if reply.get("kind") == "InternalError":
            raise ApiError(422, f"the upload could not be processed: {reply.get('message')}")
        raise from_kind(str(reply.get("kind")), str(reply.get("message")))

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        code = proc.poll()
        if code is None:
            proc.kill()
            proc.wait()
        return code


class JobProcess:
    """A confined ``job`` child running one slimming job; events are read from its stdout."""

    def __init__(self, settings: Settings, job_dir: Path, spec: dict[str, Any], tag: str = "job",
                 inputs: list[Path] | None = None) -> None:
        self.job_dir = hand_over(job_dir, settings)
        spec_path = job_dir / f"{tag}.json"
        spec_path.write_text(json.dumps(spec))
        hand_over(job_dir, settings)
        self.log = (job_dir / f"{tag}.stderr.log").open("ab")
        # A job's study in a database server needs the network; on SQLite the job gets none.
        remote = not settings.study_url.startswith("sqlite")
        visible = list(inputs or []) + ([] if remote else [settings.folder("studies")])
        self.proc = start_child(settings, ["job", str(spec_path)], job_dir, self.log,
                                {"SANDBOX_NETWORK": "keep"} if remote else None, visible)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=_pump, args=(self.proc.stdout, self.events), daemon=True).start()

    def drain(self, wait: float) -> list[dict[str, Any]]:
        """Messages that arrived, waiting up to ``wait`` seconds for the first."""
        out: list[dict[str, Any]] = []
        deadline = time.time() + wait
        while True:
            try:
                msg = self.events.get(timeout=max(0.0, deadline - time.time()) if not out else 0)
            except queue.Empty:
                return out
            if msg is None:
                return out
            out.append(msg)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.log.close()

    def wait(self) -> int:
        code = self.proc.wait()
        self.log.close()
        return code
