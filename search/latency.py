"""Latency measured on the runtime a user deploys on, in a separate process with fixed threads.

Runtimes: ``torch`` (eager, CPU threads; contiguous and ``channels_last`` both tried, the faster
kept), ``onnxruntime`` (CPU execution provider, intra-op threads, one inter-op thread) and ``cuda``
(eager on the GPU, timed with a device synchronise per run). Models are interleaved round by round;
each figure is the median over all timed runs.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from search.errors import InvalidInputError, RuntimeUnavailableError, SearchError
from search.export import export_onnx
from search.plan import BlockChoice, Plan
from search.sites import Site

RUNTIMES = ("torch", "onnxruntime", "cuda")


@dataclass(frozen=True)
class LatencySpec:
    """Where and how to time: runtime, threads, batch, and how many runs."""

    runtime: str = "onnxruntime"
    threads: int = 2
    batch: int = 1
    warmup: int = 10
    runs_per_round: int = 10
    rounds: int = 5
    ort_spinning: bool = True
    """onnxruntime's intra-op spin-waiting, on as in onnxruntime's own default (what a user's session
    does). Interleaved sessions each own a thread pool, and an idle pool that still spins takes the
    cores from the session being timed, so with it on each session also sets
    ``session.force_spinning_stop``: its pool parks when its Run returns (a session timed alone runs
    as fast with it as without). ``bench/ort_timing.py`` (2-core EPYC VM, vgg_seed, 2 threads, batch
    1, ratio to the base, mean +- sd of six repeats): SS cout/4 0.308 +- 0.026 and cout/8 0.214 +-
    0.025 this way; 0.272 +- 0.041 and 0.191 +- 0.051 with the 20 ms pause and 20 ms of untimed runs
    before each turn that the search used until 2026-12-04 (its base timings had a mode three times
    slower); 0.282 +- 0.059 and 0.199 +- 0.045 with each model alone in its own process. On a 2-core
    Xeon, spinning off gave 0.46x, 0.32x, 0.28x for SS cout/4, cout/8, DS m=1, against 0.29x, 0.22x,
    0.22x with it on."""

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise InvalidInputError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if not 1 <= self.threads <= 256:
            raise InvalidInputError(f"threads must be 1..256, got {self.threads}")
        if not 1 <= self.batch <= 4096:
            raise InvalidInputError(f"batch must be 1..4096, got {self.batch}")
        if self.warmup < 0 or self.runs_per_round < 1 or self.rounds < 1:
            raise InvalidInputError("warmup >= 0, runs_per_round >= 1 and rounds >= 1 are required")


@dataclass
class LatencyResult:
    """A median latency and the conditions it was measured in."""

    median_ms: float
    runtime: str
    threads: int
    batch: int
    device: str
    runs: int
    memory_format: str = "contiguous"
    p25_ms: float = 0.0
    p75_ms: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


_CHILD = Path(__file__).with_name("_latency_child.py")
_LAUNCH = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def child_command(job_path: str | Path) -> list[str]:
    """The command that times ``job_path``: the child's file run as a script, not ``-m
    search._latency_child``, which would import the ``search`` package and with it torch (1.6 s of a
    1.8 s start on a 2-core Xeon) into a process that times ONNX files; it imports what its job needs."""
    return [sys.executable, "-c", _LAUNCH, str(_CHILD), str(job_path)]


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def _run_child(job: dict[str, Any], threads: int, timeout: float) -> list[dict[str, Any]]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(job, handle)
        job_path = handle.name
    try:
        proc = subprocess.run(
            child_command(job_path), capture_output=True, text=True, env=child_env(threads), timeout=timeout,
            check=False,
        )
    finally:
        os.unlink(job_path)
    if proc.returncode != 0:
        raise SearchError(f"latency measurement failed: {proc.stderr.strip()[-800:]}")
    results: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def _check_runtime(spec: LatencySpec) -> None:
    if spec.runtime == "cuda" and not cuda_available():
        raise RuntimeUnavailableError("runtime 'cuda' asked for, but this machine has no CUDA GPU")


def measure_models(
    modules: list[nn.Module],
    input_shape: tuple[int, int, int],
    spec: LatencySpec,
    workdir: str | Path | None = None,
    timeout: float = 900.0,
) -> list[LatencyResult]:
    """End-to-end latency of each module, interleaved in one child process.

    The child times what a user would run: the ONNX file in onnxruntime, or our ``.pt2`` export
    (read back with our own reader) in torch eager.
    """
    from search.export import export_pt2

    _check_runtime(spec)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        paths = []
        for i, module in enumerate(modules):
            if spec.runtime == "onnxruntime":
                onnx_path = Path(tmp) / f"m{i}.onnx"
                paths.append(str(export_onnx(module, onnx_path, input_shape, fast=True, batch=spec.batch)))
            else:
                paths.append(str(export_pt2(module, Path(tmp) / f"m{i}.pt2", input_shape)))
        job = {"kind": "models", "spec": asdict(spec), "input_shape": list(input_shape), "paths": paths}
        raw = _run_child(job, spec.threads, timeout)
    return [LatencyResult(**r) for r in raw]


def measure_files(
    paths: Sequence[str | Path], input_shape: tuple[int, int, int], spec: LatencySpec, timeout: float = 900.0
) -> list[LatencyResult]:
    """Latency of exported files: ``.onnx`` for onnxruntime, our ``.pt2`` for torch and cuda."""
    _check_runtime(spec)
    job = {"kind": "models", "spec": asdict(spec), "input_shape": list(input_shape), "paths": [str(p) for p in paths]}
    return [LatencyResult(**r) for r in _run_child(job, spec.threads, timeout)]


BASE_ROW = "__model__"
"""Row of ``site_latency_table`` holding the whole model's latency (key ``keep``), when asked for."""
REFERENCE_ROW = "__reference__"
"""Row of ``site_latency_table`` holding the reference model's latency (key ``keep``), when asked for."""


