from __future__ import annotations

import pytest
from torch import nn

from models import DepthwiseSeparable, SpatialSeparable
from search import count_flops, count_params


@pytest.mark.parametrize(("cin", "cout", "k", "m", "hw"), [(16, 32, 3, 1, 8), (8, 8, 5, 2, 6)])
def test_ds_flops_match_the_textbook_count(cin, cout, k, m, hw) -> None:
    block = DepthwiseSeparable(cin, cout, k, 1, k // 2, depth_multiplier=m)
    macs = k * k * cin * m * hw * hw + cin * m * cout * hw * hw
    assert count_flops(block, (cin, hw, hw)) == 2 * macs
    assert count_params(block) == k * k * cin * m + cin * m * cout + cout


def test_conv_and_ss_flops() -> None:
    conv = nn.Conv2d(16, 32, 3, padding=1)
    assert count_flops(conv, (16, 8, 8)) == 2 * 9 * 16 * 32 * 64
    ss = SpatialSeparable(16, 32, 3, 1, 1, rank=4)
    assert count_flops(ss, (16, 8, 8)) == 2 * (3 * 16 * 4 * 64 + 3 * 4 * 32 * 64)
    assert count_flops(conv, (16, 8, 8), batch=3) == 3 * count_flops(conv, (16, 8, 8))
