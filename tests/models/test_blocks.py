from __future__ import annotations

import pytest
import torch
from torch import nn

from models import DepthwiseSeparable, InvertedResidual, SpatialSeparable

GEOMETRIES = [
    # kernel, stride, padding, dilation
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1), (1, 1)),
    ((3, 3), (1, 1), (2, 2), (2, 2)),
    ((5, 5), (2, 2), (2, 2), (1, 1)),
    ((3, 3), (1, 1), (0, 0), (1, 1)),
    ((1, 5), (1, 1), (0, 2), (1, 1)),
    ((5, 1), (2, 1), (2, 0), (1, 1)),
    ((3, 5), (2, 1), (1, 4), (1, 2)),
]


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), GEOMETRIES)
@pytest.mark.parametrize("size", [(15, 16), (8, 9)])
def test_ds_and_ss_keep_the_conv_output_shape(kernel, stride, padding, dilation, size) -> None:
    x = torch.randn(2, 6, *size)
    conv = nn.Conv2d(6, 10, kernel, stride, padding, dilation)
    expected = conv(x).shape
    assert DepthwiseSeparable(6, 10, kernel, stride, padding, dilation, depth_multiplier=2)(x).shape == expected
    assert SpatialSeparable(6, 10, kernel, stride, padding, dilation, rank=3)(x).shape == expected


@pytest.mark.parametrize(("stride", "dilation"), [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("exp_ratio", [1.0, 3.0, 6.0])
def test_inverted_residual_shapes_and_skip(stride, dilation, kernel, exp_ratio) -> None:
    x = torch.randn(2, 8, 16, 16)
    conv = nn.Conv2d(8, 8, 3, stride, dilation, dilation)
    pad = dilation * (kernel - 1) // 2
    block = InvertedResidual(8, 8, kernel, stride, pad, dilation, exp_ratio=exp_ratio).eval()
    assert block(x).shape == conv(x).shape
    assert block.has_skip == (stride == 1)
    assert isinstance(block.conv_pw, nn.Identity) == (exp_ratio == 1.0)
    assert isinstance(block.act2, nn.ReLU6)


def test_inverted_residual_without_skip_when_channels_change() -> None:
    block = InvertedResidual(8, 16, 3, 1, 1)
    assert not block.has_skip
    assert block(torch.randn(1, 8, 8, 8)).shape == (1, 16, 8, 8)


def test_ds_is_linear_without_act_and_norm() -> None:
    block = DepthwiseSeparable(4, 4, 3, padding=1, bias=False)
    a, b = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(block(a + b), block(a) + block(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: DepthwiseSeparable(4, 4, 3, stride=0), "stride"),
        (lambda: DepthwiseSeparable(4, 4, 3, depth_multiplier=0), "depth_multiplier"),
        (lambda: SpatialSeparable(4, 4, 3, rank=0), "rank"),
        (lambda: SpatialSeparable(4, 4, (3, 3, 3)), "kernel_size"),
        (lambda: InvertedResidual(4, 4, 3, exp_ratio=0.5), "exp_ratio"),
        (lambda: InvertedResidual(0, 4, 3), "channel"),
        (lambda: DepthwiseSeparable(4, 4, 3, padding=-1), "padding"),
    ],
)
def test_bad_arguments_raise_value_error(factory, match) -> None:
    with pytest.raises(ValueError, match=match):
        factory()
