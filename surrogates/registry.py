"""Models by name. Every builder takes (num_classes, in_channels) and accepts any input resolution."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {}
_NOTES: dict[str, str] = {}


def register(name: str, note: str) -> Callable:
    def deco(fn: Callable[[int, int], nn.Module]) -> Callable[[int, int], nn.Module]:
        _BUILDERS[name] = fn
        _NOTES[name] = note
        return fn

    return deco


def available() -> dict[str, str]:
    """Registered names and a one-line description of each."""
    return dict(_NOTES)


def build(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A freshly initialised model; the caller seeds torch first for reproducible weights."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(_BUILDERS))}") from None
    return builder(num_classes, in_channels)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register("small-cnn", "3 conv layers (32-64-128) with batch norm; fast on a few CPU cores")
def small_cnn(num_classes: int, in_channels: int) -> nn.Module:
    return nn.Sequential(
        *_conv_bn(in_channels, 32),
        nn.MaxPool2d(2),
        *_conv_bn(32, 64),
        nn.MaxPool2d(2),
        *_conv_bn(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


@register("gap-cnn", "small-cnn's shape (32-64-128, global average pool) without batch norm: texture-like noise")
def gap_cnn(num_classes: int, in_channels: int) -> nn.Module:
    # Without batch norm the surrogate is the same function in training and in eval mode, so noise crafted against
    # it after only a few training steps is not thrown off by running statistics that have not settled yet.
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


@register("mlp", "two hidden layers of 512 on the flattened image (resized to 32x32); a very different inductive bias")
def mlp(num_classes: int, in_channels: int) -> nn.Module:
    return nn.Sequential(
        _Resize(32),
        nn.Flatten(),
        nn.Linear(in_channels * 32 * 32, 512),
        nn.ReLU(inplace=True),
        nn.Linear(512, 512),
        nn.ReLU(inplace=True),
        nn.Linear(512, num_classes),
    )


class _Resize(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.size and x.shape[-2] == self.size:
            return x
        return nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


class BasicBlock(nn.Module):
    """The two-conv residual block of ResNet-18/34."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images as in the paper's code: 3x3 stem, no max-pool, four stages, global average pool."""

    def __init__(self, blocks: list[int], widths: list[int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers = []
        cin = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.layers(out)).flatten(1)
        return self.fc(out)


@register("resnet18", "the paper's CIFAR ResNet-18 (3x3 stem, no max-pool), 11M parameters")
def resnet18(num_classes: int, in_channels: int) -> nn.Module:
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels)


@register("resnet-mini", "a CIFAR-style ResNet with one block per stage at widths 16-32-64-128; cheap on CPU")
def resnet_mini(num_classes: int, in_channels: int) -> nn.Module:
    return CifarResNet([1, 1, 1, 1], [16, 32, 64, 128], num_classes, in_channels)


@register(
    "resnet18-imagenet", "torchvision's ImageNet ResNet-18 (7x7 stem, max-pool), for resolutions of 112 px and up"
)
def resnet18_imagenet(num_classes: int, in_channels: int) -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model
