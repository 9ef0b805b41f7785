from __future__ import annotations

import pytest
import torch
from torch import nn

from models import DepthwiseSeparable, SpatialSeparable
from search import BlockChoice, BlockFitter, FitSettings, apply_plan, find_sites, fit_block
from search.sites import Site
from search.transfer import build_block, init_ds_from_conv, init_ss_from_conv, relative_error


def _site(cin=6, cout=12, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1)) -> Site:
    return Site("s", cin, cout, kernel, stride, padding, dilation, True, (10, 10), (10, 10), 0, 0.0)


def _conv(site: Site) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(site.in_channels, site.out_channels, site.kernel, site.stride, site.padding, site.dilation)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 3), (2, 2), (2, 2), (2, 2)), ((3, 5), (1, 2), (1, 2), (1, 1))],
)
def test_ds_svd_is_exact_at_full_per_channel_rank(kernel, stride, padding, dilation) -> None:
    site = _site(kernel=kernel, stride=stride, padding=padding, dilation=dilation)
    conv = _conv(site)
    full = min(site.out_channels, kernel[0] * kernel[1])
    block = build_block(site, BlockChoice("ds", depth_multiplier=full))
    assert isinstance(block, DepthwiseSeparable)
    init_ds_from_conv(block, conv)
    x = torch.randn(4, 6, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(block(x), conv(x), rtol=1e-4, atol=1e-4)


def test_ss_svd_is_exact_at_full_rank() -> None:
    site = _site(kernel=(3, 3))
    conv = _conv(site)
    block = build_block(site, BlockChoice("ss", rank=min(6 * 3, 12 * 3)))
    assert isinstance(block, SpatialSeparable)
    init_ss_from_conv(block, conv)
    x = torch.randn(4, 6, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(block(x), conv(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("choice", ["ds:m=1", "ss:r=3"])
def test_least_squares_refit_reduces_the_error_of_a_low_rank_block(choice: str) -> None:
    site = _site()
    conv = _conv(site)
    torch.manual_seed(1)
    # Correlated inputs (like real activations) are where the refit pays.
    x = torch.nn.functional.avg_pool2d(torch.randn(64, 6, 12, 12), 3, 1, 0).relu()
    svd_only = fit_block(site, BlockChoice.parse(choice), conv, None).module
    fitted = fit_block(site, BlockChoice.parse(choice), conv, x)
    with torch.no_grad():
        target = conv(x)
    assert fitted.fit_error < 1.0
    assert relative_error(fitted.module, x, target) < relative_error(svd_only, x, target)


def test_inverted_residual_is_fitted_by_distillation() -> None:
    site = _site(cin=8, cout=8)
    conv = _conv(site)
    x = torch.randn(40, 8, 10, 10)
    choice = BlockChoice("ir", exp_ratio=3.0, kernel=3)
    torch.manual_seed(0)
    untrained = build_block(site, choice).eval()
    with torch.no_grad():
        target = conv(x)
    fitted = fit_block(site, choice, conv, x, FitSettings(ir_steps=60))
    assert relative_error(fitted.module, x, target) < 0.7 * relative_error(untrained, x, target)


def test_fitter_caches_each_block_once_in_memory_and_on_disk(zoo_model, images, tmp_path) -> None:
    base = zoo_model("tiny_vgg")
    sites, _ = find_sites(base.module, base.input_shape)
    calib = base.normalise(images)
    fitter = BlockFitter(base.module, sites, calib, cache_dir=tmp_path)
    choice = BlockChoice("ds", depth_multiplier=1)
    first = fitter.get("features.2", choice)
    second = fitter.get("features.2", choice)
    assert fitter.fits == 1
    assert first.module is not second.module  # callers get copies they may train
    other = BlockFitter(base.module, sites, calib, cache_dir=tmp_path)
    third = other.get("features.2", choice)
    assert other.fits == 0
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(third.module(x), first.module(x))
    assert third.fit_error == pytest.approx(first.fit_error)


def test_apply_plan_returns_a_new_model(zoo_model, images) -> None:
    base = zoo_model("tiny_resnet")
    sites, _ = find_sites(base.module, base.input_shape)
    fitter = BlockFitter(base.module, sites, base.normalise(images), FitSettings(ir_steps=20))
    before = {k: v.clone() for k, v in base.module.state_dict().items()}
    plan = {
        "layers.0.conv1": BlockChoice("ds", depth_multiplier=2),
        "layers.0.conv2": BlockChoice("ss", rank=4),
        "layers.1.conv1": BlockChoice("ir", exp_ratio=3.0, kernel=5),
        "stem.0": BlockChoice(),
    }
    slim = apply_plan(base.module, plan, fitter)
    assert isinstance(slim.get_submodule("layers.0.conv1"), DepthwiseSeparable)
    assert isinstance(base.module.get_submodule("layers.0.conv1"), nn.Conv2d)
    assert all(torch.equal(before[k], v) for k, v in base.module.state_dict().items())
    x = base.example_input(3)
    assert slim(x).shape == base.module(x).shape
