from __future__ import annotations

import math

import pytest
import torch

from search import (
    BlockChoice,
    Calibration,
    LatencySpec,
    RuntimeUnavailableError,
    find_sites,
    fit_calibration,
    measure_models,
    predict_latency,
    scale_table,
    site_latency_table,
)
from search.errors import InvalidInputError
from search.latency import ANCHOR_LIMITS, anchor_table, state_factor


def _onnx(base):
    import tempfile
    from pathlib import Path

    from search.export import export_onnx

    return export_onnx(base.module, Path(tempfile.mkdtemp()) / "base.onnx", base.input_shape, fast=True, batch=1)


QUICK = {"warmup": 2, "runs_per_round": 3, "rounds": 2}


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_measure_models_in_a_child_process(zoo_model, runtime: str) -> None:
    base = zoo_model("tiny_vgg")
    spec = LatencySpec(runtime, threads=1, batch=2, **QUICK)
    results = measure_models([base.module, base.module], base.input_shape, spec)
    assert len(results) == 2
    for r in results:
        assert r.runtime == runtime and r.threads == 1 and r.batch == 2 and r.runs == 6
        assert 0 < r.p25_ms <= r.median_ms <= r.p75_ms < 1000
        assert r.device.startswith("cpu")
    if runtime == "torch":
        assert results[0].memory_format in ("contiguous", "channels_last")


