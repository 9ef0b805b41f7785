"""Find the conv sites of a loaded model: every groups == 1 convolution with a kernel larger than 1x1."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn

from search.costs import count_flops
from search.plan import BlockChoice


@dataclass(frozen=True)
class Site:
    """A convolution that may be replaced, with its geometry at the model's input shape."""

    name: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    bias: bool
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    flops: int
    flops_share: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SkippedConv:
    """A convolution that stays as it is, and why."""

    name: str
    reason: str


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def conv_shapes(module: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, tuple[torch.Size, torch.Size]]:
    """Input and output shape (batch 1) of every ``nn.Conv2d`` submodule, by name."""
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
    hooks = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d):
            def hook(m: nn.Module, args: Any, out: Any, name: str = name) -> None:
                shapes[name] = (args[0].shape, out.shape)
            hooks.append(sub.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module(torch.zeros((1, *input_shape)))
    finally:
        for handle in hooks:
            handle.remove()
    return shapes


def find_sites(
    module: fx.GraphModule, input_shape: tuple[int, int, int], total_flops: int | None = None
) -> tuple[list[Site], list[SkippedConv]]:
    """Every replaceable conv site in graph order, and every other convolution with the reason.

    Args:
        module: a model built by our loader.
        input_shape: ``(C, H, W)``.
        total_flops: the model's FLOPs at batch 1 (computed if omitted), for each site's share.

    Returns:
        ``(sites, skipped)``.
    """
    if total_flops is None:
        total_flops = count_flops(module, input_shape)
    shapes = conv_shapes(module, input_shape)
    sites: list[Site] = []
    skipped: list[SkippedConv] = []
    seen: set[str] = set()
    for node in module.graph.nodes:
        if node.op == "call_function" and "conv" in str(node.target):
            skipped.append(SkippedConv(node.name, "weight is not a parameter of this conv alone"))
            continue
        if node.op != "call_module":
            continue
        name = str(node.target)
        conv = module.get_submodule(name)
        if not isinstance(conv, nn.Conv2d):
            continue
        if name in seen:
            skipped.append(SkippedConv(name, "module is called more than once"))
            continue
        seen.add(name)
        kernel = _pair(conv.kernel_size)
        reason = None
        if conv.groups != 1:
            reason = f"grouped convolution (groups={conv.groups})"
        elif kernel == (1, 1):
            reason = "1x1 kernel: nothing to separate"
        elif conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            reason = "padding mode not supported"
        elif name not in shapes:
            reason = "not reached by the forward pass"
        if reason is not None:
            skipped.append(SkippedConv(name, reason))
            continue
        in_shape, out_shape = shapes[name]
        flops = count_flops(conv, tuple(in_shape[1:]))  # type: ignore[arg-type]
        sites.append(
            Site(
                name=name,
                in_channels=conv.in_channels,
                out_channels=conv.out_channels,
                kernel=kernel,
                stride=_pair(conv.stride),
                padding=_pair(conv.padding),
                dilation=_pair(conv.dilation),
                bias=conv.bias is not None,
                input_size=(int(in_shape[2]), int(in_shape[3])),
                output_size=(int(out_shape[2]), int(out_shape[3])),
                flops=flops,
                flops_share=flops / total_flops if total_flops else 0.0,
            )
        )
    return sites, skipped


def choice_problem(site: Site, choice: BlockChoice) -> str | None:
    """Why ``choice`` cannot replace ``site`` (``None`` if it can)."""
    if choice.kind == "ss" and min(site.kernel) < 2:
        return f"spatial-separable needs a kernel of at least 2 in both directions, site has {site.kernel}"
    if choice.kind == "ir":
        assert choice.kernel is not None
        if ir_padding(site, choice.kernel) is None:
            return f"inverted residual k={choice.kernel} cannot keep the output size of kernel {site.kernel}"
    return None


def ir_padding(site: Site, kernel: int) -> tuple[int, int] | None:
    """Padding that makes a ``kernel``-sized depthwise conv give the site's output size, if any."""
    pads = []
    for k_site, pad, dil in zip(site.kernel, site.padding, site.dilation, strict=True):
        delta = dil * (kernel - k_site)
        if delta % 2:
            return None
        new = pad + delta // 2
        if new < 0:
            return None
        pads.append(new)
    return (pads[0], pads[1])
