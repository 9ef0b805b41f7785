"""The calls the search and the service make: analyse a model, score it, export a candidate."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from search.costs import count_flops, count_params
from search.export import export_onnx, export_pt2, export_safetensors, onnx_max_abs_diff
from search.latency import LatencyResult, LatencySpec, measure_files, measure_models
from search.loading import BaseModel
from search.plan import Plan, plan_to_dict
from search.sites import Site, SkippedConv, find_sites

ONNX_TOLERANCE = 1e-3
"""Largest accepted |onnxruntime - torch| on random normalised inputs, relative to the output scale."""


def analyse(base: BaseModel, specs: list[LatencySpec] | None = None, *, flops: int | None = None,
            found: tuple[list[Site], list[SkippedConv]] | None = None) -> dict[str, Any]:
    """Sites, FLOPs, params and measured latency of the base model, as plain data.

    Args:
        base: a loaded model.
        specs: runtimes to time the model on (none: no latency).
        flops, found: the model's FLOPs and ``find_sites`` result when the caller has them already.

    Returns:
        ``{"name", "input_shape", "flops", "params", "latency_ms", "latency", "sites", "skipped"}``;
        ``latency_ms`` is the first spec's median, ``latency`` every spec's full result.
    """
    flops = count_flops(base.module, base.input_shape) if flops is None else flops
    sites, skipped = find_sites(base.module, base.input_shape, flops) if found is None else found
    results = [measure_models([base.module], base.input_shape, spec)[0] for spec in specs or []]
    return {
        "name": base.name,
        "input_shape": list(base.input_shape),
        "flops": flops,
        "params": count_params(base.module),
        "latency_ms": results[0].median_ms if results else None,
        "latency": [r.to_dict() for r in results],
        "sites": [s.to_dict() for s in sites],
        "skipped": [asdict(s) for s in skipped],
        "site_flops_share": sum(s.flops_share for s in sites),
    }


@torch.no_grad()
def predict(module: nn.Module, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Logits for normalised NCHW ``images``.

    Batches go in as ``channels_last``, 64 at a time: on a 2-core Xeon (torch CPU, 2 threads, 5k
    CIFAR images) that took a vgg_seed candidate from 6.0 s to 1.2-2.1 s, vgg_seed from 9.4 s to
    5.2 s and resnet20 from 2.6 s to 2.2 s against contiguous batches of 256. Every trial is scored
    this way, so it is a large part of a trial's time. The logits differ only by float rounding.
    """
    module.eval()
    return torch.cat([module(images[i : i + batch].contiguous(memory_format=torch.channels_last)).contiguous()
                      for i in range(0, images.shape[0], batch)])


