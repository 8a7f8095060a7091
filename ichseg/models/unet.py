"""The U-Net of Hssayeni et al. 2020 (24 convolution layers), with its width and depth configurable.

At the defaults it is the paper's network exactly: encoder blocks of two
3x3 convolutions at 64, 128, 256 and 512 filters, each followed by 2x2 max-pooling; dropout 0.5
after the 512 block and after the 1024 bottleneck; decoder blocks of nearest upsampling, a 2x2
convolution, concatenation with the skip and two 3x3 convolutions; then a 3x3 convolution with two
filters and a final 1x1 convolution. ReLU, 'same' padding, He-normal initialisation, no
normalisation; about 31 M weights. The forward pass returns logits: apply the sigmoid in the loss
(``BCEWithLogitsLoss``) and at inference.

Usable on its own::

    from ichseg.models import UNet
    net = UNet()                       # the paper's network
    small = UNet(base_filters=16)      # 1.9 M weights, for CPUs
    logits = net(torch.rand(2, 1, 160, 160))
"""

from __future__ import annotations

import math

import torch
from torch import nn

NORMS = ("none", "batch", "instance")
#: Output heads: the paper's (3x3 conv to 2 filters + ReLU, then 1x1) or nnU-Net's single 1x1 conv.
HEADS = ("paper", "conv1x1")


def _norm_layer(norm: str | None, channels: int) -> nn.Module:
    if norm in (None, "none"):
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"unknown normalisation {norm!r}; choose one of {NORMS}")


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions ('same' padding), each followed by the optional norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str | None = None) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            _norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            _norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """Nearest upsampling x2, a 2x2 'same' convolution + ReLU, skip concatenation, a ConvBlock."""

    def __init__(self, in_channels: int, out_channels: int, norm: str | None = None) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.ZeroPad2d((0, 1, 0, 1)),  # Keras 'same' for a 2x2 kernel pads right and bottom
            nn.Conv2d(in_channels, out_channels, 2),
            _norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )
        self.conv = ConvBlock(2 * out_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """The paper's U-Net; returns logits of shape (B, out_channels, H, W).

    Args:
        in_channels: input channels (CT windows stacked, or neighbouring slices).
        out_channels: output channels (1 for binary ICH segmentation).
        base_filters: filters of the first block (64 in the paper); block i has base * 2**i.
        depth: number of poolings (4 in the paper); H and W must be divisible by 2**depth.
        dropout: dropout probability after the deepest encoder block and the bottleneck (0.5).
        norm: "none" (the paper), "batch" or "instance", applied after every convolution but the
            last two.
        head: "paper": a 3x3 convolution to 2 filters with ReLU, then a 1x1 convolution (the
            authors' Keras model); "conv1x1": one 1x1 convolution from the last decoder block to
            the logits (nnU-Net). The paper's 2-filter ReLU can die (both filters negative
            everywhere): the output is then a constant and no gradient reaches the network.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_filters: int = 64,
        depth: int = 4,
        dropout: float = 0.5,
        norm: str | None = "none",
        head: str = "paper",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"UNet depth must be at least 1, got {depth}")
        if norm not in (None, *NORMS):
            raise ValueError(f"unknown normalisation {norm!r}; choose one of {NORMS}")
        if head not in HEADS:
            raise ValueError(f"unknown output head {head!r}; choose one of {HEADS}")
        self.depth = depth
        widths = [base_filters * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList()
        channels = in_channels
        for width in widths[:-1]:
            self.encoders.append(ConvBlock(channels, width, norm))
            channels = width
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(dropout)
        self.bottleneck = ConvBlock(widths[-2], widths[-1], norm)
        self.decoders = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], norm) for i in reversed(range(depth))
        )
        if head == "paper":
            self.head = nn.Sequential(
                nn.Conv2d(widths[0], 2, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(2, out_channels, 1),
            )
        else:
            self.head = nn.Sequential(nn.Conv2d(widths[0], out_channels, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal (Keras ``he_normal``: truncated at 2 std) weights, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                std = math.sqrt(2.0 / fan_in)
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 2**self.depth
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(
                f"UNet input height and width must be divisible by {multiple} "
                f"(depth {self.depth}), got {x.shape[-2]}x{x.shape[-1]}"
            )
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x)
            if level == self.depth - 1:
                x = self.drop(x)
            skips.append(x)
            x = self.pool(x)
        x = self.drop(self.bottleneck(x))
        for decoder, skip in zip(self.decoders, reversed(skips), strict=True):
            x = decoder(x, skip)
        return self.head(x)
