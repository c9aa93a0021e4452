"""A user's own network, in plain PyTorch (no netmend): a small residual CNN for 1×28×28 images, 10 classes.

netmend loads it as `own_model_net:make --weights net.safetensors` (this folder on PYTHONPATH); see
benchmarks/own_model.py, which trains it (with a backdoor) and exports it to ONNX and .pt2 as well.

    conv 3×3 1→16, BN, ReLU                       28×28
    residual block: conv-BN-ReLU-conv-BN + x, ReLU 28×28
    conv 3×3 stride 2 16→32, BN, ReLU             14×14
    max-pool 2                                     7×7
    flatten 1568 → Linear 64, ReLU → Linear 10
"""
from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + x)


class FashionResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = ResidualBlock(16)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(self.block(self.stem(x))))


def make() -> nn.Module:
    """The factory netmend calls (`own_model_net:make`): an untrained network, weights loaded afterwards."""
    return FashionResNet()
