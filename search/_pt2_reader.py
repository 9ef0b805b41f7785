"""Our own reader for ``torch.export`` archives (``.pt2``), safe for untrusted uploads.

``torch.export.load`` unpickles several entries and hands shape expressions to ``sympy.sympify``;
this reader does neither. It reads ``model.json`` as data, tensors as raw bytes checked against their
metadata, refuses every pickled or custom entry, and bounds the archive's size and member count.
Turning the parsed graph into a torch module is ``_graph.build_module``'s job.
"""

from __future__ import annotations

import io
import json
import math
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any

import torch

from search.errors import UnsafeArchiveError, UnsupportedModelError


@dataclass(frozen=True)
class ReaderLimits:
    """Bounds on what an archive may hold."""

    max_members: int = 4096
    max_total_bytes: int = 1 << 30
    max_json_bytes: int = 64 << 20
    max_compression_ratio: float = 200.0
    max_tensor_elements: int = 1 << 28


# torch._export.serde.schema.ScalarType values we accept (checked against torch in tests).
DTYPES: dict[int, torch.dtype] = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    12: torch.bool,
    13: torch.bfloat16,
}
_STRIDED_LAYOUT = 7

# The only symbolic dimension we accept is a plain symbol for the batch, written the way
# torch.export serialises it. It is matched, never evaluated.
_SYMBOL_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_SYMBOL_EXPR_RE = re.compile(
    r"(?:Symbol\('(?P<a>[a-z][a-z0-9_]{0,31})', positive=True, integer=True\)|(?P<b>[a-z][a-z0-9_]{0,31}))"
)

_FIXED_MEMBERS = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    "models/model.json",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
    "data/sample_inputs/model.pt",
}
_WEIGHT_RE = re.compile(r"data/weights/weight_\d{1,6}")
_CONSTANT_RE = re.compile(r"data/constants/tensor_\d{1,6}")

# A legitimate sample_inputs/model.pt is a torch.save of tensors: these globals and nothing else.
_SAMPLE_GLOBALS = {
    "torch._utils _rebuild_tensor_v2",
    "collections OrderedDict",
    "torch FloatStorage",
    "torch DoubleStorage",
    "torch HalfStorage",
    "torch BFloat16Storage",
    "torch LongStorage",
    "torch IntStorage",
    "torch ByteStorage",
    "torch BoolStorage",
}
_FORBIDDEN_OPCODES = {
    "STACK_GLOBAL",
    "INST",
    "OBJ",
    "NEWOBJ",
    "NEWOBJ_EX",
    "EXT1",
    "EXT2",
    "EXT4",
    "BUILD",
}


@dataclass
class RawProgram:
    """What a ``.pt2`` archive says, checked and parsed but not yet a module."""

    graph: dict[str, Any]
    signature: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    """Parameter, buffer and constant values by fully-qualified name."""
    parameter_names: set[str] = field(default_factory=set)
    batch_symbols: set[str] = field(default_factory=set)
    batch_range: tuple[int, int] | None = None


