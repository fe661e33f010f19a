"""Models for the unlearning scenarios: an MLP, a small CNN and ResNet-18 adapted to 32x32 inputs."""

from __future__ import annotations

import math

from torch import nn


class MLP(nn.Module):
    """Flatten, then ``depth`` hidden ReLU layers of width ``hidden``, then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256, depth: int = 2):
        super().__init__()
        if depth < 1 or hidden < 1:
            raise ValueError(f"Invalid MLP size: depth={depth!r}, hidden={hidden!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv blocks (conv-BN-ReLU, conv-BN-ReLU, 2x2 max-pool), global average pool, linear head.

    Works for any input of at least 4x4 pixels (8x8 digits, 32x32 CIFAR).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def resnet18_32(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 for 32x32 inputs: a 3x3 stride-1 stem convolution and no max-pool.

    No pretrained weights (nothing is downloaded).
    """
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


MODELS = ("mlp", "cnn", "resnet18")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """A model by name (``"mlp"``, ``"cnn"``, ``"resnet18"``) for inputs of ``input_shape`` (C, H, W)."""
    if name == "mlp":
        return MLP(math.prod(input_shape), num_classes, **kwargs)
    if name == "cnn":
        return SmallCNN(input_shape[0], num_classes, **kwargs)
    if name == "resnet18":
        return resnet18_32(num_classes, in_channels=input_shape[0], **kwargs)
    raise ValueError(f"Invalid model: {name!r}; expected one of {MODELS}")
