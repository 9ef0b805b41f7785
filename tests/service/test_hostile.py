"""Hostile uploads through HTTP: code planted by every path torch's own loader would run never runs (a
marker file never appears), each is answered 4xx with the reason, nothing is stored, and the service
stays healthy."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from search.loading import export_program_bytes
from tests.conftest import edit_json, rewrite_archive, root_of
from tests.search.test_reader import _planted_pickle, _torch_save_zip
from tests.service.conftest import Server, listing, npz_bytes


def _post(server: Server, data: bytes, name: str = "m.pt2", shape: str = "3,16,16"):
    return server.client.post("/models", files={"file": (name, data)}, data={"input_shape": shape})


def _counts(server: Server) -> tuple[int, set[str]]:
    return len(server.client.get("/models").json()["items"]), listing(server.data_dir / "blobs")


def _planted(zoo: bytes, marker: Path) -> dict[str, bytes]:
    def use_pickle(m: dict[str, bytes]) -> None:
        m[f"{root_of(m)}/data/weights/weight_0"] = _planted_pickle(marker)
        edit_json(m, "data/weights/model_weights_config.json",
                  lambda d: next(iter(d["config"].values())).update(use_pickle=True))

    def raw_pickle(m: dict[str, bytes]) -> None:
        m[f"{root_of(m)}/data/weights/weight_0"] = _planted_pickle(marker)

    def opaque(m: dict[str, bytes]) -> None:
        root = root_of(m)
        m[f"{root}/data/constants/opaque_obj_0"] = _planted_pickle(marker)
        m[f"{root}/data/constants/model_constants_config.json"] = json.dumps(
            {"config": {"c": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False}}}).encode()

    def sample_inputs(m: dict[str, bytes]) -> None:
        m[f"{root_of(m)}/data/sample_inputs/model.pt"] = _torch_save_zip(_planted_pickle(marker))

    code = f"__import__('os').system('touch {marker}')"

    def expr(doc: dict) -> None:
        for meta in doc["graph_module"]["graph"]["tensor_values"].values():
            for size in meta["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = code

    return {
        "weight marked use_pickle": rewrite_archive(zoo, use_pickle),
        "raw pickle as a weight": rewrite_archive(zoo, raw_pickle),
        "opaque_obj constant": rewrite_archive(zoo, opaque),
        "pickled sample_inputs/model.pt": rewrite_archive(zoo, sample_inputs),
        "expr_str written as Python": rewrite_archive(zoo, lambda m: edit_json(m, "models/model.json", expr)),
    }


def test_planted_code_never_runs(server: Server, zoo_pt2: Callable[[str], bytes], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    before = _counts(server)
    for case, data in _planted(zoo_pt2("tiny_vgg"), marker).items():
        res = _post(server, data)
        assert res.status_code == 422, (case, res.status_code, res.text)
        assert res.json()["detail"], case
        assert not marker.exists(), f"planted code ran: {case}"
    assert _counts(server) == before
    assert listing(server.data_dir / "tmp") == set()
    assert server.client.get("/healthz").status_code == 200


def _bad_models(zoo: bytes, tmp_path: Path) -> dict[str, bytes]:
    out = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("m/archive_format", b"pt2")
        z.writestr("m/data/weights/weight_0", b"\0" * (64 << 20))
    script = torch.jit.script(torch.nn.Conv2d(3, 4, 3))
    ts = io.BytesIO()
    torch.jit.save(script, ts)

    def nan_weights(m: dict[str, bytes]) -> None:
        m[f"{root_of(m)}/data/weights/weight_0"] = torch.full((len(m[f"{root_of(m)}/data/weights/weight_0"]) // 4,),
                                                               float("nan")).numpy().tobytes()

    from models import build_zoo_model

    module, shape = build_zoo_model("tiny_vgg")
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return {
        "zip bomb": out.getvalue(),
        "TorchScript as .pt2": ts.getvalue(),
        "NaN weights": rewrite_archive(zoo, nan_weights),
        "output independent of the input": export_program_bytes(module, shape),
    }


def test_broken_models(server: Server, zoo_pt2: Callable[[str], bytes], tmp_path: Path) -> None:
    before = _counts(server)
    for case, data in _bad_models(zoo_pt2("tiny_vgg"), tmp_path).items():
        res = _post(server, data)
        assert res.status_code == 422, (case, res.status_code, res.text)
    assert _counts(server) == before
    assert server.client.get("/healthz").status_code == 200


@pytest.mark.parametrize("name", ["../../etc/passwd", "m\u202egp.pt2", "a b;rm -rf ~.pt2", "x" * 500, "модель.pt2"])
def test_odd_file_names_are_only_names(server: Server, zoo_pt2: Callable[[str], bytes], name: str) -> None:
    res = _post(server, zoo_pt2("tiny_vgg"), name=name)
    assert res.status_code == 201, res.text
    model = res.json()
    assert len(model["name"]) <= 200
    assert (server.data_dir / "blobs" / model["sha256"][:2] / f"{model['sha256']}.pt2").is_file()
    assert not (server.data_dir.parent / "etc").exists()
    assert server.client.delete(f"/models/{model['id']}").status_code == 204


def test_deleting_a_model_a_running_job_uses(server: Server, zoo_pt2: Callable[[str], bytes]) -> None:
    c = server.client
    model = _post(server, zoo_pt2("tiny_vgg")).json()
    data = c.post("/datasets", files={"file": ("d.npz", npz_bytes(32))}).json()
    job = c.post("/jobs", json={"model_id": model["id"], "calib_dataset_id": data["id"],
                                "val_dataset_id": data["id"], "trials": 500, "blocks": ["ds"]}).json()
    server.wait_job(job["id"], timeout=120, until=lambda j: j["status"] == "running")
    res = c.delete(f"/models/{model['id']}")
    assert res.status_code == 409 and "cancel" in res.json()["detail"]
    assert c.delete(f"/datasets/{data['id']}").status_code == 409
    assert c.delete(f"/jobs/{job['id']}").status_code == 409  # running: cancel first
    assert c.post(f"/jobs/{job['id']}/cancel").status_code == 200
    assert server.wait_job(job["id"], timeout=120)["status"] == "cancelled"
    assert c.delete(f"/jobs/{job['id']}").status_code == 204
    assert c.delete(f"/models/{model['id']}").status_code == 204
    assert c.delete(f"/datasets/{data['id']}").status_code == 204
