"""Building blocks shared by the V-Net family (V-Net, VB-Net, two-stage V-Net).

All blocks take and return tensors shaped [B, C, D, H, W]. They keep the spatial
size except the down/up transitions, which halve/double it with 2x2x2 stride-2
(transposed) convolutions as in Milletari et al. (2016).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from . import blocks

NORMS = blocks.NORMS
ACTIVATIONS = blocks.ACTIVATIONS


def make_norm(norm: str, channels: int) -> nn.Module:
    """3D normalization layer named ``norm`` ("batch", "instance" or "none") (see ``blocks.make_norm``)."""
    return blocks.make_norm(norm, 3, channels)


make_activation = blocks.make_activation


class ConvNormAct(blocks.ConvNormAct):
    """Conv3d ('same' padding, odd ``kernel_size``) -> norm -> optional activation (``blocks.ConvNormAct`` in 3D)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: str,
                 activation: Optional[str]):
        super().__init__(3, in_channels, out_channels, kernel_size, norm=norm, activation=activation)


class _ResidualStage(nn.Module):
    """``act(x + body(x))``: V-Net's stage-level residual connection around ``body``."""

    body: nn.Module

    def __init__(self, channels: int, activation: str):
        super().__init__()
        self.act = make_activation(activation, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        # in place: ``out`` is a fresh tensor, and addition does not need its operands for backward
        out += x
        return self.act(out)


class ResidualConvStage(_ResidualStage):
    """Milletari's residual stage: ``num_convs`` convs (``kernel_size``^3, channels kept), each
    followed by norm and activation except the last, whose activation comes after the residual add.

    Takes and returns [B, channels, D, H, W].
    """

    def __init__(self, channels: int, num_convs: int, kernel_size: int, norm: str, activation: str):
        super().__init__(channels, activation)
        if num_convs < 1:
            raise ValueError(f"a residual stage needs at least one convolution; got {num_convs}")
        self.body = nn.Sequential(*[
            ConvNormAct(channels, channels, kernel_size, norm, activation if i < num_convs - 1 else None)
            for i in range(num_convs)
        ])


class Bottleneck(nn.Sequential):
    """VB-Net bottleneck: 1x1x1 conv to ``channels // ratio`` -> ``kernel_size``^3 conv ->
    1x1x1 conv back to ``channels``; norm after each conv, activation after the first two and,
    if ``last_activation``, after the third. Takes and returns [B, channels, D, H, W]."""

    def __init__(self, channels: int, ratio: int, kernel_size: int, norm: str, activation: str,
                 last_activation: bool):
        mid = max(1, channels // ratio)
        super().__init__(
            ConvNormAct(channels, mid, 1, norm, activation),
            ConvNormAct(mid, mid, kernel_size, norm, activation),
            ConvNormAct(mid, channels, 1, norm, activation if last_activation else None),
        )


class ResidualBottleneckStage(_ResidualStage):
    """VB-Net stage: ``num_blocks`` bottlenecks in sequence with one residual add around them
    (V-Net's stage-level residual), the activation of the last one after the add.

    Takes and returns [B, channels, D, H, W].
    """

    def __init__(self, channels: int, num_blocks: int, ratio: int, kernel_size: int, norm: str,
                 activation: str):
        super().__init__(channels, activation)
        if num_blocks < 1:
            raise ValueError(f"a bottleneck stage needs at least one block; got {num_blocks}")
        if ratio < 1:
            raise ValueError(f"bottleneck_ratio must be >= 1; got {ratio}")
        self.body = nn.Sequential(*[
            Bottleneck(channels, ratio, kernel_size, norm, activation, last_activation=i < num_blocks - 1)
            for i in range(num_blocks)
        ])


class DownTransition(nn.Module):
    """2x2x2 stride-2 conv ``in_channels -> out_channels`` -> norm -> act -> dropout -> ``stage``.

    Takes [B, in_channels, D, H, W] and returns [B, out_channels, D/2, H/2, W/2].
    """

    def __init__(self, in_channels: int, out_channels: int, stage: nn.Module, norm: str, activation: str,
                 dropout: float):
        super().__init__()
        self.down = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 2, stride=2, bias=norm == "none"),
            make_norm(norm, out_channels),
            make_activation(activation, out_channels),
        )
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(self.dropout(self.down(x)))


class UpTransition(nn.Module):
    """2x2x2 stride-2 transposed conv ``in_channels -> skip_channels`` -> norm -> act, concatenated
    with the skip (up-sampled first) -> dropout -> ``stage`` on ``2 * skip_channels`` channels.

    ``forward(x, skip)`` takes x [B, in_channels, D, H, W] and skip [B, skip_channels, 2D, 2H, 2W]
    and returns [B, 2 * skip_channels, 2D, 2H, 2W].
    """

    def __init__(self, in_channels: int, skip_channels: int, stage: nn.Module, norm: str, activation: str,
                 dropout: float):
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose3d(in_channels, skip_channels, 2, stride=2, bias=norm == "none"),
            make_norm(norm, skip_channels),
            make_activation(activation, skip_channels),
        )
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.stage = stage

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.stage(self.dropout(torch.cat((self.up(x), skip), dim=1)))


def check_features(features: Sequence[int], levels: int = 5) -> tuple[int, ...]:
    """``features`` as a tuple of ``levels`` positive ints, else ValueError."""
    features = tuple(int(f) for f in features)
    if len(features) != levels or any(f < 1 for f in features):
        raise ValueError(f"features must be {levels} positive channel counts (one per resolution level); "
                         f"got {features}")
    return features


def check_counts(name: str, counts: Sequence[int], levels: int = 4) -> tuple[int, ...]:
    """``counts`` (convs or blocks per stage) as a tuple of ``levels`` ints >= 1, else ValueError."""
    counts = tuple(int(c) for c in counts)
    if len(counts) != levels or any(c < 1 for c in counts):
        raise ValueError(f"{name} must be {levels} counts >= 1; got {counts}")
    return counts


def check_input_size(x: torch.Tensor, multiple: Sequence[int]) -> None:
    """Raise ValueError unless ``x`` is [B, C, D, H, W] with D, H, W multiples of ``multiple``."""
    if x.dim() != 5:
        raise ValueError(f"expected a 5D input [B, C, D, H, W]; got shape {tuple(x.shape)}")
    spatial = tuple(x.shape[2:])
    if any(s % m for s, m in zip(spatial, multiple)):
        raise ValueError(f"input spatial size {spatial} must be a multiple of min_input_multiple "
                         f"{tuple(multiple)} (pad the input first)")


def init_conv_weights(module: nn.Module) -> None:
    """He-normal (fan-out) weights and zero biases for every (transposed) conv in ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
