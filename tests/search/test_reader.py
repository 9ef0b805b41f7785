"""The .pt2 reader: real archives load exactly; every planted payload is refused and never runs."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from search import UnsafeArchiveError, UnsupportedModelError, load_pt2
from search._graph import supported_ops
from search._pt2_reader import DTYPES, ReaderLimits
from search.errors import InvalidInputError, SearchError
from tests.conftest import SHARED, edit_json, rewrite_archive, root_of


class _Planted:
    """Pickles to a call of os.system that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def _planted_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Planted(marker), protocol=2)


def _torch_save_zip(pkl: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", b"3\n")
    return out.getvalue()


def _refuse(data: bytes, marker: Path, match: str, error: type[Exception] = SearchError) -> None:
    with pytest.raises(error, match=match):
        load_pt2(data)
    assert not marker.exists(), "planted code ran"


@pytest.mark.parametrize("name", ["vgg_seed", "resnet20"])
def test_shared_models_load_exactly(name: str) -> None:
    path = SHARED / "models" / f"{name}.pt2"
    if not path.exists():
        pytest.skip("../shared is not beside the checkout")
    base = load_pt2(path)
    assert base.input_shape == (3, 32, 32)
    trusted = torch.export.load(path).module()  # the shared file is ours to trust, uploads are not
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(base.module(x), trusted(x), rtol=0, atol=1e-5)
    assert sum(p.numel() for p in base.module.parameters()) == {"vgg_seed": 1_186_378, "resnet20": 272_474}[name]


def test_zoo_round_trip_keeps_names_and_outputs(zoo_pt2) -> None:
    from models import build_zoo_model

    module, shape = build_zoo_model("odd_net")
    base = load_pt2(zoo_pt2("odd_net"))
    x = torch.randn(5, *shape)
    torch.testing.assert_close(base.module(x), module(x), rtol=0, atol=1e-5)
    assert set(base.module.state_dict()) == set(module.state_dict()) - {"bn.num_batches_tracked"} or set(
        base.module.state_dict()
    ) <= set(module.state_dict())


def test_dtype_codes_match_torch_schema() -> None:
    from torch._export.serde.schema import ScalarType

    names = {1: "BYTE", 2: "CHAR", 3: "SHORT", 4: "INT", 5: "LONG", 6: "HALF", 7: "FLOAT",
             8: "DOUBLE", 12: "BOOL", 13: "BFLOAT16"}
    for code in DTYPES:
        assert ScalarType(code).name == names[code]


def test_weight_marked_use_pickle_is_refused(zoo_pt2, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    def edit(m: dict[str, bytes]) -> None:
        root = root_of(m)
        m[f"{root}/data/weights/weight_0"] = _planted_pickle(marker)
        edit_json(m, "data/weights/model_weights_config.json",
                  lambda d: next(iter(d["config"].values())).update(use_pickle=True))

    _refuse(rewrite_archive(zoo_pt2("tiny_vgg"), edit), marker, "pickle", UnsafeArchiveError)


def test_raw_pickle_as_weight_is_read_as_bytes_never_unpickled(zoo_pt2, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    def edit(m: dict[str, bytes]) -> None:
        m[f"{root_of(m)}/data/weights/weight_0"] = _planted_pickle(marker)

    _refuse(rewrite_archive(zoo_pt2("tiny_vgg"), edit), marker, "bytes|elements", UnsafeArchiveError)


def test_opaque_and_custom_object_constants_are_refused(zoo_pt2, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for prefix in ("opaque_obj_0", "custom_obj_0"):
        def edit(m: dict[str, bytes], prefix: str = prefix) -> None:
            root = root_of(m)
            m[f"{root}/data/constants/{prefix}"] = _planted_pickle(marker)
            m[f"{root}/data/constants/model_constants_config.json"] = json.dumps(
                {"config": {"c": {"path_name": prefix, "is_param": False, "use_pickle": False}}}
            ).encode()

        _refuse(rewrite_archive(zoo_pt2("tiny_vgg"), edit), marker, "custom object", UnsafeArchiveError)


@pytest.mark.parametrize("wrapped", [True, False])
def test_pickled_sample_inputs_are_refused(zoo_pt2, tmp_path: Path, wrapped: bool) -> None:
    marker = tmp_path / "pwned"
    payload = _planted_pickle(marker)

    def edit(m: dict[str, bytes]) -> None:
        m[f"{root_of(m)}/data/sample_inputs/model.pt"] = _torch_save_zip(payload) if wrapped else payload

    _refuse(rewrite_archive(zoo_pt2("tiny_vgg"), edit), marker, "sample_inputs", UnsafeArchiveError)


def test_expr_str_written_as_python_is_never_evaluated(zoo_pt2, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"

    def plant(doc: dict) -> None:
        values = doc["graph_module"]["graph"]["tensor_values"]
        for meta in values.values():
            for size in meta["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = code

    data = rewrite_archive(zoo_pt2("tiny_vgg"), lambda m: edit_json(m, "models/model.json", plant))
    _refuse(data, marker, "symbolic dimension", UnsupportedModelError)

    def plant_range(doc: dict) -> None:
        doc["range_constraints"] = {code: {"min_val": 1, "max_val": 8}}

    data = rewrite_archive(zoo_pt2("tiny_vgg"), lambda m: edit_json(m, "models/model.json", plant_range))
    _refuse(data, marker, "range constraint", UnsupportedModelError)


def test_operator_outside_allowlist_is_named(zoo_pt2) -> None:
    def swap(doc: dict) -> None:
        doc["graph_module"]["graph"]["nodes"][1]["target"] = "builtins.eval"

    data = rewrite_archive(zoo_pt2("tiny_vgg"), lambda m: edit_json(m, "models/model.json", swap))
    with pytest.raises(UnsupportedModelError, match="builtins.eval"):
        load_pt2(data)
    assert "torch.ops.aten.conv2d.default" in supported_ops()


def test_extra_entries_and_path_tricks_are_refused(zoo_pt2) -> None:
    def extra(m: dict[str, bytes]) -> None:
        m[f"{root_of(m)}/extra/module_info.json"] = b"{}"

    with pytest.raises(UnsafeArchiveError, match="unexpected entry"):
        load_pt2(rewrite_archive(zoo_pt2("tiny_vgg"), extra))

    def traversal(m: dict[str, bytes]) -> None:
        m[f"{root_of(m)}/../../etc/x"] = b"x"

    with pytest.raises(UnsafeArchiveError):
        load_pt2(rewrite_archive(zoo_pt2("tiny_vgg"), traversal))


def test_tensor_meta_is_checked_against_byte_length(zoo_pt2) -> None:
    def grow(doc: dict) -> None:
        meta = doc["config"]["features.0.weight"]["tensor_meta"]
        meta["sizes"][0]["as_int"] *= 100
        meta["strides"] = [{"as_int": 27 * 1}] + meta["strides"][1:]

    data = rewrite_archive(
        zoo_pt2("tiny_vgg"), lambda m: edit_json(m, "data/weights/model_weights_config.json", grow)
    )
    with pytest.raises(UnsafeArchiveError, match="needs .* bytes"):
        load_pt2(data)


def test_random_bytes_truncated_file_and_onnx_are_refused(zoo_pt2) -> None:
    with pytest.raises(UnsafeArchiveError, match="not a .pt2"):
        load_pt2(os.urandom(4096))
    data = zoo_pt2("tiny_vgg")
    with pytest.raises(UnsafeArchiveError):
        load_pt2(data[: len(data) // 2])
    with pytest.raises(UnsafeArchiveError):
        load_pt2(b"\x08\x07\x12\x07pytorch" + os.urandom(200))  # ONNX protobuf header


def test_zip_bomb_is_refused_before_expansion() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("m/archive_format", b"pt2")
        z.writestr("m/data/weights/weight_0", b"\0" * (64 << 20))
    data = out.getvalue()
    assert len(data) < 1 << 20
    with pytest.raises(UnsafeArchiveError, match="zip bomb"):
        load_pt2(data)
    with pytest.raises(UnsafeArchiveError, match="expands to"):
        load_pt2(data, limits=ReaderLimits(max_total_bytes=1 << 20, max_compression_ratio=1e9))


def test_member_count_is_bounded(zoo_pt2) -> None:
    with pytest.raises(UnsafeArchiveError, match="members"):
        load_pt2(zoo_pt2("tiny_vgg"), limits=ReaderLimits(max_members=5))


def test_input_shape_and_normalisation_are_checked(zoo_pt2) -> None:
    data = zoo_pt2("tiny_vgg")
    assert load_pt2(data).input_shape == (3, 16, 16)
    with pytest.raises(InvalidInputError, match="does not match"):
        load_pt2(data, input_shape="3,32,32")
    with pytest.raises(InvalidInputError, match="mean and std"):
        load_pt2(data, mean=(0.5, 0.5), std=(0.5, 0.5))
    with pytest.raises(InvalidInputError, match="both"):
        load_pt2(data, mean=(0.5, 0.5, 0.5))
