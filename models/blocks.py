"""The three replacement blocks for a ``groups == 1`` kxk convolution.

Each block takes the geometry of the convolution it replaces (channels, kernel, stride, padding,
dilation) and produces the same output shape for every input shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_Pair = tuple[int, int]
IntOrPair = int | tuple[int, int]
LayerFactory = Callable[[int], nn.Module]


def to_pair(value: IntOrPair, name: str) -> _Pair:
    """Return ``value`` as an ``(h, w)`` pair of ints, refusing anything else."""
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def _check_geometry(kernel: _Pair, stride: _Pair, padding: _Pair, dilation: _Pair) -> None:
    if min(kernel) < 1:
        raise ValueError(f"kernel_size must be positive, got {kernel}")
    if min(stride) < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be positive, got {dilation}")


def _check_channels(in_chs: int, out_chs: int) -> None:
    if in_chs < 1 or out_chs < 1:
        raise ValueError(f"channel counts must be positive, got in_chs={in_chs}, out_chs={out_chs}")


class DepthwiseSeparable(nn.Module):
    """Depthwise kxk convolution with ``depth_multiplier`` filters per input channel, then a 1x1.

    Without ``act_layer`` and ``norm_layer`` the block is linear, like the convolution it replaces, so
    it can be fitted to that convolution exactly when the depth multiplier reaches the rank of each
    input channel's filter bank.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: IntOrPair = 3,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        depth_multiplier: int = 1,
        act_layer: LayerFactory | None = None,
        norm_layer: LayerFactory | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        kernel = to_pair(kernel_size, "kernel_size")
        stride_ = to_pair(stride, "stride")
        padding_ = to_pair(padding, "padding")
        dilation_ = to_pair(dilation, "dilation")
        _check_geometry(kernel, stride_, padding_, dilation_)
        _check_channels(in_chs, out_chs)
        if depth_multiplier < 1:
            raise ValueError(f"depth_multiplier must be >= 1, got {depth_multiplier}")
        mid = in_chs * depth_multiplier
        self.conv_dw = nn.Conv2d(
            in_chs, mid, kernel, stride_, padding_, dilation_, groups=in_chs, bias=False
        )
        self.bn1 = norm_layer(mid) if norm_layer is not None else nn.Identity()
        self.act1 = act_layer(mid) if act_layer is not None else nn.Identity()
        self.conv_pw = nn.Conv2d(mid, out_chs, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_pw(self.act1(self.bn1(self.conv_dw(x))))


class SpatialSeparable(nn.Module):
    """A kx1 convolution into ``rank`` channels, then a 1xk convolution to the output channels."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: IntOrPair = 3,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        rank: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        (kh, kw) = to_pair(kernel_size, "kernel_size")
        (sh, sw) = to_pair(stride, "stride")
        (ph, pw) = to_pair(padding, "padding")
        (dh, dw) = to_pair(dilation, "dilation")
        _check_geometry((kh, kw), (sh, sw), (ph, pw), (dh, dw))
        _check_channels(in_chs, out_chs)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.conv_v = nn.Conv2d(
            in_chs, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False
        )
        self.conv_h = nn.Conv2d(rank, out_chs, (1, kw), (1, sw), (0, pw), (1, dw), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_h(self.conv_v(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand, ReLU6, depthwise kxk, ReLU6, 1x1 linear projection.

    Batch norm follows each convolution. The skip connection exists only when the stride is 1 and the
    channel counts match (decided here, once). With ``exp_ratio == 1`` the expansion is left out, as in
    MobileNetV2's first block.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: IntOrPair = 3,
        stride: IntOrPair = 1,
        padding: IntOrPair | None = None,
        dilation: IntOrPair = 1,
        exp_ratio: float = 6.0,
        act_layer: LayerFactory | None = None,
        norm_layer: LayerFactory | None = None,
    ) -> None:
        super().__init__()
        kernel = to_pair(kernel_size, "kernel_size")
        stride_ = to_pair(stride, "stride")
        dilation_ = to_pair(dilation, "dilation")
        if padding is None:
            padding_ = (dilation_[0] * (kernel[0] - 1) // 2, dilation_[1] * (kernel[1] - 1) // 2)
        else:
            padding_ = to_pair(padding, "padding")
        _check_geometry(kernel, stride_, padding_, dilation_)
        _check_channels(in_chs, out_chs)
        if exp_ratio < 1:
            raise ValueError(f"exp_ratio must be >= 1, got {exp_ratio}")
        act = act_layer if act_layer is not None else (lambda _: nn.ReLU6())
        norm = norm_layer if norm_layer is not None else nn.BatchNorm2d
        mid = int(round(in_chs * exp_ratio))
        self.has_skip = stride_ == (1, 1) and in_chs == out_chs
        if mid == in_chs:
            self.conv_pw: nn.Module = nn.Identity()
            self.bn1: nn.Module = nn.Identity()
            self.act1: nn.Module = nn.Identity()
        else:
            self.conv_pw = nn.Conv2d(in_chs, mid, 1, bias=False)
            self.bn1 = norm(mid)
            self.act1 = act(mid)
        self.conv_dw = nn.Conv2d(
            mid, mid, kernel, stride_, padding_, dilation_, groups=mid, bias=False
        )
        self.bn2 = norm(mid)
        self.act2 = act(mid)
        self.conv_pwl = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn3 = norm(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.bn1(self.conv_pw(x)))
        y = self.act2(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(y))
        if self.has_skip:
            y = y + x
        return y
