from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from search import BlockChoice, BlockFitter, LatencySpec, apply_plan, export_candidate, find_sites, load_pt2
from search.engine import _latency_entry
from search.export import export_onnx, export_pt2, onnx_max_abs_diff
from search.latency import LatencyResult, measure_files


def _slim(zoo_model, images):
    base = zoo_model("odd_net")
    sites, _ = find_sites(base.module, base.input_shape)
    fitter = BlockFitter(base.module, sites, base.normalise(images))
    plan = {
        "dilated": BlockChoice("ds", depth_multiplier=1),
        "down": BlockChoice("ss", rank=8),
        "wide": BlockChoice("ds", depth_multiplier=2),
    }
    return base, plan, apply_plan(base.module, plan, fitter)


def test_onnx_matches_torch_at_any_batch(zoo_model, images, tmp_path) -> None:
    base, _, slim = _slim(zoo_model, images)
    path = export_onnx(slim, tmp_path / "m.onnx", base.input_shape)
    assert onnx_max_abs_diff(path, slim, base.input_shape) < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(7, *base.input_shape)
    (out,) = session.run(None, {"x": x.numpy()})
    assert out.shape == (7, 10)
    assert np.abs(out - slim(x).detach().numpy()).max() < 1e-4


def test_pt2_round_trip_through_our_reader_and_torch(zoo_model, images, tmp_path) -> None:
    base, _, slim = _slim(zoo_model, images)
    for channels_last in (False, True):
        path = export_pt2(slim, tmp_path / f"m{channels_last}.pt2", base.input_shape, channels_last)
        x = torch.randn(5, *base.input_shape)
        ours = load_pt2(path).module
        theirs = torch.export.load(path).module()  # our own export: torch's loader is allowed
        torch.testing.assert_close(ours(x), slim(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs(x), slim(x), rtol=1e-4, atol=1e-4)


def test_export_candidate_writes_every_format_and_a_report(zoo_model, images, tmp_path) -> None:
    base, plan, slim = _slim(zoo_model, images)
    quick = {"threads": 1, "batch": 1, "warmup": 2, "runs_per_round": 3, "rounds": 2}
    specs = [LatencySpec("onnxruntime", **quick), LatencySpec("torch", **quick)]  # type: ignore[arg-type]
    calls: list[tuple[str, list[str], float]] = []

    def timer(spec: LatencySpec, pair: list[Path]) -> tuple[LatencyResult, LatencyResult]:  # the search's hook
        base_res, cand_res = measure_files(pair, base.input_shape, spec)
        calls.append((spec.runtime, [Path(f).name for f in pair], cand_res.median_ms / base_res.median_ms))
        return base_res, cand_res

    report = export_candidate(base, slim, plan, tmp_path, specs, {"val_accuracy": 12.5, "holdout_accuracy": None},
                              timing_repeats=3, timer=timer)
    # every timing went through the timer, the runtimes taking turns, base first
    assert [c[0] for c in calls] == ["onnxruntime", "torch"] * 3
    assert [c[1] for c in calls] == [["base.onnx", "model.onnx"], ["base.pt2", "model.pt2"]] * 3
    assert [lat["ratios"] for lat in report["latency"]] == [[c[2] for c in calls[i::2]] for i in (0, 1)]
    for name in ("model.pt2", "model.onnx", "model.safetensors", "report.json"):
        assert (tmp_path / name).stat().st_size > 0
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["plan"]["down"] == {"kind": "ss", "rank": 8}
    assert on_disk["onnx_max_abs_diff"] < 1e-3
    assert [lat["runtime"] for lat in on_disk["latency"]] == ["onnxruntime", "torch"]
    for lat in on_disk["latency"]:
        assert lat["threads"] == 1 and lat["batch"] == 1 and lat["device"].startswith("cpu")
        assert lat["statistic"] == "median" and lat["latency_ms"] > 0 and lat["base_latency_ms"] > 0
        assert lat["p25_ms"] <= lat["latency_ms"] <= lat["p75_ms"]
        assert lat["base_p25_ms"] <= lat["base_latency_ms"] <= lat["base_p75_ms"]
        # three timings, each in its own process: the ratio is their median, with their range
        assert lat["repeats"] == 3 and len(lat["ratios"]) == 3
        assert lat["ratio"] == sorted(lat["ratios"])[1] and lat["ratio_min"] <= lat["ratio"] <= lat["ratio_max"]
    assert on_disk["pt2_memory_format"] == on_disk["latency"][1]["memory_format"]
    x = torch.randn(3, *base.input_shape)
    torch.testing.assert_close(load_pt2(tmp_path / "model.pt2").module(x), slim(x), rtol=1e-4, atol=1e-4)
    assert on_disk["flops"] < on_disk["base"]["flops"]
    state = load_file(str(tmp_path / "model.safetensors"))
    assert set(state) == set(slim.state_dict())
    assert not (tmp_path / "_base").exists()


def test_timings_that_scatter_get_a_warning() -> None:
    def pair(ratio: float) -> tuple[LatencyResult, LatencyResult]:
        return (LatencyResult(1.0, "torch", 2, 1, "cpu: test", 30), LatencyResult(ratio, "torch", 2, 1, "cpu: test", 30))

    steady = _latency_entry([pair(0.240), pair(0.250), pair(0.255)])
    assert steady["warning"] is None and steady["ratio_spread"] == pytest.approx(0.015 / 0.250)
    unsteady = _latency_entry([pair(0.245), pair(0.303), pair(0.419), pair(0.300), pair(0.310)])
    assert unsteady["ratio_spread"] == pytest.approx(0.174 / 0.303)
    assert "5 timings' ratios spread 0.245-0.419x, 57% of their median" in unsteady["warning"]
    alone = _latency_entry([pair(0.9)])
    assert alone["ratio_spread"] is None and alone["warning"] is None