def site_latency_table(
    sites: list[Site], choices: dict[str, list[BlockChoice]], spec: LatencySpec, timeout: float = 1800.0,
    base_path: str | Path | None = None, input_shape: tuple[int, int, int] | None = None,
    reference_path: str | Path | None = None,
) -> dict[str, dict[str, float]]:
    """Each candidate block timed alone at its site's real input shape: ``{site: {choice key: ms}}``.

    ``keep`` (the original conv) is always timed, so a plan's latency can be predicted as the
    measured base latency plus the sum of per-site differences (``predict_latency``). With
    ``base_path`` (the exported base model) the whole model is timed in the same rounds, under the
    same conditions, in row ``BASE_ROW``: predictions should start from that figure. With
    ``reference_path`` too (another exported model, needs ``base_path``), that model as well, in row
    ``REFERENCE_ROW``: the search's gauge of the machine's state (``state_factor``).
    """
    _check_runtime(spec)
    pairs = [(site, choice) for site in sites
             for choice in {c.key: c for c in [BlockChoice(), *choices.get(site.name, [])]}.values()]
    entries = [{"site": site.to_dict(), "choice": choice.to_dict()} for site, choice in pairs]
    job: dict[str, Any] = {"kind": "blocks", "spec": asdict(spec), "entries": entries}
    if base_path is not None:
        if input_shape is None:
            raise InvalidInputError("base_path needs input_shape")
        job.update(base_path=str(base_path), input_shape=list(input_shape))
    if reference_path is not None:
        if base_path is None:
            raise InvalidInputError("reference_path needs base_path")
        job["reference_path"] = str(reference_path)
    with tempfile.TemporaryDirectory() as tmp:
        if spec.runtime == "onnxruntime":
            _export_blocks(pairs, entries, spec.batch, Path(tmp))
        raw = _run_child(job, spec.threads, timeout)
    table: dict[str, dict[str, float]] = {}
    if reference_path is not None:
        table[REFERENCE_ROW] = {"keep": float(raw.pop()["median_ms"])}
    if base_path is not None:
        table[BASE_ROW] = {"keep": float(raw.pop()["median_ms"])}
    for entry, result in zip(entries, raw, strict=True):
        key = BlockChoice.from_dict(entry["choice"]).key
        table.setdefault(entry["site"]["name"], {})[key] = float(result["median_ms"])
    return table


def _export_blocks(pairs: list[tuple[Site, BlockChoice]], entries: list[dict[str, Any]], batch: int, folder: Path) -> None:
    """Each block as an ONNX file, its entry's ``path``, with its input's ``shape``, written here,
    where torch is loaded already: the child then times files without importing torch (a tiny test
    job's table, 33 blocks, went from about 4 s to 0.4 s on a 2-core EPYC)."""
    from search.transfer import build_block

    for i, ((site, choice), entry) in enumerate(zip(pairs, entries, strict=True)):
        block = build_block(site, choice).eval()
        shape = (site.in_channels, *site.input_size)
        entry["path"] = str(export_onnx(block, folder / f"b{i}.onnx", shape, fast=True, batch=batch))
        entry["shape"] = [batch, *shape]


