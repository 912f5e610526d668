"""Daza et al.'s 3D DeepLab v3+ with a small Xception-style encoder."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .blocks import ConvNormAct, DepthwiseSeparableConv


class _DSCBlock(nn.Module):
    """Residual block of ``num_layers`` depthwise separable convs (Daza et al., Fig. 2).

    With ``stride > 1`` the last of the layers has that stride, so the strided layer comes just
    before the residual sum; the shortcut is the identity, or a 1^3 conv (with the stride) + BN + ReLU
    when the width or size changes. Takes ``[B, in_channels, *S]``; returns
    ``[B, out_channels, *S / stride]``.
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        layers = [DepthwiseSeparableConv(3, in_channels if i == 0 else out_channels, out_channels,
                                         stride=stride if i == num_layers - 1 else 1,
                                         dilation=dilation) for i in range(num_layers)]
        self.main = nn.Sequential(*layers)
        self.shortcut = (nn.Identity() if in_channels == out_channels and stride == 1
                         else ConvNormAct(3, in_channels, out_channels, 1, stride=stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.shortcut(x)


class _ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1^3 conv and 3^3 convs with the remaining dilation rates,
    ``width`` maps each, concatenated, 1^3 conv to ``width`` maps, dropout. ``[B, C, *S] -> [B, width, *S]``."""

    def __init__(self, in_channels: int, width: int, rates: Sequence[int], dropout: float):
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvNormAct(3, in_channels, width, 1)]
            + [ConvNormAct(3, in_channels, width, 3, dilation=r) for r in rates[1:]])
        self.project = nn.Sequential(ConvNormAct(3, width * len(rates), width, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


@register("deeplabv3plus3d")
class DeepLabV3Plus3d(nn.Module):
    """3D DeepLab v3+ with a reduced Xception encoder (fewer than 560k parameters).

    Seed: L. Daza, C. Gomez, P. Arbelaez, "Semantic Segmentation of Kidney Tumor using Convolutional
    Neural Networks" (KiTS19), section 2.1, Table 1 and Fig. 2; patches 48^3 (pre-training) and 44^3.

    Input ``[B, in_channels, D, H, W]`` with D, H, W multiples of 4 (``min_input_multiple``; 44 and 48
    both are); output logits ``[B, num_classes, D, H, W]``.

    Encoder (Table 1; "DSC (n) x N" = a residual block of N depthwise separable convs of width n):
      input: 1^3 conv -> 8
      stage 1: DSC(16) x 2; DSC(16) x 2 with stride 2                 -> stride 2
      stage 2: DSC(32) x 2 (to the decoder); DSC(32) x 3 with stride 2 -> stride 4
      stage 3: DSC(32) x 3; DSC(64) x 2
      stage 4: DSC(96) x 1, dilation 2; DSC(128) x 1, dilation 2 (to the ASPP)
    ASPP: 1^3 conv and 3^3 convs with dilations 1, 2, 3 (rates [1, 1, 2, 3]), 32 maps each, 1^3
    projection to 32 maps, dropout 0.5.
    Decoder: ASPP output up-sampled (trilinear) to the stage-2 size, concatenated with the stage-2
    block output (32 + 32), two 3^3 convs of 48 maps with dropout 0.5 and 0.1, a 1^3 conv to
    num_classes, and trilinear up-sampling to the input size. Every conv except that last one is
    followed by batch norm and ReLU.

    Choices where the paper is silent:
      * In a strided block the last of its N DSC layers has the stride (Fig. 2: "one DSC layer with
        stride = s is included before the residual connection"). Reading it as N layers plus an
        extra strided one gives 562,243 parameters, over the paper's "less than 560k"; this reading
        gives 559,475, just under it. Stage 4's entries are residual blocks of one dilated DSC layer.
      * A DSC layer is depthwise 3^3 -> BN -> ReLU -> pointwise 1^3 -> BN -> ReLU; shortcuts are the
        identity or a strided 1^3 conv, which per the paper's rule is also followed by BN + ReLU.
        The residual sum is not followed by another activation.
      * The ASPP and decoder use ordinary (not separable) convs, as in the common DeepLab v3+
        implementations; the ASPP has no image-pooling branch (the paper lists only the four rates).
        Dropout in the decoder follows each conv's BN + ReLU.
      * The stage-2 features enter the decoder as they are (32 maps): DeepLab v3+'s 1x1 reduction of
        the low-level features is not needed at that width.
      * The final 1^3 conv is applied before the up-sampling rather than after: both are linear and
        commute exactly (trilinear weights sum to 1), and the conv on the small grid is cheaper.
      * Up-sampling is trilinear with ``align_corners=False``.

    Size: 559,475 parameters (2.1 MB in float32; ``in_channels=1``, ``num_classes=3``; 559,524
    with 4 classes), under the paper's 560k. ``count_flops`` at the 48^3 patch
    ``[1, 1, 48, 48, 48]``: 6.0 GFLOP; at 44^3: 4.6 GFLOP.
    """

    spatial_dims = 3
    min_input_multiple = (4, 4, 4)

    def __init__(self, in_channels: int = 1, num_classes: int = 3, aspp_rates: Sequence[int] = (1, 1, 2, 3),
                 aspp_width: int = 32, decoder_width: int = 48, dropout: Sequence[float] = (0.5, 0.5, 0.1)):
        super().__init__()
        if len(dropout) != 3:
            raise ValueError(f"dropout must give 3 rates (ASPP, decoder conv 1, decoder conv 2); got {dropout}")
        self.stem = ConvNormAct(3, in_channels, 8, 1)
        self.stage1 = nn.Sequential(_DSCBlock(8, 16, 2), _DSCBlock(16, 16, 2, stride=2))
        self.stage2_low = _DSCBlock(16, 32, 2)
        self.stage2_rest = _DSCBlock(32, 32, 3, stride=2)
        self.stage3 = nn.Sequential(_DSCBlock(32, 32, 3), _DSCBlock(32, 64, 2))
        self.stage4 = nn.Sequential(_DSCBlock(64, 96, 1, dilation=2), _DSCBlock(96, 128, 1, dilation=2))
        self.aspp = _ASPP(128, aspp_width, aspp_rates, dropout[0])
        self.decoder = nn.Sequential(
            ConvNormAct(3, aspp_width + 32, decoder_width, 3), nn.Dropout(dropout[1]),
            ConvNormAct(3, decoder_width, decoder_width, 3), nn.Dropout(dropout[2]),
        )
        self.head = nn.Conv3d(decoder_width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.stage2_low(self.stage1(self.stem(x)))
        y = self.aspp(self.stage4(self.stage3(self.stage2_rest(low))))
        y = F.interpolate(y, size=low.shape[2:], mode="trilinear", align_corners=False)
        y = self.head(self.decoder(torch.cat([y, low], dim=1)))
        return F.interpolate(y, size=x.shape[2:], mode="trilinear", align_corners=False)
