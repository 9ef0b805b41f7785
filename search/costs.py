"""Exact FLOP and parameter counts (``torch.utils.flop_counter``; FLOPs = 2 x multiply-adds)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(module: nn.Module, input_shape: tuple[int, ...], batch: int = 1) -> int:
    """FLOPs of one forward pass at ``batch``, as counted by ``FlopCounterMode``."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(torch.zeros((batch, *input_shape)))
    return int(counter.get_total_flops())


def count_params(module: nn.Module) -> int:
    """Number of parameters (buffers such as batch-norm statistics are not counted)."""
    return sum(p.numel() for p in module.parameters())
