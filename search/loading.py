"""Load a CNN to slim: an uploaded ``.pt2`` through our own reader, or a zoo net with safetensors."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx, nn

from models import build_zoo_model
from search._graph import build_module
from search._pt2_reader import ReaderLimits, read_pt2
from search.errors import InvalidInputError, SearchError, UnsafeArchiveError, UnsupportedModelError

MAX_BATCH = 4096


@dataclass
class BaseModel:
    """A loaded model and what we know about its input.

    ``module`` takes normalised float NCHW input; ``mean`` and ``std`` (if known) say how uint8 images
    scaled to [0, 1] are normalised before they reach it.
    """

    module: fx.GraphModule
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    name: str = "model"
    meta: dict[str, object] = field(default_factory=dict)

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """A random normalised input of the model's shape."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *self.input_shape), generator=gen)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC images (or already-float NCHW) -> the model's normalised float NCHW input."""
        if images.dtype == torch.uint8:
            x = images.permute(0, 3, 1, 2).float().div_(255.0)
            if self.mean is not None and self.std is not None:
                mean = torch.tensor(self.mean).view(1, -1, 1, 1)
                std = torch.tensor(self.std).view(1, -1, 1, 1)
                x = (x - mean) / std
            return x.contiguous()
        return images.float()


def parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    """Parse ``"0.5,0.5,0.5"``; ``None`` or empty stays ``None``."""
    if text is None or not str(text).strip():
        return None
    try:
        return tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise InvalidInputError(f"{what} must be comma-separated numbers, got {text!r}") from None


def parse_shape(text: str | tuple[int, ...] | list[int]) -> tuple[int, int, int]:
    """Parse ``"3,32,32"`` (C,H,W) and check it is sane."""
    try:
        values = [int(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise InvalidInputError(f"input shape must be C,H,W integers, got {text!r}") from None
    if len(values) != 3 or any(v < 1 for v in values) or values[0] > 64 or max(values[1:]) > 4096:
        raise InvalidInputError(f"input shape must be C,H,W with 1<=C<=64 and H,W<=4096, got {text!r}")
    return (values[0], values[1], values[2])


def _check_norm(
    mean: tuple[float, ...] | None, std: tuple[float, ...] | None, channels: int
) -> None:
    if (mean is None) != (std is None):
        raise InvalidInputError("give both mean and std, or neither (data already normalised)")
    if mean is None or std is None:
        return
    if len(mean) != channels or len(std) != channels:
        raise InvalidInputError(f"mean and std need {channels} values each (one per channel)")
    if any(s <= 0 or s != s for s in std) or any(m != m for m in mean):
        raise InvalidInputError("std values must be positive and mean values finite")


def _check_runs(module: nn.Module, shape: tuple[int, int, int]) -> None:
    x = torch.zeros((2, *shape))
    try:
        with torch.no_grad():
            out = module(x)
    except SearchError:
        raise
    except Exception as exc:
        raise InvalidInputError(
            f"the model does not run on input shape {list(shape)}: {str(exc)[:300]}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != 2:
        raise UnsupportedModelError("the model must return one tensor with the batch as dim 0")


def load_pt2(
    source: str | os.PathLike[str] | bytes,
    input_shape: str | tuple[int, int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    limits: ReaderLimits | None = None,
    name: str | None = None,
) -> BaseModel:
    """Load a ``torch.export`` archive with our allowlisted reader (never ``torch.export.load``).

    Args:
        source: path to the ``.pt2`` or its bytes.
        input_shape: ``(C, H, W)``; taken from the archive when omitted, checked against it otherwise.
        mean: per-channel mean applied to images scaled to [0, 1]; ``None`` if data is normalised.
        std: per-channel std, with ``mean``.
        limits: archive bounds.
        name: a display name.

    Raises:
        UnsafeArchiveError: the file is not a safe, well-formed archive.
        UnsupportedModelError: it uses operators or features outside the allowlist.
        InvalidInputError: the input shape or normalisation does not fit the model.
    """
    limits = limits or ReaderLimits()
    if isinstance(source, bytes):
        data = source
        name = name or "model"
    else:
        path = Path(source)
        size = path.stat().st_size
        if size > limits.max_total_bytes:
            raise UnsafeArchiveError(f"{path.name} is {size} bytes, more than {limits.max_total_bytes}")
        data = path.read_bytes()
        name = name or path.stem
    raw = read_pt2(data, limits)
    declared = _declared_input_shape(raw.graph, raw.signature)
    shape = parse_shape(input_shape) if input_shape is not None else declared
    if shape is None:
        raise InvalidInputError("the archive does not state the input shape: give it (C,H,W)")
    if declared is not None and declared != shape:
        raise InvalidInputError(
            f"input shape {list(shape)} does not match the model's {list(declared)}"
        )
    _check_norm(mean, std, shape[0])
    module = build_module(raw)
    _check_runs(module, shape)
    lo, hi = raw.batch_range or (1, MAX_BATCH)
    return BaseModel(
        module, shape, mean, std, name, {"batch_range": [lo, hi], "dynamic_batch": bool(raw.batch_symbols)}
    )


def _declared_input_shape(graph: dict[str, object], signature: dict[str, object]) -> tuple[int, int, int] | None:
    specs = signature.get("input_specs")
    values = graph.get("tensor_values")
    if not isinstance(specs, list) or not isinstance(values, dict):
        return None
    for spec in specs:
        if isinstance(spec, dict) and "user_input" in spec:
            name = spec["user_input"].get("arg", {}).get("as_tensor", {}).get("name")
            meta = values.get(name)
            if not isinstance(meta, dict):
                return None
            sizes = meta.get("sizes")
            if not isinstance(sizes, list) or len(sizes) != 4:
                raise UnsupportedModelError("the model's input must be a 4-D NCHW tensor")
            dims = [s.get("as_int") if isinstance(s, dict) else None for s in sizes[1:]]
            if not all(type(d) is int and d > 0 for d in dims):
                raise UnsupportedModelError("only the batch dimension of the input may be dynamic")
            return (int(dims[0]), int(dims[1]), int(dims[2]))  # type: ignore[arg-type]
    return None


def export_program_bytes(module: nn.Module, input_shape: tuple[int, int, int]) -> bytes:
    """``torch.export`` a module we built (trusted) with a dynamic batch, as ``.pt2`` bytes."""
    module = module.eval()
    example = torch.randn((2, *input_shape))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def from_module(
    module: nn.Module,
    input_shape: tuple[int, int, int],
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    name: str = "model",
) -> BaseModel:
    """Bring one of our own modules into the same form as an upload (export, then our reader)."""
    return load_pt2(export_program_bytes(module, input_shape), input_shape, mean, std, name=name)


def load_safetensors(
    path: str | os.PathLike[str],
    zoo_name: str,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> BaseModel:
    """Load a safetensors state dict into a zoo architecture.

    Raises:
        InvalidInputError: unknown zoo name, or the weights do not fit the architecture.
    """
    from safetensors.torch import load_file

    try:
        module, shape = build_zoo_model(zoo_name)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    try:
        state = load_file(str(path))
        module.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError) as exc:
        raise InvalidInputError(f"weights do not fit {zoo_name}: {str(exc)[:300]}") from None
    return from_module(module, shape, mean, std, name=zoo_name)
