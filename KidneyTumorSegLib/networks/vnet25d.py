"""2.5D V-Net with multi-scale inputs, SE, attention gates and HDC (tumor network of the
"3D ResUNet + 2.5D VNet" seed)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .blocks import (AttentionGate, ConvNormAct, HybridDilatedConvs, SqueezeExcitation, UpConvNormAct,
                     make_activation, make_norm)


class _ResidualStage2d(nn.Module):
    """V-Net stage: ``act(body(x) + shortcut(x))`` where body is ``num_convs`` kxk convs (the last
    without activation) or a given module; the shortcut is the identity or a 1x1 conv + norm."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int, kernel_size: int, norm: str,
                 activation: str, body: Optional[nn.Module] = None):
        super().__init__()
        if body is None:
            layers = [ConvNormAct(2, in_channels if i == 0 else out_channels, out_channels, kernel_size, norm=norm,
                                  activation=None if i == num_convs - 1 else activation)
                      for i in range(num_convs)]
            body = nn.Sequential(*layers)
        self.body = body
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else ConvNormAct(2, in_channels, out_channels, 1, norm=norm, activation=None))
        self.act = make_activation(activation, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


@register("vnet25d_ms_se_ag")
class VNet25dMsSeAg(nn.Module):
    """2.5D V-Net: a 2D V-Net whose input channels are k adjacent slices, with multi-scale inputs,
    squeeze-excitation in the down path, attention-gated skips and hybrid dilated convs at the bottom.

    Seed: "3D ResUNet + 2.5D VNet" (KiTS19 submission), section 3.2. Input ``[B, k, H, W]`` (k
    adjacent slices of the kidney-masked CT, ``in_channels = k``, default 5, centre slice in the
    middle); output logits ``[B, num_classes, H, W]`` for the centre slice. H and W must be
    multiples of 16 (``min_input_multiple``); the seed uses full 512 x 512 slices at 1 mm spacing.

    Layout (widths 16-32-64-128-256, V-Net's, 2D):
      input stage: 5x5 conv k -> 16, residual (1x1 projection of the input).
      down level l = 1..4: 2x2 stride-2 conv (width x2) + norm + PReLU, PLUS the multi-scale
      branch: the input slices average-pooled by 2^l, 3x3 conv k -> width + norm + PReLU, added;
      then a residual stage (levels 1-3: 2, 3, 3 convs 5x5; level 4, the bottom: HDC, three 3x3
      convs with dilations 2, 3, 5) and a squeeze-excitation module.
      up to levels 3, 2, 1, 0: 2x2 stride-2 transposed conv to the skip's width, the encoder skip
      of that level gated by an attention gate whose gating signal is the decoder feature before
      up-sampling, concatenation (twice the skip's width: 256, 128, 64, 32), residual stage of
      3, 3, 2, 1 convs 5x5 (V-Net's).
      final 1x1 conv -> num_classes.

    Choices where the paper is silent:
      * Multi-scale input: average pooling of the k input slices (the paper's "down-sample the
        original image"), one 3x3 conv, and addition to the down-sampled features (addition keeps
        V-Net's widths and its residual stages unchanged).
      * SE after each down level's residual stage (levels 1-4; the full-resolution input stage has
        none), reduction ratio 4.
      * HDC replaces the three 5x5 convs of V-Net's bottom stage, with 3x3 kernels as in Wang et al.,
        inside the same residual connection.
      * Attention gate (Oktay et al.): inter width = skip width / 2, theta by a 2x2 stride-2 conv,
        sigmoid attention up-sampled bilinearly, followed by a 1x1 conv + norm.
      * Batch norm + PReLU after every conv (V-Net uses PReLU; slices give batches large enough for BN).
      * The k slices enter as channels (in_channels = k): an even k has no middle slice but works.

    Size: 10,295,119 parameters (39.3 MB in float32; ``in_channels=5``, ``num_classes=3``);
    ``count_flops`` on one 512 x 512 slice stack ``[1, 5, 512, 512]``: 156.8 GFLOP.
    """

    spatial_dims = 2
    min_input_multiple = (16, 16)

    def __init__(self, in_channels: int = 5, num_classes: int = 3, features: Sequence[int] = (16, 32, 64, 128, 256),
                 hdc_dilations: Sequence[int] = (2, 3, 5), se_reduction: int = 4, norm: str = "batch",
                 activation: str = "prelu"):
        super().__init__()
        if len(features) != 5:
            raise ValueError(f"features must list 5 widths; got {features}")
        f = list(features)
        self.input_stage = _ResidualStage2d(in_channels, f[0], 1, 5, norm, activation)
        self.down = nn.ModuleList()
        self.branch = nn.ModuleList()
        self.enc = nn.ModuleList()
        self.se = nn.ModuleList()
        enc_convs = (2, 3, 3)
        for level in range(1, 5):
            self.down.append(nn.Sequential(nn.Conv2d(f[level - 1], f[level], 2, stride=2, bias=norm == "none"),
                                           make_norm(norm, 2, f[level]), make_activation(activation, f[level])))
            self.branch.append(ConvNormAct(2, in_channels, f[level], 3, norm=norm, activation=activation))
            if level < 4:
                stage = _ResidualStage2d(f[level], f[level], enc_convs[level - 1], 5, norm, activation)
            else:
                # the last conv's activation comes after the residual sum, as in the other stages
                hdc = HybridDilatedConvs(2, f[level], hdc_dilations, norm=norm, activation=activation,
                                         last_activation=False)
                stage = _ResidualStage2d(f[level], f[level], 0, 3, norm, activation, body=hdc)
            self.enc.append(stage)
            self.se.append(SqueezeExcitation(2, f[level], se_reduction))
        # decoder, deepest first: (gating width, skip width, output width, convs)
        self.up = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.dec = nn.ModuleList()
        dec_convs = (3, 3, 2, 1)
        g_width = f[4]
        for i, level in enumerate(range(3, -1, -1)):
            skip = f[level]
            out_width = 2 * skip
            self.up.append(UpConvNormAct(2, g_width, out_width - skip, 2, norm=norm, activation=activation))
            self.gates.append(AttentionGate(2, skip, g_width, max(skip // 2, 1), 2, norm=norm))
            self.dec.append(_ResidualStage2d(out_width, out_width, dec_convs[i], 5, norm, activation))
            g_width = out_width
        self.head = nn.Conv2d(g_width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.input_stage(x)]
        y = skips[0]
        for level in range(1, 5):
            pooled = F.avg_pool2d(x, 2 ** level)
            y = self.down[level - 1](y) + self.branch[level - 1](pooled)
            y = self.se[level - 1](self.enc[level - 1](y))
            skips.append(y)
        for i, level in enumerate(range(3, -1, -1)):
            gated = self.gates[i](skips[level], y)
            y = self.dec[i](torch.cat([self.up[i](y), gated], dim=1))
        return self.head(y)
