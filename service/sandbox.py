"""Run untrusted work (reading an upload, analysing it, searching it) in a confined child process.

The parent (API or worker) starts ``python -m service.sandbox <command>`` with a clean environment:
no database URL, no password, nothing but the paths and limits the child needs. Before it reads
anything, the child confines itself: resource limits (address space, CPU time, open files), death
with its parent, a network namespace of its own with no interfaces (where the OS allows), and an
unprivileged user (when started as root). Then it answers JSON lines on stdout, each prefixed with
``MARK`` so that stray library output cannot be mistaken for an answer.

Commands:
    serve       answer requests read from stdin (one JSON object per line): analyse, latency, dataset
    job FILE    run the slimming job described by FILE (JSON), streaming its events
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

MARK = "@@slimconv "
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
ENV_KEEP = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV")


def child_env(settings_env: dict[str, str], home: Path) -> dict[str, str]:
    """The whole environment of a sandboxed child: a few harmless variables and its limits."""
    env = {k: os.environ[k] for k in ENV_KEEP if k in os.environ}
    env.update(settings_env)
    env.update({"HOME": str(home), "TMPDIR": str(home), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
                "OMP_NUM_THREADS": settings_env.get("SANDBOX_THREADS", "2")})
    return env


def _confine() -> dict[str, Any]:
    """Apply the limits named in the environment; returns what was applied (reported to the parent)."""
    applied: dict[str, Any] = {}
    libc = ctypes.CDLL(None, use_errno=True)
    _die_with_parent()
    limits = {"SANDBOX_MEMORY": resource.RLIMIT_AS, "SANDBOX_CPU_S": resource.RLIMIT_CPU,
              "SANDBOX_OPEN_FILES": resource.RLIMIT_NOFILE}
    for name, which in limits.items():
        if name in os.environ:
            value = int(os.environ[name])
            resource.setrlimit(which, (value, value))
            applied[name.lower()] = value
    applied["network"] = "shared"
    if os.environ.get("SANDBOX_NETWORK") == "keep":
        applied["network"] = "kept: the study storage is a database server"
    elif libc.unshare(CLONE_NEWNET) == 0:
        applied["network"] = "none (own namespace)"
    elif os.getuid() != 0 and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        applied["network"] = "none (own user and network namespace)"
    if os.getuid() == 0 and os.environ.get("SANDBOX_HIDE"):
        applied["files"] = _hide_data(libc, os.environ["SANDBOX_HIDE"],
                                      [p for p in os.environ.get("SANDBOX_VISIBLE", "").split(os.pathsep) if p])
    user = os.environ.get("SANDBOX_USER")
    if os.getuid() == 0 and user:
        blocked = unreachable_for_others()
        if blocked is None:
            import pwd

            entry = pwd.getpwnam(user)
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
        else:
            applied["user"] = f"root without capabilities: {blocked} is not reachable by other users"
    if os.getuid() == 0:
        _drop_capabilities(libc)
        applied["capabilities"] = "none"
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    applied["uid"] = os.getuid()
    return applied


def _die_with_parent(period_s: float = 0.25) -> None:
    """Exit as soon as the process that started us is gone (reparented: our parent pid changes).

    PR_SET_PDEATHSIG would follow the parent *thread*: a child started from a pool thread that
    later retires would be killed with it, so a watchdog thread checks the parent process instead.
    """
    parent = int(os.environ.get("SANDBOX_PARENT", os.getppid()))
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(period_s)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


def _hide_data(libc: Any, data_dir: str, visible: list[str]) -> str:
    """In a mount namespace of our own, cover the data folder with an empty tmpfs and bind back only
    ``visible`` paths inside it: the database file, other users' uploads and jobs disappear."""
    if libc.unshare(CLONE_NEWNS) != 0:
        return "shared (no mount namespace)"
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return "shared (mounts not private)"
    fds = []
    for path in visible:
        if os.path.exists(path):
            fds.append((path, os.open(path, os.O_PATH)))
    if libc.mount(b"tmpfs", data_dir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=1m") != 0:
        return "shared (cannot cover the data folder)"
    for path, fd in fds:
        rel = os.path.relpath(path, data_dir)
        target = os.path.join(data_dir, rel)
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        libc.mount(f"/proc/self/fd/{fd}".encode(), target.encode(), None, MS_BIND | MS_REC, None)
        os.close(fd)
    libc.mount(None, data_dir.encode(), None, MS_REMOUNT | MS_RDONLY | MS_BIND, None)
    return f"data folder hidden but for {len(fds)} path(s)"


def _drop_capabilities(libc: Any) -> None:
    """Root keeps its uid but loses every capability (no reading others' files, no ptrace, no mounts)."""
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header = Header(0x20080522, 0)
    data = (Data * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def unreachable_for_others() -> str | None:
    """A folder on the way to Python or our code that an unprivileged user could not enter, if any."""
    import sysconfig

    paths = {os.path.realpath(sys.executable), sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
             os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    for path in paths:
        current = os.path.dirname(path) if os.path.isfile(path) else path
        while True:
            if not os.stat(current).st_mode & 0o001:
                return current
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
    return None


def say(message: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(message, default=str) + "\n")
    sys.stdout.flush()


def _error(exc: BaseException) -> dict[str, Any]:
    from search.errors import SearchError

    if isinstance(exc, SearchError):
        return {"ok": False, "kind": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, MemoryError):
        return {"ok": False, "kind": "InvalidInputError", "message": "out of memory while reading the upload"}
    return {"ok": False, "kind": "InternalError", "message": f"{type(exc).__name__}: {exc}"[:2000],
            "trace": traceback.format_exc()[-4000:]}


# -- requests ---------------------------------------------------------------------------------------
def analyse(req: dict[str, Any]) -> dict[str, Any]:
    """Read a ``.pt2`` with the allowlisted reader and describe it; no latency (that comes later)."""
    from search.costs import count_flops
    from search.engine import analyse as engine_analyse
    from search.loading import load_pt2
    from search.sites import find_sites
    from search.space import BLOCK_KINDS, site_options
    from search.transfer import build_block

    base = load_pt2(req["path"], req.get("input_shape"), req.get("mean"), req.get("std"))
    flops = count_flops(base.module, base.input_shape)
    sites, skipped = find_sites(base.module, base.input_shape, flops)  # traced once, used twice
    result = engine_analyse(base, flops=flops, found=(sites, skipped))
    _check_output(base)
    min_flops: dict[str, dict[str, int]] = {}
    for site in sites:
        per_kind: dict[str, int] = {"keep": site.flops}
        for kind in BLOCK_KINDS:
            options = [c for c in site_options(site, (kind,)) if c.kind == kind]
            if options:
                per_kind[kind] = min(count_flops(build_block(site, c), (site.in_channels, *site.input_size))
                                     for c in options)
        min_flops[site.name] = per_kind
    result["min_flops"] = min_flops
    if not result["sites"]:
        result["note"] = "nothing to slim: no groups=1 convolution with a kernel above 1x1"
    return result


def _check_output(base: Any) -> None:
    """Refuse a model whose outputs are not finite or do not depend on its input."""
    import torch

    from search.errors import InvalidInputError

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, *base.input_shape, generator=gen)
    with torch.no_grad():
        out = base.module(x)
    if not isinstance(out, torch.Tensor):
        raise InvalidInputError("the model must return one tensor")
    if not torch.isfinite(out).all():
        raise InvalidInputError("the model's output holds NaN or infinity on a random input (bad weights?)")
    if out.shape[0] == 4 and torch.allclose(out[0], out[1:], atol=1e-6, rtol=0):
        raise InvalidInputError("the model's output does not depend on its input")


def latency(req: dict[str, Any]) -> dict[str, Any]:
    from search.latency import LatencySpec, measure_models
    from search.loading import load_pt2

    base = load_pt2(req["path"], req.get("input_shape"), req.get("mean"), req.get("std"))
    results = []
    for runtime in req["runtimes"]:
        spec = LatencySpec(runtime=runtime, threads=req.get("threads", 2), batch=req.get("batch", 1))
        results.append(measure_models([base.module], base.input_shape, spec)[0].to_dict())
    return {"latency": results}


def dataset(req: dict[str, Any]) -> dict[str, Any]:
    from service.images import convert_dataset

    return convert_dataset(Path(req["path"]), Path(req["out"]), req["max_expanded"], req["max_images"])


def selfcheck(req: dict[str, Any]) -> dict[str, Any]:
    """Try, from inside the sandbox, what it must not allow; report what happened (for ops and tests)."""
    import socket

    out: dict[str, Any] = {"env": sorted(os.environ)}
    if req.get("connect"):
        host, port = req["connect"]
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
            out["connect"] = "connected"
        except OSError as exc:
            out["connect"] = f"refused: {exc}"
    for path in req.get("read", []):
        try:
            with open(path, "rb") as f:
                f.read(16)
            out.setdefault("read", {})[path] = "readable"
        except OSError as exc:
            out.setdefault("read", {})[path] = f"denied: {exc.strerror}"
    if req.get("memory_bytes"):
        try:
            block = bytearray(int(req["memory_bytes"]))
            out["memory"] = f"allocated {len(block)} bytes"
            del block
        except MemoryError:
            out["memory"] = "MemoryError"
    if req.get("cpu_s"):
        end = time.process_time() + float(req["cpu_s"])
        while time.process_time() < end:
            pass
        out["cpu"] = f"burned {req['cpu_s']} s of CPU"
    return out


HANDLERS = {"analyse": analyse, "latency": latency, "dataset": dataset, "selfcheck": selfcheck}


def serve() -> None:
    import search.engine  # noqa: F401 - the imports take seconds: pay them before the first request
    import search.loading  # noqa: F401

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            say({"ok": True, "result": HANDLERS[req["op"]](req)})
        except BaseException as exc:  # noqa: BLE001 - every failure is answered, the server lives on
            say(_error(exc))


# -- jobs -------------------------------------------------------------------------------------------
def job(path: str) -> None:
    from search.distil import DistilSettings
    from search.study import SlimConfig, run_slim

    spec = json.loads(Path(path).read_text())
    for key in ("trial_distil", "final_distil"):
        if key in spec:
            spec[key] = DistilSettings(**spec[key])
    for key in ("input_shape", "mean", "std", "blocks", "eval_runtimes", "latency_steps"):
        if spec.get(key) is not None:
            spec[key] = tuple(spec[key])
    config = SlimConfig(**spec)
    try:
        summary = run_slim(config, lambda event: say({"event": event}))
        say({"done": True, "candidates": len(summary["candidates"])})
    except BaseException as exc:  # noqa: BLE001
        say({"done": False, **_error(exc)})
        sys.exit(3)


def main(argv: list[str]) -> None:
    applied = _confine()
    say({"hello": applied})
    if argv and argv[0] == "serve":
        serve()
    elif len(argv) == 2 and argv[0] == "job":
        job(argv[1])
    else:
        say({"ok": False, "kind": "usage", "message": __doc__ or ""})
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
