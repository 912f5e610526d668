"""V-Net (Milletari et al., 2016) and the two-stage V-Net of the KiTS19 "Two-phase Framework"."""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from . import register
from .vnet_blocks import (
    ConvNormAct,
    DownTransition,
    ResidualConvStage,
    UpTransition,
    check_counts,
    check_features,
    check_input_size,
    init_conv_weights,
    make_activation,
)


class _InputStage(nn.Module):
    """V-Net input stage: ``act(conv(x) + x')`` where x' is x repeated to ``out_channels``
    channels when ``in_channels`` divides it (Milletari), else a 1x1x1 conv projection of x."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: str, activation: str):
        super().__init__()
        self.conv = ConvNormAct(in_channels, out_channels, kernel_size, norm, None)
        self.repeats = out_channels // in_channels if out_channels % in_channels == 0 else 0
        self.project = None if self.repeats else nn.Conv3d(in_channels, out_channels, 1, bias=False)
        self.act = make_activation(activation, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        out += x.repeat(1, self.repeats, 1, 1, 1) if self.project is None else self.project(x)
        return self.act(out)


@register("vnet")
class VNet(nn.Module):
    """V-Net of F. Milletari, N. Navab, S.-A. Ahmadi, "V-Net: Fully convolutional neural networks
    for volumetric medical image segmentation" (3DV 2016), as used by H. Wei, Q. Wang, W. Zhao et
    al., "Two-phase Framework for Automatic Kidney and Kidney Tumor Segmentation" (KiTS19, 2019):
    5x5x5 convolutions, 4 down and 4 up stages, residual stages, PReLU.

    Takes [B, in_channels, D, H, W] with D, H, W multiples of ``min_input_multiple`` (else
    ValueError: pad first) and returns logits [B, num_classes, D, H, W].

    Layout (level l has ``features[l]`` channels at 1/2^l resolution):
    input stage: one ``kernel_size``^3 conv in_channels -> features[0] with a residual add of the
    input; down stage l = 1..4: 2x2x2 stride-2 conv features[l-1] -> features[l], then a residual
    stage of ``down_convs[l-1]`` convs; up stage l = 3..0: 2x2x2 stride-2 transposed conv to
    features[l], concatenated with the encoder output of level l, then a residual stage of
    ``up_convs[3-l]`` convs on 2*features[l] channels; output 1x1x1 conv 2*features[0] ->
    num_classes. A residual stage is ``PReLU(x + convs(x))``.

    Details the papers leave open (or that differ between implementations) and the choices made:
      - Widths (16, 32, 64, 128, 256) and convs per stage: input 1, down (2, 3, 3, 3), up
        (3, 3, 2, 1), all as in Milletari's Fig. 2. The Two-phase paper only says "same as V-Net".
      - Normalization: batch norm after each conv (Milletari's Caffe model had none: ``norm="none"``;
        PyTorch V-Nets, which the Two-phase authors used, add batch norm); "instance" selectable.
      - Activation PReLU with one slope per channel (Milletari: PReLU, channel sharing unstated).
      - Input residual: the input repeated to features[0] channels (Milletari, 1 input channel);
        when in_channels does not divide features[0], a 1x1x1 conv projection instead.
      - Output: 1x1x1 conv to logits (Milletari), softmax left to the loss / inference.
      - Dropout3d(``dropout``) after each down/up transition when ``dropout > 0`` (default none).
      - Weights: He-normal (fan-out) convs, zero biases.

    Size with the defaults and 3 classes: 65,178,803 parameters (248.6 MiB float32) -- the
    "V-Net (250 MB)" that the VB-Net paper compares against; 847.4 GFLOP per [1, 1, 96, 96, 96].
    """

    spatial_dims = 3
    min_input_multiple = (16, 16, 16)

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        down_convs: Sequence[int] = (2, 3, 3, 3),
        up_convs: Sequence[int] = (3, 3, 2, 1),
        kernel_size: int = 5,
        norm: str = "batch",
        dropout: float = 0.0,
    ):
        super().__init__()
        f = check_features(features)
        down_convs = check_counts("down_convs", down_convs)
        up_convs = check_counts("up_convs", up_convs)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        act = "prelu"
        self.input_stage = _InputStage(in_channels, f[0], kernel_size, norm, act)
        self.down = nn.ModuleList(
            DownTransition(f[level - 1], f[level], ResidualConvStage(f[level], down_convs[level - 1], kernel_size,
                                                                     norm, act), norm, act, dropout)
            for level in range(1, 5)
        )
        self.up = nn.ModuleList()
        channels = f[4]
        for i, level in enumerate((3, 2, 1, 0)):
            stage = ResidualConvStage(2 * f[level], up_convs[i], kernel_size, norm, act)
            self.up.append(UpTransition(channels, f[level], stage, norm, act, dropout))
            channels = 2 * f[level]
        self.output = nn.Conv3d(channels, num_classes, 1)
        init_conv_weights(self)

    def decode_features(self, x: torch.Tensor,
                        decoder_additions: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
        """Outputs of the 4 up stages (coarsest first) for x [B, in_channels, D, H, W].

        If ``decoder_additions`` (4 tensors shaped like those outputs) is given, each is added to
        the matching up-stage output before it feeds the next stage (the Two-phase paper's
        "feature map ensemble"). Does not check the input size.
        """
        skips = [self.input_stage(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        out = skips.pop()
        decoded = []
        for i, up in enumerate(self.up):
            out = up(out, skips.pop())
            if decoder_additions is not None:
                out += decoder_additions[i]
            decoded.append(out)
        return decoded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes, D, H, W] for x [B, in_channels, D, H, W]."""
        check_input_size(x, self.min_input_multiple)
        return self.output(self.decode_features(x)[-1])


