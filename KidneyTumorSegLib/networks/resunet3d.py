"""3D residual U-Net with deep supervision (kidney network of the "3D ResUNet + 2.5D VNet" seed)."""

from __future__ import annotations

from typing import List, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .blocks import ConvNormAct, UpConvNormAct, make_activation, make_norm


class _ResidualStage(nn.Module):
    """``act(convs(x) + shortcut(x))``: ``num_convs`` 3^3 convs (the last without activation before
    the sum); the shortcut is the identity, or a 1^3 conv when the width changes.
    Takes ``[B, in_channels, *S]``; returns ``[B, out_channels, *S]``."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int, norm: str, activation: str):
        super().__init__()
        layers = []
        for i in range(num_convs):
            last = i == num_convs - 1
            layers.append(ConvNormAct(3, in_channels if i == 0 else out_channels, out_channels, 3, norm=norm,
                                      activation=None if last else activation))
        self.convs = nn.Sequential(*layers)
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else ConvNormAct(3, in_channels, out_channels, 1, norm=norm, activation=None))
        self.act = make_activation(activation, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.convs(x) + self.shortcut(x))


@register("resunet3d_ds")
class ResUNet3dDS(nn.Module):
    """3D U-Net with residual stages and four deep-supervision "map" outputs.

    Seed: "3D ResUNet + 2.5D VNet" (KiTS19 submission), section 2.1: a 4-level encoder and a
    4-level decoder with residual connections in both, and one map layer after each decoder level
    turning its output into a full-size prediction; the 4 outputs are trained together (Dice loss,
    weight of the auxiliary outputs decaying). Patches are 64 slices of 256 x 256 (2 mm slices).

    Input ``[B, in_channels, D, H, W]`` with D, H, W multiples of 8 (``min_input_multiple``).
    Training mode returns a list of 4 logit tensors ``[B, num_classes, D, H, W]``, the full-resolution
    (last decoder level) output first, then the coarser levels (strides 2, 4, 8) up-sampled to the
    input size; eval mode returns only the first.

    Layout (widths for ``features=(16, 32, 64, 128)``):
      encoder level l (stride 2^(l-1)): residual stage of width f_l; between levels a 2^3 stride-2
      conv doubles the width.
      decoder level 1 (stride 8): residual stage 128 -> 256 on the deepest encoder output.
      decoder levels 2-4: 2^3 transposed conv (halves the width), concat the encoder skip of that
      level, residual stage back to the up-sampled width (256->128->64->32 is the decoder width,
      so the decoder is twice as wide as the encoder at each level).
      map layer after each decoder level: 1^3 conv -> num_classes, trilinear up-sampling to input size.

    Choices where the paper is silent:
      * Two 3^3 convs per residual stage (the 3D U-Net skeleton the paper names), each followed by
        instance norm and PReLU; the shortcut is the identity or a 1^3 conv + norm when the width
        changes (the first stage and the decoder stages after concatenation).
      * Down-sampling by a 2^3 stride-2 conv, up-sampling by a 2^3 transposed conv (both + norm + PReLU),
        isotropic: the seed resamples to 2 mm slices and 256^2 slices, so strides are equal on all axes.
      * Map layers return logits (softmax belongs to the loss); up-sampling is trilinear,
        ``align_corners=False``. No dropout (none is described).
      * Deep-supervision output order: full resolution first, so that ``outputs[0]`` is always the
        prediction; the loss weights of the auxiliary outputs (0.33, x0.8 every 15 epochs) belong to
        the training recipe.

    Size: 5,777,516 parameters (22.0 MB in float32; ``in_channels=1``, ``num_classes=3``);
    ``count_flops`` at the seed's patch ``[1, 1, 64, 256, 256]``: 1,282.9 GFLOP (eval mode, so only
    the full-resolution map layer runs).
    """

    spatial_dims = 3
    min_input_multiple = (8, 8, 8)

    def __init__(self, in_channels: int = 1, num_classes: int = 3, features: tuple = (16, 32, 64, 128),
                 norm: str = "instance", activation: str = "prelu"):
        super().__init__()
        if len(features) != 4:
            raise ValueError(f"features must list 4 widths; got {features}")
        f = list(features)
        self.enc = nn.ModuleList([_ResidualStage(in_channels, f[0], 2, norm, activation)]
                                 + [_ResidualStage(f[i], f[i], 2, norm, activation) for i in range(1, 4)])
        self.down = nn.ModuleList([
            nn.Sequential(nn.Conv3d(f[i], f[i + 1], 2, stride=2, bias=norm == "none"),
                          make_norm(norm, 3, f[i + 1]), make_activation(activation, f[i + 1]))
            for i in range(3)])
        dec_widths = [2 * f[3], f[3], f[2], f[1]]  # 256, 128, 64, 32
        self.dec = nn.ModuleList([_ResidualStage(f[3], dec_widths[0], 2, norm, activation)])
        self.up = nn.ModuleList()
        for level in range(1, 4):
            skip = f[3 - level]
            self.up.append(UpConvNormAct(3, dec_widths[level - 1], dec_widths[level], 2, norm=norm,
                                         activation=activation))
            self.dec.append(_ResidualStage(dec_widths[level] + skip, dec_widths[level], 2, norm, activation))
        self.maps = nn.ModuleList([nn.Conv3d(w, num_classes, 1) for w in dec_widths])

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        skips = []
        y = x
        for i, stage in enumerate(self.enc):
            y = stage(y)
            if i < 3:
                skips.append(y)
                y = self.down[i](y)
        decoded = [self.dec[0](y)]
        for level in range(1, 4):
            y = self.up[level - 1](decoded[-1])
            decoded.append(self.dec[level](torch.cat([y, skips[3 - level]], dim=1)))
        size = x.shape[2:]
        if not self.training:
            return self.maps[3](decoded[3])
        outputs = [self.maps[3](decoded[3])]
        for level in (2, 1, 0):
            out = self.maps[level](decoded[level])
            outputs.append(F.interpolate(out, size=size, mode="trilinear", align_corners=False))
        return outputs