def predict_latency(base_ms: float, table: dict[str, dict[str, float]], plan: Plan) -> float:
    """Base latency plus, for each replaced site, block time minus conv time."""
    total = base_ms
    for site, choice in plan.items():
        if choice.kind != "keep":
            total += table[site][choice.key] - table[site]["keep"]
    return total


def state_factor(predicted: float, reference_predicted: float, reference_now: float, reference_then: float) -> float:
    """How far the machine's state moves a plan's latency ratio from what the table saw: the
    reference model's ratio to the base now (``reference_now``, timed in the same rounds as the plan)
    over its ratio when the table was timed (``reference_then``), raised to how far the plan is from
    the base, on a log scale, as a share of how far the reference is (both as the table predicts
    them), so the base itself moves by 1 and a plan as slim as the reference by the whole factor.

    Why: a 2-core EPYC VM passes through spells of seconds in which slim models run up to twice as
    slow and the base about 15 % slower. Six vgg_seed models timed round by round for 60 s (2 threads,
    batch 1, 20 runs a turn): each slim plan's ratio to the base varied with a coefficient of
    variation of 0.20-0.25, its ratio to another slim plan 0.08-0.11. Grouped into 1 s timings, a
    plan's ratio fell within 15 % of its own ratio at another moment 37-40 % of the time, and 94-98 %
    of the time once moved by the reference's change. 1.0 where any figure is missing or not a
    speed-up."""
    if not (0 < predicted < 1 and 0 < reference_predicted < 1 and reference_now > 0 and reference_then > 0):
        return 1.0
    weight = min(max(math.log(predicted) / math.log(reference_predicted), 0.0), 2.0)
    return float((reference_now / reference_then) ** weight)


TABLE_SCALE_AT = 1.1
"""``scale_table`` rescales a table whose sites' convs, timed alone, sum to more than this many times
the whole model."""


def scale_table(table: dict[str, dict[str, float]], model_ms: float) -> tuple[dict[str, dict[str, float]], float]:
    """The table rescaled so its convs sum to the whole model's time, where timed alone they cost far more.

    Each block timed alone pays a run's fixed cost (a session call, thread wake-up). On a small model
    those costs outweigh the convs: resnet20's 19 convs timed alone summed to 0.83 ms in onnxruntime
    (2-core EPYC, 2 threads, batch 1) against 0.43 ms for the whole model, so base plus the sum of
    differences predicted negative latencies, and 1 trial of a 40-trial job came within 15 %.
    Scaled, the same trials' predictions came within 15 % for 82 % of them (81 % calibrated).
    vgg_seed's convs alone sum to 0.86-1.05x its whole model on a 2-core Xeon; there scaling left the
    calibrated predictions as they were but moved the raw ones off, so tables under ``TABLE_SCALE_AT``
    stay as timed. On a 2-core EPYC they summed to 1.25x and 1.29x in onnxruntime (the threshold was
    1.25): left as timed, the 40 timed trials of that job were predicted 73 % too fast (median), none
    within 15 %, and plans measured at 0.17-0.21x were predicted near 0x; scaled, 24 of the 40 within
    15 % (median error 10 %). A table that sums to less than the model (torch eager, 0.65x there) is
    not scaled up: the rest of the model (pooling, activations, the classifier) may be what is missing.
    Returns the table to predict with and the factor applied (1.0: as timed).
    """
    keep_sum = sum(row["keep"] for row in table.values())
    if model_ms <= 0 or keep_sum <= TABLE_SCALE_AT * model_ms:
        return table, 1.0
    scale = model_ms / keep_sum
    return {site: {key: ms * scale for key, ms in row.items()} for site, row in table.items()}, scale


ANCHOR_LIMITS = (0.5, 2.5)
"""The most ``anchor_table`` stretches or shrinks a table's differences from the base."""


