from __future__ import annotations

from search import BlockChoice, find_sites
from search.sites import choice_problem


def test_vgg_sites(zoo_model) -> None:
    base = zoo_model("tiny_vgg")
    sites, skipped = find_sites(base.module, base.input_shape)
    assert [s.name for s in sites] == ["features.0", "features.2", "features.5", "features.7"]
    assert skipped == []
    assert sites[2].in_channels == 8 and sites[2].out_channels == 16
    assert sites[2].input_size == (8, 8) and sites[2].output_size == (8, 8)
    # 2 x multiply-adds: 3x3 x 8 in x 16 out x 8x8 positions.
    assert sites[2].flops == 2 * 9 * 8 * 16 * 64
    assert 0.99 < sum(s.flops_share for s in sites) <= 1.0


def test_resnet_sites_skip_the_1x1_shortcut(zoo_model) -> None:
    base = zoo_model("tiny_resnet")
    sites, skipped = find_sites(base.module, base.input_shape)
    assert [s.name for s in sites] == ["stem.0", "layers.0.conv1", "layers.0.conv2", "layers.1.conv1", "layers.1.conv2"]
    down = sites[3]
    assert down.stride == (2, 2) and down.output_size == (8, 8) and not down.bias
    assert [(s.name, s.reason) for s in skipped] == [("layers.1.short.0", "1x1 kernel: nothing to separate")]


def test_odd_net_dilation_groups_nonsquare_concat(zoo_model) -> None:
    base = zoo_model("odd_net")
    sites, skipped = find_sites(base.module, base.input_shape)
    by_name = {s.name: s for s in sites}
    assert list(by_name) == ["stem", "dilated", "wide", "tall", "down"]
    assert by_name["dilated"].dilation == (2, 2) and by_name["dilated"].padding == (2, 2)
    assert by_name["wide"].kernel == (1, 5) and by_name["tall"].kernel == (5, 1)
    assert by_name["down"].stride == (2, 2) and by_name["down"].output_size == (8, 8)
    reasons = {s.name: s.reason for s in skipped}
    assert reasons["grouped"].startswith("grouped convolution")
    assert reasons["point"].startswith("1x1")
    # A 1x5 kernel cannot be split into kx1 then 1xk; an even-parity IR kernel cannot keep its size.
    assert choice_problem(by_name["wide"], BlockChoice.parse("ss:r=4")) is not None
    assert choice_problem(by_name["wide"], BlockChoice.parse("ds:m=1")) is None
    assert choice_problem(by_name["wide"], BlockChoice.parse("ir:t=3,k=3")) is None


def test_no_conv_model_has_no_sites(zoo_model) -> None:
    base = zoo_model("no_conv")
    assert find_sites(base.module, base.input_shape) == ([], [])
