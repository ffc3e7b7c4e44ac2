"""A small residual CNN trained from scratch (`model.image_tower=convnet`).

Our stand-in for 003's InceptionResNet-V1 where a 2-core CPU must train the single network in
minutes: a stride-2 stem, four stages of one basic residual block each (widths w, 2w, 4w, 8w with
w = model.cnn_width, stride 2 from the second stage on), global average pooling, so a 64 px input
ends as a 4 × 4 map and the pooled feature is 8w wide. Nothing is pretrained: its BatchNorm always
learns batch statistics (see `towers._convnet`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _conv_bn(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    # No bias before BatchNorm: BN's shift is the bias.
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus the input (a 1×1 projection when the shape changes), → ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = _conv_bn(c_in, c_out, stride), _conv_bn(c_out, c_out, 1)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.shortcut(x) + self.conv2(F.relu(self.conv1(x))))


def small_resnet(width: int) -> tuple[nn.Sequential, int, list[nn.Module]]:
    """(network: [N, 3, H, W] normalised pixels -> [N, 8·width], its output width, its stages)."""
    stem = nn.Sequential(*_conv_bn(3, width, 2), nn.ReLU(inplace=True))
    widths = [width, 2 * width, 4 * width, 8 * width]
    blocks = [BasicBlock(c_in, c_out, 1 if i == 0 else 2)
              for i, (c_in, c_out) in enumerate(zip([width, *widths[:-1]], widths))]
    net = nn.Sequential(stem, *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, widths[-1], [stem, *blocks]


__all__ = ["BasicBlock", "small_resnet"]
