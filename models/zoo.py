"""Reference CNNs: small nets for tests and demos, and the architectures of the shared base models.

``vgg_seed`` and ``resnet20`` reproduce the parameter names of the trained CIFAR-10 models, so their
safetensors state dicts load into them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _vgg(widths: tuple[int, ...], num_classes: int, image_size: int) -> nn.Module:
    """VGG blocks of two 3x3 convs each, with 2x2 max pooling between blocks, then one linear."""

    class VGG(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            in_chs = 3
            for width in widths:
                layers += [nn.Conv2d(in_chs, width, 3, padding=1), nn.ReLU()]
                layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
                layers += [nn.MaxPool2d(2, 2)]
                in_chs = width
            self.features = nn.Sequential(*layers)
            side = image_size // 2 ** len(widths)
            self.classifier = nn.Linear(in_chs * side * side, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.flatten(self.features(x), 1))

    return VGG()


class _BasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.short = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class _ResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...], blocks_per_stage: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers: list[nn.Module] = []
        in_chs = widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(_BasicBlock(in_chs, width, stride))
                in_chs = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class OddNet(nn.Module):
    """A net of awkward convolutions: dilation, groups, non-square kernels, stride 2, concatenation.

    Its 1x1 and grouped convs are not sites; the rest are. ``view(x.size(0), -1)`` puts a symbolic
    batch size into the exported graph.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, (3, 3), padding=1)
        self.dilated = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.wide = nn.Conv2d(16, 8, (1, 5), padding=(0, 2))
        self.tall = nn.Conv2d(16, 8, (5, 1), padding=(2, 0))
        self.point = nn.Conv2d(32, 24, 1)
        self.down = nn.Conv2d(24, 32, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.dilated(x)) + x
        g = torch.nn.functional.relu6(self.grouped(x))
        x = torch.cat([g, self.wide(x), self.tall(x)], dim=1)
        x = torch.nn.functional.hardswish(self.point(x))
        x = torch.relu(self.bn(self.down(x)))
        x = x.mean(dim=(2, 3))
        return self.head(x.view(x.size(0), -1))


class NoConvNet(nn.Module):
    """A classifier with no convolution: nothing to slim."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "tiny_vgg": (lambda: _vgg((8, 16), 10, 16), (3, 16, 16)),
    "tiny_resnet": (lambda: _ResNet((8, 16), 1, 10), (3, 16, 16)),
    "odd_net": (OddNet, (3, 16, 16)),
    "no_conv": (NoConvNet, (3, 8, 8)),
    "vgg_seed": (lambda: _vgg((64, 128, 256), 10, 32), (3, 32, 32)),
    "resnet20": (lambda: _ResNet((16, 32, 64), 3, 10), (3, 32, 32)),
}
"""Name -> (constructor, input shape C,H,W)."""


def build_zoo_model(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, int, int]]:
    """Build a zoo net in eval mode with deterministic random weights.

    Args:
        name: a key of ``ZOO``.
        seed: seed for the initial weights.

    Returns:
        The module and its input shape ``(C, H, W)``.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}")
    factory, shape = ZOO[name]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = factory()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                # Non-trivial statistics so batch norm is not an identity in tests.
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval(), shape
