"""Upload, search, download through a real uvicorn server, a real worker process and a real SQLite file."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import numpy as np
import onnxruntime as ort
import torch

from tests.service.conftest import TINY_JOB, Server, npz_bytes, png_zip


def upload_model(server: Server, data: bytes, shape: str = "3,16,16", **fields: str) -> httpx.Response:
    return server.client.post("/models", files={"file": ("tiny.pt2", data)},
                              data={"input_shape": shape, **fields})


def upload_data(server: Server, data: bytes, name: str = "d.npz") -> httpx.Response:
    return server.client.post("/datasets", files={"file": (name, data)})


def test_upload_search_download(server: Server, zoo_pt2: Callable[[str], bytes], tmp_path) -> None:
    res = upload_model(server, zoo_pt2("tiny_vgg"), mean="0.5,0.5,0.5", std="0.25,0.25,0.25", name="tiny")
    assert res.status_code == 201, res.text
    model = res.json()
    assert model["name"] == "tiny" and model["input_shape"] == [3, 16, 16]
    assert model["sites"] and model["flops"] > 0 and model["params"] > 0
    assert model["latency_status"] in ("pending", "measuring", "measured")
    assert server.client.get("/models").json()["items"][0]["id"] == model["id"]

    calib = upload_data(server, npz_bytes(96, seed=1))
    assert calib.status_code == 201, calib.text
    assert calib.json()["count"] == 96 and calib.json()["shape"] == [16, 16, 3] and calib.json()["has_labels"]
    val = upload_data(server, png_zip({"cat": 20, "dog": 12}), name="val.zip")
    assert val.status_code == 201, val.text
    assert val.json()["count"] == 32 and val.json()["classes"] == ["cat", "dog"] and val.json()["has_labels"]

    res = server.client.post("/jobs", json={"model_id": model["id"], "calib_dataset_id": calib.json()["id"],
                                            "val_dataset_id": val.json()["id"], "holdout_dataset_id": calib.json()["id"],
                                            "max_flops_ratio": 0.9, "max_latency_ratio": 5.0, **TINY_JOB, "final_mixup": 0.3, "final_lr": 2e-3,
                                            "final_timing_repeats": 2})
    assert res.status_code == 202, res.text
    job_id = res.json()["id"]
    assert res.headers["location"] == f"/jobs/{job_id}"
    job = server.wait_job(job_id)
    assert job["status"] == "succeeded", job
    assert job["progress"]["trials_done"] == 3 and job["progress"]["trials_planned"] == 3
    assert job["attempts"] == 1
    (cand,) = job["candidates"]
    assert cand["flops"] <= 0.9 * model["flops"]
    assert cand["latency_ms"] > 0 and cand["base_latency_ms"] > 0
    (lat,) = cand["latency"]
    assert lat["repeats"] == 2 and len(lat["ratios"]) == 2 and lat["ratio_min"] <= lat["ratio"] <= lat["ratio_max"]
    budget = cand["latency_budget"]  # where the final timings fell against the budget
    assert budget["max_latency"] == 5.0 and budget["ratio"] == lat["ratio"] and budget["within"] == (lat["ratio"] <= 5.0)
    assert budget["verified_in_search"] is not None and budget["verified_timings"] >= 1
    assert 0 <= cand["val_accuracy"] <= 100 and 0 <= cand["holdout_accuracy"] <= 100
    assert set(cand["plan"]) <= {s["name"] for s in model["sites"]}

    trials = server.client.get(f"/jobs/{job_id}/trials").json()["items"]
    numbers = [t["number"] for t in trials]
    assert len(numbers) == len(set(numbers)) and sum(t["state"] == "COMPLETE" for t in trials) >= 1
    assert all("flops_ratio" in t["user_attrs"] for t in trials if t["state"] != "WAITING")

    # the model's baseline latency was measured by the worker
    assert server.wait_job(job_id, until=lambda j: True)
    measured = server.client.get(f"/models/{model['id']}").json()
    assert measured["latency_status"] in ("measured", "pending", "measuring")

    # downloads: ONNX runs in onnxruntime, .pt2 loads with torch.export.load; both agree
    onnx = server.client.get(cand["downloads"]["onnx"])
    assert onnx.status_code == 200 and len(onnx.content) > 100
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    sess = ort.InferenceSession(onnx.content, providers=["CPUExecutionProvider"])
    y_onnx = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    report = server.client.get(cand["downloads"]["report"]).json()
    assert report["training"]["settings"]["mixup"] == 0.3 and report["training"]["settings"]["epochs"] == 0.2
    assert report["training"]["settings"]["lr"] == 2e-3
    pt2 = server.client.get(f"/jobs/{job_id}/candidates/{cand['id']}/download", params={"format": "pt2"})
    assert pt2.status_code == 200
    (tmp_path / "m.pt2").write_bytes(pt2.content)
    program = torch.export.load(tmp_path / "m.pt2")  # our own output, not an upload
    y_pt2 = program.module()(torch.from_numpy(x)).detach().numpy()
    assert np.abs(y_pt2 - y_onnx).max() < 1e-3
    report = server.client.get(cand["downloads"]["report"]).json()
    assert report["plan"] == cand["plan"]
    st = server.client.get(cand["downloads"]["safetensors"])
    assert st.status_code == 200 and st.content[:8]

    # server-sent events of a finished job: its state, then the end
    with server.client.stream("GET", f"/jobs/{job_id}/events") as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        text = "".join(events.iter_text())
    assert "event: progress" in text and "event: end" in text
    first = text.split("data: ", 1)[1].split("\n", 1)[0]
    assert json.loads(first)["status"] == "succeeded"

    # deleting: the model is in use until its job goes; then files go too
    assert server.client.delete(f"/models/{model['id']}").status_code == 409
    assert server.client.delete(f"/jobs/{job_id}").status_code == 204
    assert server.client.get(f"/jobs/{job_id}").status_code == 404
    assert not (server.data_dir / "jobs" / job_id).exists()
    assert server.client.delete(f"/models/{model['id']}").status_code == 204
    assert not (server.data_dir / "blobs" / model["sha256"][:2] / f"{model['sha256']}.pt2").exists()


def test_cancel_queued_job(server: Server, zoo_pt2: Callable[[str], bytes]) -> None:
    model = upload_model(server, zoo_pt2("tiny_vgg")).json()
    data = upload_data(server, npz_bytes(32, seed=3)).json()
    body = {"model_id": model["id"], "calib_dataset_id": data["id"], "val_dataset_id": data["id"], **TINY_JOB,
            "trials": 200, "final_epochs": 0}
    job_id = server.client.post("/jobs", json=body).json()["id"]
    job = server.client.post(f"/jobs/{job_id}/cancel").json()
    assert job["status"] in ("cancelled", "running")
    job = server.wait_job(job_id, timeout=120)
    assert job["status"] == "cancelled"
    assert server.client.post(f"/jobs/{job_id}/cancel").status_code == 409
    assert server.client.delete(f"/jobs/{job_id}").status_code == 204


def test_openapi_documents_units(server: Server) -> None:
    doc = server.client.get("/openapi.json").json()
    paths = doc["paths"]
    for path in ("/models", "/datasets", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/trials", "/jobs/{job_id}/cancel",
                 "/jobs/{job_id}/events", "/jobs/{job_id}/candidates/{candidate_id}/download", "/healthz"):
        assert path in paths, path
    cand = doc["components"]["schemas"]["CandidateOut"]["properties"]
    assert "ms" in cand["latency_ms"]["description"] and "percent" in cand["val_accuracy"]["description"]
    assert "multipart/form-data" in paths["/models"]["post"]["requestBody"]["content"]
    assert server.client.get("/docs").status_code == 200