def _fail(message: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(message)


def _as_int(value: Any, what: str) -> int:
    if not isinstance(value, dict) or set(value) != {"as_int"} or type(value["as_int"]) is not int:
        raise _fail(f"{what}: expected a plain integer, got {str(value)[:120]}")
    return int(value["as_int"])


def check_symbolic_expr(expr: Any, symbols: set[str], what: str) -> str:
    """Return the symbol an ``expr_str`` names, if it is just the batch symbol; never evaluate it."""
    if not isinstance(expr, str) or len(expr) > 128:
        raise _fail(f"{what}: symbolic expression is not a short string")
    match = _SYMBOL_EXPR_RE.fullmatch(expr)
    if match is None:
        raise UnsupportedModelError(
            f"{what}: symbolic dimension {expr[:80]!r} refused; only the batch dimension may be "
            "dynamic, as a plain symbol"
        )
    name = match.group("a") or match.group("b")
    if symbols and name not in symbols:
        raise UnsupportedModelError(f"{what}: unknown symbol {name!r}")
    return name


class _Archive:
    def __init__(self, data: bytes, limits: ReaderLimits) -> None:
        self.limits = limits
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise _fail(f"not a .pt2 archive (not a readable zip file): {exc}") from None
        infos = [i for i in self.zip.infolist() if not i.filename.endswith("/")]
        if not infos:
            raise _fail("the archive is empty")
        if len(infos) > limits.max_members:
            raise _fail(f"the archive has {len(infos)} members, more than {limits.max_members}")
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise _fail("the archive holds the same name twice")
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            raise _fail("the archive must hold one top-level folder, as torch.export.save writes")
        self.root = roots.pop()
        total = 0
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            rel = info.filename[len(self.root) + 1 :]
            if ".." in rel.split("/") or rel.startswith("/") or "\\" in rel:
                raise _fail(f"unsafe path in archive: {info.filename!r}")
            if info.flag_bits & 0x1:
                raise _fail(f"encrypted member {info.filename!r}")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise _fail(f"member {info.filename!r} uses an unsupported compression")
            if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > 1 << 20:
                ratio = info.file_size / max(info.compress_size, 1)
                if ratio > limits.max_compression_ratio:
                    raise _fail(
                        f"member {info.filename!r} expands {ratio:.0f}x (zip bomb?); "
                        f"limit {limits.max_compression_ratio:.0f}x"
                    )
            total += info.file_size
            self.members[rel] = info
        if total > limits.max_total_bytes:
            raise _fail(
                f"the archive expands to {total} bytes, more than the limit of {limits.max_total_bytes}"
            )
        for rel in self.members:
            if rel in _FIXED_MEMBERS or _WEIGHT_RE.fullmatch(rel) or _CONSTANT_RE.fullmatch(rel):
                continue
            base = rel.rsplit("/", 1)[-1]
            if base.startswith(("custom_obj_", "opaque_obj_")):
                raise _fail(f"custom object {rel!r} refused: it would be unpickled")
            raise _fail(f"unexpected entry {rel!r} in the archive")

    def read(self, rel: str, limit: int | None = None) -> bytes:
        info = self.members.get(rel)
        if info is None:
            raise _fail(f"the archive lacks {rel!r}")
        if limit is not None and info.file_size > limit:
            raise _fail(f"{rel!r} is {info.file_size} bytes, more than {limit}")
        try:
            data = self.zip.read(info)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError) as exc:
            raise _fail(f"cannot read {rel!r}: {exc}") from None
        if len(data) != info.file_size:
            raise _fail(f"{rel!r} is truncated")
        return data

    def read_json(self, rel: str) -> Any:
        data = self.read(rel, self.limits.max_json_bytes)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise _fail(f"{rel!r} is not valid JSON: {exc}") from None


def _check_sample_inputs(data: bytes, limits: ReaderLimits) -> None:
    """Scan the pickled sample inputs without unpickling them; refuse anything but plain tensors."""
    try:
        inner = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise _fail("data/sample_inputs/model.pt is not a torch.save archive") from None
    pickles = [i for i in inner.infolist() if i.filename.endswith(".pkl")]
    if len(inner.infolist()) > limits.max_members or len(pickles) != 1:
        raise _fail("data/sample_inputs/model.pt has an unexpected layout")
    if pickles[0].file_size > 1 << 20:
        raise _fail("data/sample_inputs/model.pt has an oversized pickle")
    try:
        payload = inner.read(pickles[0])
        for opcode, arg, _ in pickletools.genops(payload):
            if opcode.name in _FORBIDDEN_OPCODES:
                raise _fail(f"data/sample_inputs/model.pt uses pickle opcode {opcode.name}: refused")
            if opcode.name == "GLOBAL" and arg not in _SAMPLE_GLOBALS:
                raise _fail(f"data/sample_inputs/model.pt references {arg!r}: refused (code in a pickle)")
    except UnsafeArchiveError:
        raise
    except Exception as exc:  # pickletools raises assorted errors on garbage
        raise _fail(f"data/sample_inputs/model.pt is not a valid pickle: {exc}") from None


def _tensor_from_bytes(raw: bytes, meta: Any, what: str, limits: ReaderLimits) -> torch.Tensor:
    if not isinstance(meta, dict):
        raise _fail(f"{what}: missing tensor_meta")
    dtype = DTYPES.get(meta.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise UnsupportedModelError(f"{what}: dtype code {meta.get('dtype')!r} is not supported")
    if meta.get("layout") != _STRIDED_LAYOUT:
        raise UnsupportedModelError(f"{what}: only strided (dense) tensors are supported")
    sizes = meta.get("sizes")
    strides = meta.get("strides")
    if not isinstance(sizes, list) or not isinstance(strides, list) or len(sizes) != len(strides):
        raise _fail(f"{what}: sizes and strides do not match")
    if len(sizes) > 8:
        raise _fail(f"{what}: too many dimensions")
    shape = [_as_int(s, f"{what} size") for s in sizes]
    stride = [_as_int(s, f"{what} stride") for s in strides]
    offset = _as_int(meta.get("storage_offset"), f"{what} storage_offset")
    if any(s < 0 for s in shape) or any(s < 0 for s in stride) or offset < 0:
        raise _fail(f"{what}: negative size, stride or offset")
    numel = math.prod(shape)
    if numel > limits.max_tensor_elements:
        raise _fail(f"{what}: {numel} elements is more than the limit")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) % itemsize:
        raise _fail(f"{what}: {len(raw)} bytes is not a whole number of {dtype} elements")
    if numel == 0:
        return torch.zeros(shape, dtype=dtype)
    needed = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) + 1
    if needed * itemsize > len(raw):
        raise _fail(
            f"{what}: shape {shape} with strides {stride} needs {needed * itemsize} bytes, "
            f"the entry has {len(raw)}"
        )
    flat = torch.frombuffer(bytearray(raw), dtype=dtype)
    return torch.as_strided(flat, shape, stride, offset).clone()


