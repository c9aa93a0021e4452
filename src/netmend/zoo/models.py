"""Architectures: `mlp`, `small-cnn`, `preact-resnet18`, `vgg11` for any input shape and class count.

Every model takes inputs in [0, 1] and normalises them itself (a `norm` layer with buffers), so
triggers are stamped in pixel space. Activations are separate modules so that a layer's
post-activation output is a named cut point for localisers.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from ..errors import NetmendError
from ..registry import ARCHITECTURES


class Normalize(nn.Module):
    """(x − mean) / std per channel (or per feature for flat inputs); buffers travel with the weights."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)


def _norm(in_shape, mean, std) -> Normalize:
    c = in_shape[0]
    mean = list(mean) if mean is not None else [0.0] * c
    std = list(std) if std is not None else [1.0] * c
    if len(mean) == 1:
        mean = mean * c
    if len(std) == 1:
        std = std * c
    if len(mean) != c or len(std) != c:
        raise NetmendError(f"normalisation has {len(mean)} means / {len(std)} stds for {c} input channels")
    return Normalize(mean, std)


@ARCHITECTURES.register("mlp", "fully connected ReLU network (tabular or flattened images)")
def mlp(in_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64, 32, 16, 8, 4),
        mean=None, std=None) -> nn.Sequential:
    in_shape = list(in_shape)
    n_in = 1
    for s in in_shape:
        n_in *= int(s)
    layers: list[tuple[str, nn.Module]] = []
    if len(in_shape) > 1:
        layers.append(("norm", _norm(in_shape, mean, std)))
        layers.append(("flatten", nn.Flatten()))
    else:
        layers.append(("norm", Normalize(mean if mean is not None else [0.0] * n_in,
                                         std if std is not None else [1.0] * n_in)))
    prev = n_in
    for i, h in enumerate(hidden, 1):
        layers += [(f"fc{i}", nn.Linear(prev, int(h))), (f"relu{i}", nn.ReLU())]
        prev = int(h)
    layers.append(("out", nn.Linear(prev, num_classes)))
    return nn.Sequential(OrderedDict(layers))


@ARCHITECTURES.register("small-cnn", "two conv blocks + two dense layers; trains on CPU in minutes")
def small_cnn(in_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64), hidden: int = 128,
              mean=None, std=None) -> nn.Sequential:
    c, h, w = (int(s) for s in in_shape)
    c1, c2 = (int(x) for x in channels)
    pool = 2 if min(h, w) >= 16 else 1
    hh, ww = h // pool // pool, w // pool // pool
    layers = OrderedDict([
        ("norm", _norm(in_shape, mean, std)),
        ("conv1", nn.Conv2d(c, c1, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(pool)),
        ("conv2", nn.Conv2d(c1, c2, 3, padding=1)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(pool)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(c2 * hh * ww, hidden)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(hidden, num_classes)),
    ])
    return nn.Sequential(layers)


class PreActBlock(nn.Module):
    """Pre-activation residual block: out = conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        shortcut = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, in_shape, num_classes, blocks=(2, 2, 2, 2), width=64, mean=None, std=None):
        super().__init__()
        c = int(in_shape[0])
        self.norm = _norm(in_shape, mean, std)
        self.conv1 = nn.Conv2d(c, width, 3, 1, 1, bias=False)
        in_planes = width
        for i, n in enumerate(blocks, 1):
            planes = width * 2 ** (i - 1)
            layer = []
            for j in range(n):
                stride = 2 if (i > 1 and j == 0) else 1
                layer.append(PreActBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.n_layers = len(blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = self.conv1(self.norm(x))
        for i in range(1, self.n_layers + 1):
            out = getattr(self, f"layer{i}")(out)
        return self.linear(self.flatten(self.pool(self.relu(self.bn(out)))))


@ARCHITECTURES.register("preact-resnet18", "PreAct-ResNet18 (BackdoorBench's CIFAR-10 model), any input size")
def preact_resnet18(in_shape, num_classes, width: int = 64, mean=None, std=None) -> nn.Module:
    return PreActResNet(in_shape, num_classes, (2, 2, 2, 2), int(width), mean, std)


@ARCHITECTURES.register("vgg11", "VGG-11 with batch norm and an adaptive pool, any input size")
def vgg11(in_shape, num_classes, width: int = 64, hidden: int = 512, mean=None, std=None) -> nn.Module:
    c, h, w = (int(s) for s in in_shape)
    cfg = [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"]
    layers: list[tuple[str, nn.Module]] = [("norm", _norm(in_shape, mean, std))]
    prev, size, k = c, min(h, w), 0
    for v in cfg:
        if v == "M":
            if size >= 2:
                layers.append((f"pool{k}", nn.MaxPool2d(2)))
                size //= 2
            continue
        k += 1
        out = int(width) * v
        layers += [(f"conv{k}", nn.Conv2d(prev, out, 3, padding=1)), (f"bn{k}", nn.BatchNorm2d(out)), (f"relu{k}", nn.ReLU())]
        prev = out
    layers += [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
               ("fc1", nn.Linear(prev, hidden)), ("relu_fc1", nn.ReLU()),
               ("fc2", nn.Linear(hidden, num_classes))]
    return nn.Sequential(OrderedDict(layers))


def create_model(arch: str, in_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """The one factory: `create_model("small-cnn", (1, 28, 28), 10)`."""
    fn = ARCHITECTURES.get(arch)
    try:
        return fn(list(in_shape), int(num_classes), **kwargs)
    except TypeError as exc:
        raise NetmendError(f"bad arguments for architecture {arch!r}: {exc}") from None
