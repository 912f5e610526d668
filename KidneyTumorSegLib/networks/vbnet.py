"""VB-Net: V-Net with bottleneck residual stages (Mu et al., KiTS19)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import register
from .vnet_blocks import (
    ConvNormAct,
    DownTransition,
    ResidualBottleneckStage,
    ResidualConvStage,
    UpTransition,
    check_counts,
    check_features,
    check_input_size,
    init_conv_weights,
)


@register("vbnet")
class VBNet(nn.Module):
    """VB-Net of G. Mu, Z. Lin, M. Han, G. Yao, Y. Gao, "Segmentation of kidney tumor by
    multi-resolution VB-nets" (KiTS19 challenge, 2019): a V-Net (Milletari et al., 2016) whose
    down and up stages use bottleneck residual blocks (1x1x1 conv reducing the channels by
    ``bottleneck_ratio``, ``kernel_size``^3 spatial conv, 1x1x1 conv expanding them back).

    Takes [B, in_channels, D, H, W] with D, H, W multiples of ``min_input_multiple`` (else
    ValueError: pad first) and returns logits [B, num_classes, D, H, W].

    Layout (level l has ``features[l]`` channels at 1/2^l resolution):
    input block ``kernel_size``^3 conv in_channels -> features[0] (norm, ReLU, no residual);
    down stage l = 1..4: 2x2x2 stride-2 conv features[l-1] -> features[l], then a residual stage
    of ``down_blocks[l-1]`` blocks; up stage l = 3..0: 2x2x2 stride-2 transposed conv to
    features[l], concatenated with the encoder output of level l, then a residual stage of
    ``up_blocks[3-l]`` blocks on 2*features[l] channels; output 1x1x1 conv 2*features[0] ->
    num_classes. A residual stage is ``ReLU(x + blocks(x))`` (V-Net's one residual add per stage).

    Details the paper leaves open and the choices made here:
      - Widths: features (16, 32, 64, 128, 256), Milletari's V-Net widths.
      - Blocks per stage: down (1, 2, 3, 3), up (3, 3, 2, 1): V-Net's up-path counts and the
        down-path counts of public VB-Net re-implementations (e.g. the vbnet.py files of
        github.com/qinliuliuqin/Medical-Segmentation3d-Toolkit).
      - Which stages are bottlenecked: stages at level >= ``bottleneck_from_level`` (default 2,
        i.e. 64+ channels down, 128+ channels up); the finer stages are plain residual stages of
        ``kernel_size``^3 convs. Public VB-Net code exists both ways (all stages bottlenecked, or
        the finest levels plain); the default is the one whose size matches the paper's 8.8 MB
        (below). ``bottleneck_from_level=0`` bottlenecks every stage, as the paper's text reads.
      - Spatial kernel 3x3x3 (the paper: "the same kernel size as the conventional convolutional
        layer"; public VB-Net code uses 3), bottleneck ratio 4 (ResNet's).
      - Normalization: batch norm after every conv ("instance" selectable); activation ReLU.
      - Down-sampling 2x2x2 stride-2 conv, up-sampling 2x2x2 stride-2 transposed conv (V-Net),
        skip connections by concatenation (V-Net).
      - Output: a single 1x1x1 conv to logits (softmax belongs to the loss / inference).
      - Dropout3d(``dropout``) after each down/up transition when ``dropout > 0`` (paper: none).
      - Weights: He-normal (fan-out) convs, zero biases.

    Size with 3 classes, from ``count_parameters`` (float32):
      - default (paper) configuration: 2,161,619 parameters = 8.25 MiB; the saved state_dict
        (``torch.save``, batch-norm buffers included) is 8,795,303 bytes = 8.80 MB;
      - ``bottleneck_from_level=0``: 1,907,731 parameters = 7.28 MiB;
      - Milletari's plain V-Net (``build_network("vnet")``, 5x5x5 kernels): 65,178,803
        parameters = 248.6 MiB (state_dict file 248.7 MiB).
    The paper reports 8.8 MB (VB-Net) vs 250 MB (V-Net).
    Compute for one [1, 1, 96, 96, 96] patch (``count_flops``): 115.4 GFLOP (default), 19.9 GFLOP
    (``bottleneck_from_level=0``), 29.1 GFLOP for features (8, 16, 32, 64, 128); V-Net 847.4 GFLOP.
    Most of the default's FLOPs sit in the plain full- and half-resolution stages.
    """

    spatial_dims = 3
    min_input_multiple = (16, 16, 16)

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        down_blocks: Sequence[int] = (1, 2, 3, 3),
        up_blocks: Sequence[int] = (3, 3, 2, 1),
        bottleneck_ratio: int = 4,
        bottleneck_from_level: int = 2,
        kernel_size: int = 3,
        norm: str = "batch",
        dropout: float = 0.0,
    ):
        super().__init__()
        f = check_features(features)
        down_blocks = check_counts("down_blocks", down_blocks)
        up_blocks = check_counts("up_blocks", up_blocks)
        if not 0 <= bottleneck_from_level <= 5:
            raise ValueError(f"bottleneck_from_level must be in 0..5; got {bottleneck_from_level}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        act = "relu"

        def stage(level: int, channels: int, blocks: int) -> nn.Module:
            if level >= bottleneck_from_level:
                return ResidualBottleneckStage(channels, blocks, bottleneck_ratio, kernel_size, norm, act)
            return ResidualConvStage(channels, blocks, kernel_size, norm, act)

        self.input_block = ConvNormAct(in_channels, f[0], kernel_size, norm, act)
        self.down = nn.ModuleList(
            DownTransition(f[level - 1], f[level], stage(level, f[level], down_blocks[level - 1]), norm, act, dropout)
            for level in range(1, 5)
        )
        self.up = nn.ModuleList()
        channels = f[4]
        for i, level in enumerate((3, 2, 1, 0)):
            self.up.append(UpTransition(channels, f[level], stage(level, 2 * f[level], up_blocks[i]), norm, act,
                                        dropout))
            channels = 2 * f[level]
        self.output = nn.Conv3d(channels, num_classes, 1)
        init_conv_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes, D, H, W] for x [B, in_channels, D, H, W]."""
        check_input_size(x, self.min_input_multiple)
        skips = [self.input_block(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        out = skips.pop()
        for up in self.up:
            out = up(out, skips.pop())
        return self.output(out)
