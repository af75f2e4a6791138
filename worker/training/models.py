"""Networks a spec can name: trainq's ``small_cnn`` and torchvision classification architectures."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from shared.spec import ModelSpec


class SmallCNN(nn.Module):
    """Four 3×3 conv layers (BatchNorm, ReLU), two 2×2 max-pools, global average pool, linear head.

    For small images (8–64 px). Input ``(batch, in_channels, H, W)``, output logits
    ``(batch, num_classes)``; H and W must be at least 4.

    Args:
        in_channels: 1 (grayscale) or 3 (RGB).
        num_classes: size of the output.
        width: channels of the first two conv layers; the last two have ``2 * width``.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width),
            *block(width, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, in_channels, H, W)`` float → ``(batch, num_classes)`` logits."""
        return self.head(self.features(x))


def build_model(spec: ModelSpec, *, num_classes: int, in_channels: int) -> nn.Module:
    """Build the network named by ``spec.arch`` with random weights.

    torchvision architectures come from ``torchvision.models.get_model(arch, weights=None,
    num_classes=num_classes)``; they take ``(batch, 3, H, W)`` input (the spec enforces 3 channels).

    Raises:
        ValueError: ``spec.arch`` is not a torchvision model (the spec's list and torchvision drifted).
    """
    if spec.arch == "small_cnn":
        return SmallCNN(in_channels, num_classes)
    return torchvision.models.get_model(spec.arch, weights=None, num_classes=num_classes)
