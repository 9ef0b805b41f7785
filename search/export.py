"""Write a (slimmed) model as ``.pt2``, ONNX and safetensors, and check the ONNX file in onnxruntime."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from search.loading import MAX_BATCH, export_program_bytes

# The ONNX exporter logs a warning per torchvision operator when torchvision is absent (we never use it).
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

INPUT_NAME = "x"
OUTPUT_NAME = "logits"


def export_pt2(
    module: nn.Module, path: str | Path, input_shape: tuple[int, int, int], channels_last: bool = False
) -> Path:
    """``torch.export`` with a dynamic batch (1 to 4096); weights in ``channels_last`` if asked."""
    if channels_last:
        module = _copy_channels_last(module)
    path = Path(path)
    path.write_bytes(export_program_bytes(module, input_shape))
    return path


def _copy_channels_last(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def export_onnx(
    module: nn.Module,
    path: str | Path,
    input_shape: tuple[int, int, int],
    fast: bool = False,
    batch: int = 2,
) -> Path:
    """ONNX with input ``x`` and output ``logits``.

    By default the ``torch.export``-based exporter writes a dynamic batch axis: this is what users
    download. ``fast`` uses the TorchScript exporter (milliseconds) for a latency probe at the fixed
    ``batch``; its tracer would freeze a batch size read inside the graph, so the axis stays static.
    """
    path = Path(path)
    module = module.eval()
    example = torch.randn((batch, *input_shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fast:
            torch.onnx.export(
                module, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], opset_version=17,
            )
        else:
            batch_dim = torch.export.Dim("batch", min=1, max=MAX_BATCH)
            program = torch.onnx.export(
                module, (example,), dynamo=True, dynamic_shapes=({0: batch_dim},),
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False,
            )
            assert program is not None
            program.save(str(path), external_data=False)
    return path


def onnx_max_abs_diff(
    path: str | Path, module: nn.Module, input_shape: tuple[int, int, int], batch: int = 4, seed: int = 0
) -> float:
    """Largest absolute difference between onnxruntime and PyTorch outputs on random inputs."""
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *input_shape), generator=gen)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = module.eval()(x).numpy()
    return float(np.abs(out - ref).max())


def export_safetensors(module: nn.Module, path: str | Path, metadata: dict[str, Any]) -> Path:
    """The state dict (contiguous copies) with ``metadata`` as JSON strings."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    save_file(state, str(path), metadata=meta)
    return Path(path)