def test_timing_onnx_files_loads_neither_torch_nor_the_search_package(zoo_model, tmp_path) -> None:
    """The child that times ONNX files is what a user's onnxruntime process would be: no torch in it
    (importing it cost 1.6 s of each child's start, dozens of times a job)."""
    import json
    import subprocess
    from dataclasses import asdict

    from search.latency import child_command, child_env

    base = zoo_model("tiny_vgg")
    job = {"kind": "models", "spec": asdict(LatencySpec("onnxruntime", threads=1, batch=1, **QUICK)),
           "input_shape": list(base.input_shape), "paths": [str(_onnx(base))]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**child_env(1), "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run(child_command(tmp_path / "job.json"), capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300, check=True)
    (result,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["runtime"] == "onnxruntime" and result["median_ms"] > 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "onnxruntime" in imported  # the import log is there to read
    assert "torch" not in imported and "search" not in imported


def test_site_table_and_prediction(zoo_model) -> None:
    base = zoo_model("tiny_vgg")
    sites, _ = find_sites(base.module, base.input_shape)
    choice = BlockChoice("ds", depth_multiplier=1)
    spec = LatencySpec("onnxruntime", threads=1, **QUICK)
    table = site_latency_table(sites, {s.name: [choice] for s in sites}, spec)
    assert set(table) == {s.name for s in sites}
    assert all(set(row) == {"keep", "ds:m=1"} and min(row.values()) > 0 for row in table.values())
    with_base = site_latency_table(sites[:1], {}, spec, base_path=_onnx(base), input_shape=base.input_shape,
                                   reference_path=_onnx(base))
    assert set(with_base) == {sites[0].name, "__model__", "__reference__"}
    assert with_base["__model__"]["keep"] > 0 and with_base["__reference__"]["keep"] > 0
    with pytest.raises(InvalidInputError, match="reference_path needs base_path"):
        site_latency_table(sites[:1], {}, spec, reference_path=_onnx(base))
    plan = {"features.2": choice}
    expected = 1.0 + table["features.2"]["ds:m=1"] - table["features.2"]["keep"]
    assert predict_latency(1.0, table, plan) == pytest.approx(expected)


def test_cuda_without_gpu_is_refused(zoo_model) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    base = zoo_model("tiny_vgg")
    with pytest.raises(RuntimeUnavailableError, match="cuda"):
        measure_models([base.module], base.input_shape, LatencySpec("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_cuda_latency_on_a_gpu(zoo_model) -> None:
    base = zoo_model("tiny_vgg")
    spec = LatencySpec("cuda", threads=1, batch=4, warmup=5, runs_per_round=5, rounds=2)
    (result,) = measure_models([base.module], base.input_shape, spec)
    assert result.runtime == "cuda" and result.batch == 4 and result.median_ms > 0
    assert "cuda" in result.device.lower() or "nvidia" in result.device.lower()
    sites, _ = find_sites(base.module, base.input_shape)
    table = site_latency_table(sites[:2], {}, spec)
    assert all(row["keep"] > 0 for row in table.values())


def test_bad_specs_are_refused() -> None:
    with pytest.raises(InvalidInputError):
        LatencySpec("tensorrt")
    with pytest.raises(InvalidInputError):
        LatencySpec(threads=0)


def test_interleaved_rounds_give_each_model_its_turn_after_the_warm_up() -> None:
    from search._latency_child import _time_interleaved

    order: list[int] = []
    fns = [lambda i=i: order.append(i) for i in range(2)]
    samples = _time_interleaved(fns, warmup=2, runs_per_round=3, rounds=2)
    assert [len(s) for s in samples] == [6, 6]
    assert order == [0, 0, 1, 1] + ([0] * 3 + [1] * 3) * 2  # warm-up each, then turns round by round


def test_spinning_onnxruntime_pools_stop_spinning_when_their_run_returns(zoo_model) -> None:
    """Interleaved sessions each own a pool; one left spinning after its turn would take the cores
    from the next session timed, so spinning sessions stop their pools after each Run."""
    from search._latency_child import _ort_session

    path = str(_onnx(zoo_model("tiny_vgg")))
    entries = [(_ort_session(path, 2, spinning).get_session_options(), spinning) for spinning in (True, False)]
    for options, spinning in entries:
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")
        assert options.intra_op_num_threads == 2
    assert entries[0][0].get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(RuntimeError, match="force_spinning_stop"):  # no pool spins: nothing to stop
        entries[1][0].get_session_config_entry("session.force_spinning_stop")


def test_calibration_fits_the_line_through_timed_plans_and_ignores_one_wild_timing() -> None:
    predicted = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    pairs = [(p, 0.05 + 0.7 * p) for p in predicted]
    assert fit_calibration(pairs[:2]) is None  # too few to learn anything
    line = fit_calibration(pairs)
    assert line is not None and line.slope == pytest.approx(0.7) and line.offset == pytest.approx(0.05)
    assert line.expected(0.5) == pytest.approx(0.4) and line.predicted_for(0.4) == pytest.approx(0.5)
    wild = fit_calibration([*pairs[:-1], (0.9, 1.5)])  # one plan timed during a slow spell
    assert wild is not None and wild.slope == pytest.approx(0.7) and wild.offset == pytest.approx(0.05)


def test_calibration_is_a_plain_factor_until_the_plans_spread() -> None:
    same = fit_calibration([(0.5, 0.4), (0.5, 0.42), (0.505, 0.38)])
    assert same == Calibration(0.0, pytest.approx(0.4 / 0.5), 0.38)
    upside_down = fit_calibration([(0.3, 0.6), (0.5, 0.4), (0.7, 0.2)])  # a negative slope is noise
    assert upside_down == Calibration(0.0, pytest.approx(0.8), 0.2)  # the median ratio alone
    assert Calibration(0.0, 10.0).expected(0.3) == pytest.approx(0.6)  # never beyond 2x the prediction


def test_calibration_of_a_table_that_predicts_plans_near_zero_follows_the_line() -> None:
    # vgg_seed in onnxruntime on a 2-core EPYC: SS plans the table put at ~0-0.1x measured 0.17-0.31x.
    pairs = [(0.086, 0.225), (0.105, 0.313), (0.104, 0.200), (0.049, 0.244), (0.030, 0.205), (0.006, 0.211),
             (0.037, 0.184), (-0.004, 0.166), (0.095, 0.255)]
    line = fit_calibration(pairs)
    assert line is not None and line.floor == 0.166
    assert line.expected(0.001) == pytest.approx(line.offset + line.slope * 0.001)  # not 0.002
    assert 0.15 < line.expected(0.001) < 0.25 and 0.15 < line.expected(-0.01) < 0.25
    assert line.expected(0.1) == pytest.approx(line.offset + line.slope * 0.1)


def test_a_table_whose_convs_alone_outweigh_the_model_is_scaled_to_it() -> None:
    # resnet20 in onnxruntime (EPYC): its convs timed alone summed to ~1.9x the whole model, and
    # base + the sum of differences predicted negative latencies for slim plans.
    table = {"a": {"keep": 0.5, "ss:r=4": 0.1}, "b": {"keep": 0.5, "ss:r=4": 0.1}}
    plan = {"a": BlockChoice("ss", rank=4), "b": BlockChoice("ss", rank=4)}
    assert predict_latency(0.5, table, plan) < 0
    scaled, scale = scale_table(table, 0.5)
    assert scale == pytest.approx(0.5) and scaled["a"]["keep"] == pytest.approx(0.25)
    assert predict_latency(0.5, scaled, plan) == pytest.approx(0.5 * 0.2 / 1.0)
    assert table["a"]["keep"] == 0.5  # the measured table is left as it was
    # vgg_seed's convs alone sum to about the whole model (Xeon): the table stays as timed
    near = {"a": {"keep": 0.52, "ss:r=4": 0.1}, "b": {"keep": 0.52, "ss:r=4": 0.1}}
    assert scale_table(near, 1.0) == (near, 1.0)
    # ... but at 1.25x (EPYC, onnxruntime) it predicted SS plans measured at ~0.2x near 0x
    over = {"a": {"keep": 0.625, "ss:r=4": 0.1}, "b": {"keep": 0.625, "ss:r=4": 0.1}}
    assert scale_table(over, 1.0)[1] == pytest.approx(0.8)
    under = {"a": {"keep": 0.3, "ss:r=4": 0.1}, "b": {"keep": 0.3, "ss:r=4": 0.1}}
    assert scale_table(under, 1.0) == (under, 1.0)  # never scaled up


def test_the_state_factor_moves_a_plan_as_far_as_it_is_from_the_base_towards_the_reference() -> None:
    # The reference ran at 0.2x when the table was timed and at 0.3x now (a slow spell).
    assert state_factor(0.2, 0.2, 0.3, 0.2) == pytest.approx(1.5)  # as slim as the reference
    assert state_factor(math.sqrt(0.2), 0.2, 0.3, 0.2) == pytest.approx(math.sqrt(1.5))  # half way, on a log scale
    assert state_factor(0.04, 0.2, 0.3, 0.2) == pytest.approx(1.5**2)  # twice as far: capped there
    assert state_factor(0.01, 0.2, 0.3, 0.2) == pytest.approx(1.5**2)
    for plan in (1.0, 1.3):  # the base, or slower than it: the base barely moves in a slow spell
        assert state_factor(plan, 0.2, 0.3, 0.2) == 1.0
    assert state_factor(0.5, 0.2, 0.0, 0.2) == 1.0 and state_factor(0.5, 1.0, 0.3, 0.2) == 1.0


def test_an_anchored_table_predicts_the_reference_at_its_measured_ratio() -> None:
    table = {"a": {"keep": 1.0, "ss:r=4": 0.5, "ds:m=1": 0.4}, "b": {"keep": 2.0, "ss:r=4": 1.0}}
    reference = {"a": BlockChoice("ds", depth_multiplier=1), "b": BlockChoice("ss", rank=4)}
    other = {"a": BlockChoice("ss", rank=4)}
    base_ms = 4.0
    predicted = predict_latency(base_ms, table, reference) / base_ms  # 1 - 1.6 / 4 = 0.6
    anchored, factor = anchor_table(table, predicted, 0.4)
    assert factor == pytest.approx(1.5)  # (1 - 0.4) / (1 - 0.6)
    assert predict_latency(base_ms, anchored, reference) / base_ms == pytest.approx(0.4)
    # Every plan on the line through the base and the reference; convs (keep) stay as timed.
    assert predict_latency(base_ms, anchored, other) / base_ms == pytest.approx(1 - 1.5 * 0.125)
    assert all(anchored[s]["keep"] == table[s]["keep"] for s in table)
    assert anchor_table(table, predicted, 0.99)[1] == ANCHOR_LIMITS[0]
    assert anchor_table(table, 0.9, 0.05)[1] == ANCHOR_LIMITS[1]
    for bad in ((1.0, 0.4), (0.6, 1.2), (0.0, 0.4)):  # not a speed-up, or no figure: as timed
        assert anchor_table(table, *bad) == (table, 1.0)
