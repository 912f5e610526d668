"""Building blocks shared by the seed networks (2D and 3D).

Every block takes ``spatial_dims`` (2 or 3) and works on tensors shaped
``[B, C, *spatial]`` (``[B, C, D, H, W]`` in 3D, ``[B, C, H, W]`` in 2D). Kernel
sizes, strides and dilations given as tuples are in tensor spatial order.
"""

from __future__ import annotations

import contextlib

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

IntOrSeq = Union[int, Sequence[int]]

NORMS = ("batch", "instance", "none")
ACTIVATIONS = ("relu", "leakyrelu", "prelu")


def _tuple(value: IntOrSeq, spatial_dims: int) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * spatial_dims
    value = tuple(int(v) for v in value)
    if len(value) != spatial_dims:
        raise ValueError(f"expected an int or {spatial_dims} values; got {value}")
    return value


def conv_nd(spatial_dims: int):
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return {2: nn.Conv2d, 3: nn.Conv3d}[_check_dims(spatial_dims)]


def conv_transpose_nd(spatial_dims: int):
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[_check_dims(spatial_dims)]


def _check_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3; got {spatial_dims}")
    return spatial_dims


def make_norm(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """Normalization named ``norm`` ("batch", "instance" or "none") for ``channels`` channels."""
    _check_dims(spatial_dims)
    if norm == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if norm == "instance":
        # affine, so that instance norm learns the same scale/shift as batch norm
        return (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")


def make_activation(activation: str, channels: int) -> nn.Module:
    """Activation: "relu", "leakyrelu" (slope 0.01, nnU-Net's) or "prelu" (one slope per channel)."""
    if activation == "relu":
        return nn.ReLU(inplace=True)
    if activation == "leakyrelu":
        return nn.LeakyReLU(0.01, inplace=True)
    if activation == "prelu":
        return nn.PReLU(channels)
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")


class ConvNormAct(nn.Sequential):
    """Convolution with 'same' padding for stride 1 (``dilation * (k - 1) / 2`` per axis, odd ``k``),
    then normalization and an optional activation.

    Takes ``[B, in_channels, *S]``; returns ``[B, out_channels, *S / stride]`` (S divisible by stride).
    ``groups`` > 1 gives grouped (``groups == in_channels``: depthwise) convolution.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: IntOrSeq = 3,
                 stride: IntOrSeq = 1, dilation: IntOrSeq = 1, norm: str = "batch",
                 activation: Optional[str] = "relu", groups: int = 1):
        kernel = _tuple(kernel_size, spatial_dims)
        dil = _tuple(dilation, spatial_dims)
        if any(k % 2 != 1 for k in kernel):
            raise ValueError(f"kernel_size must be odd on every axis; got {kernel}")
        padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dil))
        layers = [
            # a bias in front of a normalization layer is cancelled by it
            conv_nd(spatial_dims)(in_channels, out_channels, kernel, stride=_tuple(stride, spatial_dims),
                                  padding=padding, dilation=dil, groups=groups, bias=norm == "none"),
            make_norm(norm, spatial_dims, out_channels),
        ]
        if activation is not None:
            layers.append(make_activation(activation, out_channels))
        super().__init__(*layers)


class UpConvNormAct(nn.Sequential):
    """Transposed convolution with kernel = stride (exact up-sampling by ``stride``), norm, activation.

    Takes ``[B, in_channels, *S]``; returns ``[B, out_channels, *(S * stride)]``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: IntOrSeq = 2,
                 norm: str = "batch", activation: Optional[str] = "relu"):
        s = _tuple(stride, spatial_dims)
        layers = [
            conv_transpose_nd(spatial_dims)(in_channels, out_channels, s, stride=s, bias=norm == "none"),
            make_norm(norm, spatial_dims, out_channels),
        ]
        if activation is not None:
            layers.append(make_activation(activation, out_channels))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation channel recalibration (Hu et al., CVPR 2018):
    global average pool -> 1x1 conv (C -> C/reduction) -> ReLU -> 1x1 conv -> sigmoid -> scale ``x``.

    Takes and returns ``[B, channels, *S]``. The hidden width is ``max(channels // reduction, 1)``.
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 1)
        conv = conv_nd(spatial_dims)
        self.fc1 = conv(channels, hidden, 1)
        self.fc2 = conv(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class HybridDilatedConvs(nn.Sequential):
    """Hybrid dilated convolutions (Wang et al., WACV 2018): 3^n convolutions in sequence with the
    given dilation rates (each conv -> norm -> activation), optionally followed by squeeze-excitation
    after every convolution (Liu's SE-HDC). Channels and spatial size are kept.
    ``last_activation=False`` leaves the last conv without activation (for use inside a residual
    stage whose activation follows the sum).

    Takes and returns ``[B, channels, *S]``.
    """

    def __init__(self, spatial_dims: int, channels: int, dilations: Sequence[int], norm: str = "batch",
                 activation: str = "relu", se_reduction: Optional[int] = None, last_activation: bool = True):
        layers = []
        for i, d in enumerate(dilations):
            act = activation if last_activation or i < len(dilations) - 1 else None
            layers.append(ConvNormAct(spatial_dims, channels, channels, 3, dilation=d, norm=norm,
                                      activation=act))
            if se_reduction is not None:
                layers.append(SqueezeExcitation(spatial_dims, channels, se_reduction))
        super().__init__(*layers)


class AttentionGate(nn.Module):
    """Additive attention gate of Attention U-Net (Oktay et al., MIDL 2018), grid-attention form.

    ``x`` (skip features, ``[B, x_channels, *S]``) is gated by ``g`` (coarser decoder features,
    ``[B, g_channels, *S / sub_sample]``): ``theta = W_x x`` (kernel = stride = ``sub_sample``),
    ``phi = W_g g`` (1^n), ``alpha = sigmoid(psi(relu(theta + phi)))`` up-sampled (linear) to ``S``,
    output ``norm(W_y(alpha * x))`` with shape ``[B, x_channels, *S]``.
    """

    def __init__(self, spatial_dims: int, x_channels: int, g_channels: int, inter_channels: int,
                 sub_sample: IntOrSeq = 2, norm: str = "batch"):
        super().__init__()
        conv = conv_nd(spatial_dims)
        s = _tuple(sub_sample, spatial_dims)
        self.theta = conv(x_channels, inter_channels, s, stride=s, bias=False)
        self.phi = conv(g_channels, inter_channels, 1, bias=True)
        self.psi = conv(inter_channels, 1, 1, bias=True)
        self.out = nn.Sequential(conv(x_channels, x_channels, 1, bias=norm == "none"),
                                 make_norm(norm, spatial_dims, x_channels))
        self._mode = "bilinear" if spatial_dims == 2 else "trilinear"

    def attention(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Attention coefficients ``[B, 1, *S]`` in (0, 1)."""
        theta = self.theta(x)
        phi = self.phi(g)
        if phi.shape[2:] != theta.shape[2:]:
            phi = F.interpolate(phi, size=theta.shape[2:], mode=self._mode, align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(theta + phi)))
        return F.interpolate(alpha, size=x.shape[2:], mode=self._mode, align_corners=False)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.out(self.attention(x, g) * x)


class PositionAttention(nn.Module):
    """Position attention module of DANet (Fu et al., CVPR 2019), for any number of spatial dims.

    ``out = gamma * softmax(Q^T K) V + x`` over all N positions, with 1^n-conv projections
    Q, K (``qk_channels``) and V (``channels``); ``gamma`` starts at 0 as in DANet, and the
    energies are not scaled (DANet's choice). Takes and returns ``[B, channels, *S]``.

    Memory: the N x N attention matrix is never stored. Q and K are zero-padded to V's width
    (which leaves every dot product unchanged) so that ``scaled_dot_product_attention`` can pick
    its flash / memory-efficient kernels, which need equal head widths on the CPU and aligned
    ones on CUDA; those kernels work on tiles and recompute the tiles in the backward pass.
    """

    def __init__(self, spatial_dims: int, channels: int, qk_channels: Optional[int] = None):
        super().__init__()
        conv = conv_nd(spatial_dims)
        qk = qk_channels if qk_channels is not None else max(channels // 8, 1)
        if qk > channels:
            raise ValueError(f"qk_channels ({qk}) must not exceed channels ({channels})")
        self.query = conv(channels, qk, 1)
        self.key = conv(channels, qk, 1)
        self.value = conv(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        # the fused kernels need a unit stride along the channel axis
        v = self.value(x).flatten(2).transpose(1, 2).contiguous().unsqueeze(1)  # [B, 1, N, C]
        pad = (0, v.shape[-1] - self.query.out_channels)
        q = F.pad(self.query(x).flatten(2).transpose(1, 2), pad).unsqueeze(1)
        k = F.pad(self.key(x).flatten(2).transpose(1, 2), pad).unsqueeze(1)
        q, k = q.to(v.dtype), k.to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # [B, 1, N, C]
        out = out.squeeze(1).transpose(1, 2).reshape(x.shape)
        return self.gamma * out + x


class ChannelAttention(nn.Module):
    """Channel attention module of DANet (Fu et al., CVPR 2019), for any number of spatial dims.

    ``energy = X X^T`` (C x C over all positions), ``attention = softmax(rowmax(energy) - energy)``,
    ``out = gamma * attention X + x`` with ``gamma`` starting at 0. Takes and returns ``[B, C, *S]``.
    The C x C energies sum N products, which can overflow float16, so this module computes in
    float32 even under autocast.
    """

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # autocast exists for real devices only (not for "meta", used to count FLOPs)
        no_autocast = (torch.autocast(device_type=x.device.type, enabled=False)
                       if x.device.type in ("cpu", "cuda", "mps") else contextlib.nullcontext())
        with no_autocast:
            flat = x.float().flatten(2)  # [B, C, N]
            energy = torch.bmm(flat, flat.transpose(1, 2))
            energy = energy.amax(dim=-1, keepdim=True) - energy
            out = torch.bmm(torch.softmax(energy, dim=-1), flat).reshape(x.shape)
            out = self.gamma * out + x.float()
        return out.to(x.dtype)


class DepthwiseSeparableConv(nn.Sequential):
    """Depthwise separable convolution: depthwise 3^n conv (``stride``, ``dilation``) -> norm -> act
    -> pointwise 1^n conv -> norm -> act (BN + ReLU after both convs, as in DeepLab v3+'s
    separable convs with ``activation_fn_in_separable_conv``).

    Takes ``[B, in_channels, *S]``; returns ``[B, out_channels, *S / stride]``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: IntOrSeq = 1,
                 dilation: IntOrSeq = 1, norm: str = "batch", activation: str = "relu"):
        super().__init__(
            ConvNormAct(spatial_dims, in_channels, in_channels, 3, stride=stride, dilation=dilation,
                        norm=norm, activation=activation, groups=in_channels),
            ConvNormAct(spatial_dims, in_channels, out_channels, 1, norm=norm, activation=activation),
        )