def accuracy(module: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return float((predict(module, images).argmax(1) == labels).float().mean() * 100.0)


def agreement(module: nn.Module, reference: nn.Module, images: torch.Tensor) -> float:
    """Percent of images on which ``module`` predicts the same class as ``reference``."""
    return float((predict(module, images).argmax(1) == predict(reference, images).argmax(1)).float().mean() * 100.0)


def export_candidate(
    base: BaseModel,
    module: nn.Module,
    plan: Plan,
    out_dir: str | Path,
    specs: list[LatencySpec],
    accuracy_figures: dict[str, float | None] | None = None,
    base_figures: dict[str, Any] | None = None,
    channels_last: bool = False,
    training: dict[str, Any] | None = None,
    timing_repeats: int = 1,
    timer: Callable[[LatencySpec, list[Path]], tuple[LatencyResult, LatencyResult]] | None = None,
) -> dict[str, Any]:
    """Write ``model.pt2``, ``model.onnx``, ``model.safetensors`` and ``report.json`` for a candidate.

    The ONNX file is checked against PyTorch in onnxruntime (the max abs diff is in the report), and
    every latency in the report is measured on the written files, base and candidate interleaved.
    With ``timing_repeats`` > 1 each runtime is timed that many times, each in a fresh process, the
    runtimes taking turns so the repeats spread over time; the report gives the median of the
    repeats and the range of their ratios. ``training`` (how the candidate was fine-tuned) goes into the report as it is.
    ``timer`` takes one timing of ``[base file, candidate file]`` on a spec instead of
    ``measure_files`` (the search's times its runtime with its reference plan, taken again in slow spells).

    Raises:
        SearchError: the ONNX output differs from PyTorch beyond the tolerance.
    """
    from search.errors import SearchError

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    shape = base.input_shape
    export_pt2(module, out / "model.pt2", shape, channels_last=channels_last)
    export_onnx(module, out / "model.onnx", shape)
    diff = onnx_max_abs_diff(out / "model.onnx", module, shape)
    with torch.no_grad():
        scale = float(module(base.example_input(4)).abs().max()) or 1.0
    if diff > ONNX_TOLERANCE * max(scale, 1.0):
        raise SearchError(f"ONNX export differs from PyTorch by {diff:.3g} (tolerance {ONNX_TOLERANCE} x scale)")
    plan_data = plan_to_dict(plan)
    export_safetensors(
        module, out / "model.safetensors",
        {"plan": plan_data, "input_shape": list(shape), "mean": base.mean, "std": base.std},
    )
    base_dir = out / "_base"
    base_dir.mkdir(exist_ok=True)
    files = []
    for spec in specs:
        if spec.runtime == "onnxruntime":
            files.append([export_onnx(base.module, base_dir / "base.onnx", shape), out / "model.onnx"])
        else:
            files.append([export_pt2(base.module, base_dir / "base.pt2", shape), out / "model.pt2"])
    runs: list[list[tuple[LatencyResult, LatencyResult]]] = [[] for _ in specs]
    for _ in range(max(1, timing_repeats)):
        for spec, pair, done in zip(specs, files, runs, strict=True):
            base_res, cand_res = timer(spec, pair) if timer is not None else measure_files(pair, shape, spec)
            done.append((base_res, cand_res))
    latency = [_latency_entry(done) for done in runs]
    for spec, entry in zip(specs, latency, strict=True):
        if spec.runtime != "onnxruntime" and entry["memory_format"] == "channels_last" and not channels_last:
            # torch ran it faster in channels_last: ship the .pt2 with channels_last weights.
            channels_last = True
            export_pt2(module, out / "model.pt2", shape, channels_last=True)
    for path in base_dir.iterdir():
        path.unlink()
    base_dir.rmdir()
    flops = count_flops(module, shape)
    report = {
        "plan": plan_data,
        "input_shape": list(shape),
        "normalisation": {"mean": base.mean, "std": base.std},
        "flops": flops,
        "params": count_params(module),
        "latency": latency,
        "accuracy": accuracy_figures or {},
        "training": training,
        "onnx_max_abs_diff": diff,
        "pt2_memory_format": "channels_last" if channels_last else "contiguous",
        "base": base_figures or {"flops": count_flops(base.module, shape), "params": count_params(base.module)},
        "files": ["model.pt2", "model.onnx", "model.safetensors"],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    return report


UNSTEADY_SPREAD = 0.25
"""Spread of a candidate's repeated timing ratios (max - min, over their median) past which its
report warns. The five final timings of vgg_seed candidates spread 6 % (0.240-0.255x onnxruntime) and
5 % (0.475-0.498x torch eager) in two jobs of README's Benchmarks, and 57 % (0.245-0.419x torch
eager) on a 2-core EPYC VM whose slim-model speed switches by 1.6x."""


def _latency_entry(runs: list[tuple[LatencyResult, LatencyResult]]) -> dict[str, Any]:
    """One runtime's figures for the report from one or more ``(base, candidate)`` timings: the
    median of the timings' medians and ratios, the range of the ratios, and the (median) quartiles
    of both models' runs, so a reader sees how steady the machine was (on a shared 2-core VM the
    same candidate's ratio moved from 0.17x to 0.27x within minutes). When the ratios of several
    timings spread over more than ``UNSTEADY_SPREAD`` of their median, ``warning`` says so."""
    bases = [b for b, _ in runs]
    cands = [c for _, c in runs]
    ratios = [c.median_ms / b.median_ms for b, c in runs if b.median_ms > 0]
    formats = [c.memory_format for c in cands]
    spread = (max(ratios) - min(ratios)) / statistics.median(ratios) if len(ratios) > 1 else None
    warning = None
    if spread is not None and spread > UNSTEADY_SPREAD:
        warning = (f"the {len(ratios)} timings' ratios spread {min(ratios):.3f}-{max(ratios):.3f}x, {spread:.0%} of "
                   "their median: the machine's speed changed between them; time the model again where it will run "
                   "before trusting the median")
    return {
        "runtime": cands[0].runtime,
        "threads": cands[0].threads,
        "batch": cands[0].batch,
        "device": cands[0].device,
        "statistic": "median",
        "runs": cands[0].runs,
        "repeats": len(runs),
        "latency_ms": statistics.median(c.median_ms for c in cands),
        "p25_ms": statistics.median(c.p25_ms for c in cands),
        "p75_ms": statistics.median(c.p75_ms for c in cands),
        "memory_format": max(set(formats), key=formats.count),
        "base_latency_ms": statistics.median(b.median_ms for b in bases),
        "base_p25_ms": statistics.median(b.p25_ms for b in bases),
        "base_p75_ms": statistics.median(b.p75_ms for b in bases),
        "base_memory_format": bases[0].memory_format,
        "ratio": statistics.median(ratios) if ratios else None,
        "ratio_min": min(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
        "ratios": ratios,
        "ratio_spread": spread,
        "warning": warning,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
