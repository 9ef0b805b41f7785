"""Every bad request gets a 4xx that says what was wrong, and nothing is stored after a refusal."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable

import numpy as np
import pytest

from tests.service.conftest import TINY_JOB, Server, listing, npz_bytes, png_zip


def state(server: Server) -> tuple[int, int, int, set[str], set[str]]:
    c = server.client
    return (len(c.get("/models").json()["items"]), len(c.get("/datasets").json()["items"]),
            len(c.get("/jobs").json()["items"]), listing(server.data_dir / "blobs"), listing(server.data_dir / "tmp"))


@pytest.fixture()
def unchanged(server: Server):
    """Asserts the test's refusals left no row, no stored file and no temporary file behind."""
    before = state(server)
    yield
    after = state(server)
    assert after[:4] == before[:4]
    assert after[4] == set(), f"temporary files left: {after[4]}"


def post_model(server: Server, data: bytes, **fields: str):
    return server.client.post("/models", files={"file": ("m.pt2", data)}, data={"input_shape": "3,16,16", **fields})


def test_bad_model_uploads(server: Server, zoo_pt2: Callable[[str], bytes], unchanged: None) -> None:
    good = zoo_pt2("tiny_vgg")
    cases = {
        "json body": server.client.post("/models", json={"input_shape": "3,16,16"}),
        "no file part": server.client.post("/models", data={"input_shape": "3,16,16"},
                                           files={"other": ("x", b"abc")}),
        "no input shape": server.client.post("/models", files={"file": ("m.pt2", good)}),
        "bad input shape": post_model(server, good, input_shape="3,x,16"),
        "bad mean": post_model(server, good, mean="0.5,nan"),
        "unknown field": post_model(server, good, colour="blue"),
        "empty file": post_model(server, b""),
        "random bytes": post_model(server, np.random.default_rng(0).bytes(5000)),
        "truncated": post_model(server, good[: len(good) // 2]),
        "10x over the limit": post_model(server, b"\0" * (30 << 20)),
        "npz as model": post_model(server, npz_bytes(4)),
    }
    expect = {"json body": 415, "10x over the limit": 413}
    for name, res in cases.items():
        assert res.status_code == expect.get(name, 422), (name, res.status_code, res.text)
        assert res.json()["detail"], name
    assert "input_shape" in cases["no input shape"].json()["detail"]
    assert "limit" in cases["10x over the limit"].json()["detail"]


def test_onnx_sent_as_pt2(server: Server, zoo_model, tmp_path, unchanged: None) -> None:
    from search.export import export_onnx

    base = zoo_model("tiny_vgg")
    path = export_onnx(base.module, tmp_path / "m.onnx", base.input_shape, fast=True)
    res = post_model(server, path.read_bytes())
    assert res.status_code == 422 and res.json()["detail"]


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, body in members.items():
            z.writestr(name, body)
    return out.getvalue()


def test_bad_datasets(server: Server, unchanged: None) -> None:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((4, 8, 8, 3), dtype=np.float32))
    png = png_zip({"a": 1})
    cases = {
        "not a zip": b"hello, not images",
        "float images": buf.getvalue(),
        "mixed sizes": png_zip({"a": 2, "b": 1}, sizes=[16, 16, 12]),
        "path trick": _zip({"../evil/1.png": zipfile.ZipFile(io.BytesIO(png)).read("a/0.png")}),
        "not an image": _zip({"a/1.png": b"this is text"}),
        "no class folder": _zip({"1.png": zipfile.ZipFile(io.BytesIO(png)).read("a/0.png")}),
        "zip bomb": _bomb(),
    }
    for name, body in cases.items():
        res = server.client.post("/datasets", files={"file": ("d.zip", body)})
        assert res.status_code == 422, (name, res.status_code, res.text)
    assert "mixed image sizes" in server.client.post(
        "/datasets", files={"file": ("d.zip", cases["mixed sizes"])}).json()["detail"]


def _bomb() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a/x.npy", b"\0" * (64 << 20))
    return out.getvalue()


def test_bad_jobs(server: Server, zoo_pt2: Callable[[str], bytes]) -> None:
    model = post_model(server, zoo_pt2("tiny_vgg")).json()
    flat = server.client.post("/models", files={"file": ("n.pt2", zoo_pt2("no_conv"))},
                              data={"input_shape": "3,8,8"})
    assert flat.status_code == 201, flat.text
    assert flat.json()["sites"] == []
    data = server.client.post("/datasets", files={"file": ("d.npz", npz_bytes(16))}).json()
    small = server.client.post("/datasets", files={"file": ("s.npz", npz_bytes(16, size=8))}).json()
    ok = {"model_id": model["id"], "calib_dataset_id": data["id"], "val_dataset_id": data["id"], **TINY_JOB}
    jobs_before = len(server.client.get("/jobs").json()["items"])
    cases = {
        "unknown model": {**ok, "model_id": "nope"},
        "unknown dataset": {**ok, "val_dataset_id": "nope"},
        "shape mismatch": {**ok, "calib_dataset_id": small["id"]},
        "nothing to slim": {**ok, "model_id": flat.json()["id"], "calib_dataset_id": small["id"],
                            "val_dataset_id": small["id"]},
        "infeasible flops": {**ok, "max_flops_ratio": 0.001},
        "negative budget": {**ok, "max_latency_ratio": -1},
        "absurd budget": {**ok, "max_flops_ratio": 1e9},
        "unknown runtime": {**ok, "runtime": "tpu"},
        "unknown block": {**ok, "blocks": ["ds", "xx"]},
        "no blocks": {**ok, "blocks": []},
        "zero trials": {**ok, "trials": 0},
        "negative mixup": {**ok, "final_mixup": -0.5},
        "zero learning rate": {**ok, "final_lr": 0},
        "latency step without a budget": {**ok, "final_candidates": 2, "latency_steps": [0.2]},
        "latency step over the budget": {**ok, "final_candidates": 2, "max_latency_ratio": 0.3, "latency_steps": [0.3]},
        "latency steps without candidates": {**ok, "max_latency_ratio": 0.3, "latency_steps": [0.2, 0.1]},
        "negative latency step": {**ok, "final_candidates": 2, "max_latency_ratio": 0.3, "latency_steps": [-0.1]},
        "unknown field": {**ok, "colour": "blue"},
        "not json": None,
    }
    for name, body in cases.items():
        res = (server.client.post("/jobs", content=b"{", headers={"content-type": "application/json"})
               if body is None else server.client.post("/jobs", json=body))
        assert res.status_code == 422, (name, res.status_code, res.text)
        assert res.json()["detail"], name
    detail = server.client.post("/jobs", json=cases["infeasible flops"]).json()["detail"]
    assert "smallest reachable" in detail
    assert "does not match" in server.client.post("/jobs", json=cases["shape mismatch"]).json()["detail"]
    assert "nothing to slim" in server.client.post("/jobs", json=cases["nothing to slim"]).json()["detail"]
    assert "must be under the latency budget" in str(
        server.client.post("/jobs", json=cases["latency step over the budget"]).json()["detail"])
    from search.latency import cuda_available

    if not cuda_available():
        res = server.client.post("/jobs", json={**ok, "runtime": "cuda"})
        assert res.status_code == 422 and "GPU" in res.json()["detail"]
    assert len(server.client.get("/jobs").json()["items"]) == jobs_before
    for row in (model, flat.json()):
        assert server.client.delete(f"/models/{row['id']}").status_code == 204
    for row in (data, small):
        assert server.client.delete(f"/datasets/{row['id']}").status_code == 204


def test_unknown_ids(server: Server) -> None:
    c = server.client
    for method, path in [("GET", "/models/nope"), ("GET", "/datasets/nope"), ("GET", "/jobs/nope"),
                         ("GET", "/jobs/nope/trials"), ("GET", "/jobs/nope/events"), ("POST", "/jobs/nope/cancel"),
                         ("GET", "/jobs/nope/candidates/0/download"), ("DELETE", "/models/nope"),
                         ("DELETE", "/datasets/nope"), ("DELETE", "/jobs/nope")]:
        res = c.request(method, path)
        assert res.status_code == 404, (method, path, res.status_code)
        assert "nope" in res.json()["detail"]
    assert c.get("/jobs/x/candidates/0/download", params={"format": "exe"}).status_code == 422