def anchor_table(table: dict[str, dict[str, float]], predicted: float, measured: float) -> tuple[dict[str, dict[str, float]], float]:
    """The table with every block's difference from its site's conv multiplied by one factor, so that
    a plan it predicted at ratio ``predicted`` (the reference plan) is predicted at ``measured``, its
    ratio to the base timed whole in the table's own rounds: the line through the base (1, 1) and
    the reference, before any trial is timed.

    Blocks timed alone can all be off together: in a resnet20 onnxruntime job (2-core EPYC) the table
    predicted 0.63-0.78x for plans that measured 0.37-0.67x, 2 of 40 within 15 %, and its greedy and
    knapsack seeds for a 0.65x budget measured 0.42-0.46x. The reference, timed whole in the same
    rounds, ran at 0.456x where the table said 0.662x. Replayed on that job and two vgg_seed ones of
    2026-12-04 (with each trial's ``state_factor``): 40, 40 and 38 of 40 trials within 15 % (median
    error 2.5 %, 2.4 %, 6.3 %), against 1, 40 and 1 of 40 with the table as timed. Returns the table and the factor (1.0:
    as timed, where either ratio is not a speed-up); the factor stays within ``ANCHOR_LIMITS``."""
    if not (0 < predicted < 1 and 0 < measured < 1):
        return table, 1.0
    factor = min(max((1.0 - measured) / (1.0 - predicted), ANCHOR_LIMITS[0]), ANCHOR_LIMITS[1])
    anchored = {site: {key: row["keep"] + factor * (ms - row["keep"]) for key, ms in row.items()} for site, row in table.items()}
    return anchored, factor


@dataclass(frozen=True)
class Calibration:
    """The per-site table's predicted latency ratio corrected on one runtime and machine:
    ``expected = offset + slope * predicted``, kept within 0.5x..2x of the prediction, or of
    ``floor`` (the fastest ratio timed among the plans it was fitted on) for a prediction under it.

    The table's error is not a constant factor: blocks timed alone miss what a whole model pays
    (weights out of cache, per-op overhead), and the share that matters changes with how much of
    the model a plan replaces. Replayed on five 40-trial jobs (vgg_seed on torch eager and
    onnxruntime, resnet20 on onnxruntime; 2-core Xeon), a line fitted on the trials timed so far
    predicted every later trial within 15 % (worst 5.0-10.1 %); one constant factor (the median)
    missed by up to 19 % (torch) and 16 % (resnet20).
    """

    offset: float = 0.0
    slope: float = 1.0
    floor: float = 0.0
    """A table can predict plans far faster than any plan runs: vgg_seed's in onnxruntime (2-core
    EPYC) put SS plans measured at 0.17-0.21x at -0.004-0.006x, where 0.5x..2x of the prediction
    pinned the line (0.20 + 0.65 x predicted) to nearly 0 and the screen let every plan through."""

    def expected(self, predicted: float) -> float:
        reference = max(predicted, self.floor)
        return min(max(self.offset + self.slope * predicted, 0.5 * reference), 2.0 * reference)

    def predicted_for(self, ratio: float) -> float:
        """The predicted ratio whose expected ratio is ``ratio`` (where the line applies)."""
        return (ratio - self.offset) / self.slope


def fit_calibration(pairs: Sequence[tuple[float, float]], min_pairs: int = 3) -> Calibration | None:
    """Fit ``Calibration`` on ``(predicted, measured)`` latency ratios of timed plans; ``None`` with
    fewer than ``min_pairs``.

    Theil-Sen (the median of the pairwise slopes, then the median offset), so one noisy measurement
    does not tilt the line. While the predicted ratios are too close together to show a slope, or the
    slope found is implausible, it is the median ratio alone (offset 0).
    """
    if len(pairs) < min_pairs:
        return None
    predicted = [p for p, _ in pairs]
    measured = [m for _, m in pairs]
    scale = min(max(statistics.median(m / p for p, m in pairs), 0.5), 2.0)
    spread = max(predicted) - min(predicted)
    floor = min(measured)
    if spread < 0.05 * statistics.mean(predicted):
        return Calibration(0.0, scale, floor)
    slopes = [(measured[j] - measured[i]) / (predicted[j] - predicted[i])
              for i in range(len(pairs)) for j in range(i + 1, len(pairs))
              if abs(predicted[j] - predicted[i]) > 0.01 * spread]
    slope = statistics.median(slopes)
    if not 0.2 <= slope <= 5.0:
        return Calibration(0.0, scale, floor)
    offset = statistics.median(m - slope * p for p, m in pairs)
    return Calibration(offset, slope, floor)