@register("vnet_two_stage")
class TwoStageVNet(nn.Module):
    """Enhanced two-stage coarse-to-fine V-Net of H. Wei, Q. Wang, W. Zhao, M. Zhang, K. Yuan,
    Z. Li, "Two-phase Framework for Automatic Kidney and Kidney Tumor Segmentation" (KiTS19, 2019),
    section 3.3 and Fig. 4.

    V-Net 1 segments the image; V-Net 2 gets the image concatenated with V-Net 1's softmax
    (in_channels + num_classes channels); every up-stage output of V-Net 1 is added to the
    matching up-stage output of V-Net 2 ("feature map ensemble").

    Takes [B, in_channels, D, H, W] with D, H, W multiples of ``min_input_multiple`` (else
    ValueError: pad first). Returns, in training mode, ``[stage2_logits, stage1_logits]`` (both
    [B, num_classes, D, H, W], both meant for the loss); in eval mode only ``stage2_logits``.

    Details the paper leaves open and the choices made:
      - Both V-Nets are :class:`VNet` with the same kwargs (widths, convs, kernel, norm, dropout);
        see its docstring for the V-Net choices.
      - "Feature map" = the output of each up stage (after its residual add), added before it
        feeds the next up stage / the output conv of V-Net 2.
      - The two V-Nets are trained jointly: gradients of the stage-2 loss flow into V-Net 1
        through both the softmax input and the feature-map additions (nothing detached).
      - The stage-1 "segmentation result" passed on is the softmax probability map, not argmax.
    """

    spatial_dims = 3
    min_input_multiple = (16, 16, 16)

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        down_convs: Sequence[int] = (2, 3, 3, 3),
        up_convs: Sequence[int] = (3, 3, 2, 1),
        kernel_size: int = 5,
        norm: str = "batch",
        dropout: float = 0.0,
    ):
        super().__init__()
        common = dict(num_classes=num_classes, features=features, down_convs=down_convs, up_convs=up_convs,
                      kernel_size=kernel_size, norm=norm, dropout=dropout)
        self.stage1 = VNet(in_channels=in_channels, **common)
        self.stage2 = VNet(in_channels=in_channels + num_classes, **common)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Eval: stage-2 logits; training: [stage2_logits, stage1_logits]; x is [B, in_channels, D, H, W]."""
        check_input_size(x, self.min_input_multiple)
        decoded1 = self.stage1.decode_features(x)
        logits1 = self.stage1.output(decoded1[-1])
        probs1 = torch.softmax(logits1, dim=1)
        x2 = torch.cat((x, probs1.to(x.dtype)), dim=1)
        logits2 = self.stage2.output(self.stage2.decode_features(x2, decoded1)[-1])
        if self.training:
            return [logits2, logits1]
        return logits2
