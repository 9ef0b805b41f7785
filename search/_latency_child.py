"""Child process for latency measurement, run as a script (``latency.child_command``) on a job file.

Runs alone with the thread count fixed before any model is loaded, and prints one JSON line. It
imports only what its job needs: timing ONNX files needs numpy and onnxruntime, not torch or the
``search`` package.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def _time_interleaved(fns: list[Callable[[], Any]], warmup: int, runs_per_round: int, rounds: int) -> list[list[float]]:
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            for _ in range(runs_per_round):
                start = time.perf_counter()
                fn()
                samples[i].append((time.perf_counter() - start) * 1000.0)
    return samples


def _summary(samples: list[float], spec: dict[str, Any], device: str, memory_format: str) -> dict[str, Any]:
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {
        "median_ms": statistics.median(samples),
        "p25_ms": q[0],
        "p75_ms": q[2],
        "runtime": spec["runtime"],
        "threads": spec["threads"],
        "batch": spec["batch"],
        "device": device,
        "runs": len(samples),
        "memory_format": memory_format,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return "cpu: " + (platform.processor() or platform.machine())


def _ort_session(path: str, threads: int, spinning: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning is onnxruntime's default (what a user's session does). Interleaved sessions each own
    # a thread pool, and a pool left spinning after its session's turn takes the cores from the next
    # session: force_spinning_stop parks a pool's threads the moment its Run returns. Each Run still
    # spins between its own operators, and a session timed alone runs as fast either way.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _ort_runner(session: Any, x: Any) -> Callable[[], Any]:
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


def _torch_callables(modules: list[Any], shapes: Sequence[tuple[int, ...]], spec: dict[str, Any]) -> tuple[list[Callable[[], Any]], list[str], str]:
    import torch

    cuda = spec["runtime"] == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    fns: list[Callable[[], Any]] = []
    formats: list[str] = []
    for module, shape in zip(modules, shapes, strict=True):
        module = module.eval().to(device)
        x = torch.randn(shape, device=device)
        candidates = {}
        for fmt in ("contiguous", "channels_last"):
            if fmt == "channels_last":
                # Module.to() works in place: convert a copy so the contiguous variant stays as it is.
                m = copy.deepcopy(module).to(memory_format=torch.channels_last)
                xi = x.contiguous(memory_format=torch.channels_last)
            else:
                m, xi = module, x

            def run(m: Any = m, xi: Any = xi) -> None:
                with torch.inference_mode():
                    m(xi)
                if cuda:
                    torch.cuda.synchronize()

            candidates[fmt] = run
        # Pick the faster memory format on a short probe (both are valid for the user to deploy).
        probe = _time_interleaved(list(candidates.values()), max(3, spec["warmup"] // 2), 5, 3)
        best = min(zip(candidates, probe, strict=True), key=lambda kv: statistics.median(kv[1]))[0]
        fns.append(candidates[best])
        formats.append(best)
    name = torch.cuda.get_device_name(0) if cuda else _cpu_name()
    return fns, formats, ("cuda: " + name if cuda else name)


def _model_callables(
    paths: list[str], shape: tuple[int, ...], spec: dict[str, Any]
) -> tuple[list[Callable[[], Any]], list[str], str]:
    threads = int(spec["threads"])
    if spec["runtime"] == "onnxruntime":
        import numpy as np

        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        sessions = [_ort_session(p, threads, bool(spec["ort_spinning"])) for p in paths]
        return [_ort_runner(s, x) for s in sessions], ["contiguous"] * len(paths), _cpu_name()
    from search.loading import load_pt2

    loaded = [load_pt2(p).module for p in paths]
    return _torch_callables(loaded, [shape] * len(loaded), spec)


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    spec = job["spec"]
    threads = int(spec["threads"])
    if spec["runtime"] != "onnxruntime":
        import torch  # not needed to time ONNX files: skip its import time

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
    batch = int(spec["batch"])
    fns: list[Callable[[], Any]]
    if job["kind"] == "models":
        fns, formats, device = _model_callables(job["paths"], (batch, *job["input_shape"]), spec)
    elif spec["runtime"] == "onnxruntime":  # blocks the parent exported (``latency._export_blocks``)
        import numpy as np

        fns = []
        for entry in job["entries"]:
            session = _ort_session(entry["path"], threads, bool(spec["ort_spinning"]))
            x = np.random.default_rng(0).standard_normal(entry["shape"]).astype(np.float32)
            fns.append(_ort_runner(session, x))
        formats, device = ["contiguous"] * len(fns), _cpu_name()
    else:
        from search.plan import BlockChoice
        from search.sites import Site
        from search.transfer import build_block

        modules: list[Any] = []
        shapes: list[tuple[int, int, int, int]] = []
        for entry in job["entries"]:
            site_data = dict(entry["site"])
            for key in ("kernel", "stride", "padding", "dilation", "input_size", "output_size"):
                site_data[key] = tuple(site_data[key])
            site = Site(**site_data)
            modules.append(build_block(site, BlockChoice.from_dict(entry["choice"])).eval())
            shapes.append((batch, site.in_channels, *site.input_size))
        fns, formats, device = _torch_callables(modules, shapes, spec)
    if job["kind"] == "blocks" and job.get("base_path"):  # the whole model, timed in the same rounds as its blocks
        models = [job["base_path"], *([job["reference_path"]] if job.get("reference_path") else [])]
        more = _model_callables(models, (batch, *job["input_shape"]), spec)
        fns, formats = fns + more[0], formats + more[1]
    samples = _time_interleaved(fns, int(spec["warmup"]), int(spec["runs_per_round"]), int(spec["rounds"]))
    print(json.dumps([_summary(s, spec, device, f) for s, f in zip(samples, formats, strict=True)]))


if __name__ == "__main__":
    main()
