"""Built-in edge-friendly architectures. Every factory takes ``input_shape`` and ``num_classes``."""

from __future__ import annotations

import math

from torch import nn

from edgekd.models.registry import register_model


def _flat_features(input_shape: tuple[int, ...]) -> int:
    return int(math.prod(input_shape))


@register_model
def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 128, depth: int = 2,
        dropout: float = 0.0) -> nn.Module:
    """A multilayer perceptron on the flattened input.

    Args:
        hidden: Width of each hidden layer.
        depth: Number of hidden layers (0 gives a linear classifier).
        dropout: Dropout after each hidden layer.
    """
    if hidden < 1 or depth < 0:
        raise ValueError("mlp needs hidden >= 1 and depth >= 0")
    layers: list[nn.Module] = [nn.Flatten()]
    width = _flat_features(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """Plain CNN: stages of (conv3x3-BN-ReLU) x convs_per_stage, 2x2 max-pool between stages, global pooling."""

    def __init__(self, in_channels: int, num_classes: int, width: int, depth: int, convs_per_stage: int,
                 dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for stage in range(depth):
            c_out = width * 2 ** stage
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            if stage < depth - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


@register_model
def cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 16, depth: int = 3, convs_per_stage: int = 1,
        dropout: float = 0.0) -> nn.Module:
    """A plain convolutional net for small images.

    Args:
        width: Channels of the first stage; each later stage doubles them.
        depth: Number of stages (a 2x2 max-pool between consecutive stages).
        convs_per_stage: 3x3 conv-BN-ReLU blocks per stage.
        dropout: Dropout before the classifier.
    """
    _need_image(input_shape, "cnn")
    if width < 1 or depth < 1 or convs_per_stage < 1:
        raise ValueError("cnn needs width, depth and convs_per_stage >= 1")
    return ConvNet(input_shape[0], num_classes, width, depth, convs_per_stage, dropout)


def _need_image(input_shape: tuple[int, ...], name: str) -> None:
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs image inputs (C, H, W); got input shape {tuple(input_shape)} — use mlp for tables")


def _make_divisible(v: float, divisor: int = 8) -> int:
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual when shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_residual else out


# (expansion, channels, repeats, stride) as in MobileNetV2 (Sandler et al., 2018), Table 2.
_MBV2_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width_mult: float, stages: int, depth_mult: float,
                 stem_stride: int, last_channels: int, dropout: float):
        super().__init__()
        c = _make_divisible(32 * width_mult)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6(inplace=True)]
        for t, ch, n, s in _MBV2_SETTINGS[:stages]:
            c_out = _make_divisible(ch * width_mult)
            for i in range(max(1, round(n * depth_mult))):
                layers.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        last = _make_divisible(last_channels * max(1.0, width_mult))
        layers += [nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(self.dropout(self.pool(self.features(x)).flatten(1)))


@register_model
def mobilenetv2(input_shape: tuple[int, ...], num_classes: int, width_mult: float = 1.0, stages: int = 7,
                depth_mult: float = 1.0, stem_stride: int | None = None, last_channels: int = 1280,
                dropout: float = 0.0) -> nn.Module:
    """MobileNetV2-style inverted-residual network.

    Args:
        width_mult: Channel multiplier (0.35, 0.5, 1.0, ... as in the paper).
        stages: How many of the seven block groups to keep (fewer for tiny inputs).
        depth_mult: Multiplier on the repeats of each group.
        stem_stride: Stride of the first conv; default 2 for inputs of 64 px and more, else 1.
        last_channels: Width of the final 1x1 conv before pooling.
        dropout: Dropout before the classifier.
    """
    _need_image(input_shape, "mobilenetv2")
    if not 1 <= stages <= len(_MBV2_SETTINGS):
        raise ValueError(f"mobilenetv2 stages must be 1..{len(_MBV2_SETTINGS)}")
    if width_mult <= 0 or depth_mult <= 0:
        raise ValueError("mobilenetv2 needs width_mult > 0 and depth_mult > 0")
    if stem_stride is None:
        stem_stride = 2 if min(input_shape[1:]) >= 64 else 1
    return MobileNetV2(input_shape[0], num_classes, width_mult, stages, depth_mult, stem_stride, last_channels, dropout)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int, blocks: list[int]):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers, c = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            for j in range(n):
                layers.append(BasicBlock(c, c_out, 2 if (j == 0 and i > 0) else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.layers(self.stem(x))).flatten(1))


@register_model
def resnet(input_shape: tuple[int, ...], num_classes: int, width: int = 16, blocks: list[int] | None = None) -> nn.Module:
    """A CIFAR-style ResNet with basic blocks (He et al., 2016); ``blocks=[3, 3, 3]`` is ResNet-20.

    Args:
        width: Channels of the first stage; each later stage doubles them.
        blocks: Basic blocks per stage.
    """
    _need_image(input_shape, "resnet")
    blocks = list(blocks or [2, 2, 2])
    if width < 1 or not blocks or min(blocks) < 1:
        raise ValueError("resnet needs width >= 1 and at least one block per stage")
    return ResNet(input_shape[0], num_classes, width, blocks)