def _read_payloads(
    archive: _Archive, config_rel: str, name_re: re.Pattern[str], folder: str
) -> tuple[dict[str, torch.Tensor], set[str]]:
    config = archive.read_json(config_rel)
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise _fail(f"{config_rel!r} has no 'config' mapping")
    tensors: dict[str, torch.Tensor] = {}
    params: set[str] = set()
    cache: dict[str, bytes] = {}
    for fqn, entry in config["config"].items():
        if not isinstance(entry, dict):
            raise _fail(f"{config_rel!r}: entry {fqn!r} is not a mapping")
        if entry.get("use_pickle") is not False:
            raise _fail(f"{fqn!r} is stored as a pickle: refused (pickles can execute code)")
        path_name = entry.get("path_name")
        rel = f"{folder}/{path_name}"
        if not isinstance(path_name, str) or not name_re.fullmatch(rel):
            raise _fail(f"{fqn!r}: payload name {str(path_name)[:60]!r} refused")
        if rel not in cache:
            cache[rel] = archive.read(rel)
        tensors[fqn] = _tensor_from_bytes(cache[rel], entry.get("tensor_meta"), fqn, archive.limits)
        if entry.get("is_param") is True:
            params.add(fqn)
    return tensors, params


def read_pt2(data: bytes, limits: ReaderLimits | None = None) -> RawProgram:
    """Parse and check a ``.pt2`` archive without executing or unpickling anything.

    Args:
        data: the archive's bytes.
        limits: bounds on members and sizes.

    Returns:
        The parsed graph, signature and tensors.

    Raises:
        UnsafeArchiveError: malformed, oversized, or carrying pickles or custom objects.
        UnsupportedModelError: well-formed but using features we do not accept.
    """
    limits = limits or ReaderLimits()
    archive = _Archive(data, limits)
    if archive.read("archive_format", 64).strip() != b"pt2":
        raise _fail("archive_format is not 'pt2'")
    if archive.members.get("byteorder") and archive.read("byteorder", 64).strip() != b"little":
        raise UnsupportedModelError("only little-endian archives are supported")
    if "data/sample_inputs/model.pt" in archive.members:
        _check_sample_inputs(archive.read("data/sample_inputs/model.pt", 64 << 20), limits)

    program = archive.read_json("models/model.json")
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise _fail("models/model.json has no graph_module")
    graph_module = program["graph_module"]
    graph = graph_module.get("graph")
    signature = graph_module.get("signature")
    if not isinstance(graph, dict) or not isinstance(signature, dict):
        raise _fail("models/model.json lacks the graph or the signature")
    for key in ("custom_obj_values",):
        if graph.get(key):
            raise _fail("custom objects in the graph are refused")

    symbols: set[str] = set()
    batch_range: tuple[int, int] | None = None
    ranges = program.get("range_constraints") or {}
    if not isinstance(ranges, dict):
        raise _fail("range_constraints is not a mapping")
    for name, bounds in ranges.items():
        if not isinstance(name, str) or not _SYMBOL_RE.fullmatch(name):
            raise UnsupportedModelError(
                f"range constraint on {str(name)[:80]!r} refused: only a plain batch symbol is accepted"
            )
        if not isinstance(bounds, dict):
            raise _fail(f"range constraint for {name!r} is not a mapping")
        lo, hi = bounds.get("min_val"), bounds.get("max_val")
        if type(lo) is not int or (hi is not None and type(hi) is not int):
            raise _fail(f"range constraint for {name!r} must have integer bounds")
        symbols.add(name)
        batch_range = (lo, hi if hi is not None else 1 << 31)
    if len(symbols) > 1:
        raise UnsupportedModelError(
            f"{len(symbols)} dynamic dimensions; only the batch dimension may be dynamic"
        )

    tensors, params = _read_payloads(
        archive, "data/weights/model_weights_config.json", _WEIGHT_RE, "data/weights"
    )
    if "data/constants/model_constants_config.json" in archive.members:
        constants, _ = _read_payloads(
            archive, "data/constants/model_constants_config.json", _CONSTANT_RE, "data/constants"
        )
        overlap = set(constants) & set(tensors)
        if overlap:
            raise _fail(f"names both weights and constants: {sorted(overlap)[:3]}")
        tensors.update(constants)
    return RawProgram(
        graph=graph,
        signature=signature,
        tensors=tensors,
        parameter_names=params,
        batch_symbols=symbols,
        batch_range=batch_range,
    )
