"""Building blocks of the residual squeeze-and-excitation U-Net, for 2D and 3D."""

from __future__ import annotations

import torch
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED_CONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_AVG_POOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}

Stride = int | tuple[int, ...]


def conv(dims: int, in_channels: int, out_channels: int, kernel_size: int = 3, stride: Stride = 1):
    """A bias-free convolution with 'same' padding (the following norm makes a bias redundant)."""
    return _CONV[dims](
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
    )


def transposed_conv(dims: int, in_channels: int, out_channels: int, stride: Stride):
    """Learned upsampling by exactly `stride` (kernel size equals stride, as in nnU-Net)."""
    return _TRANSPOSED_CONV[dims](in_channels, out_channels, stride, stride=stride, bias=False)


def instance_norm(dims: int, channels: int) -> nn.Module:
    return _INSTANCE_NORM[dims](channels, eps=1e-5, affine=True)


class ConvNormAct(nn.Sequential):
    """Convolution, instance norm and LeakyReLU(0.01): nnU-Net's basic unit."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        stride: Stride = 1,
        kernel_size: int = 3,
    ):
        super().__init__(
            conv(dims, in_channels, out_channels, kernel_size, stride),
            instance_norm(dims, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
        )


class SqueezeExcitation(nn.Module):
    """Channel attention from features averaged over *all* spatial axes (Hu et al., 2018)."""

    def __init__(self, dims: int, channels: int, ratio: float = 0.25):
        super().__init__()
        hidden = max(1, round(channels * ratio))
        self.spatial_axes = tuple(range(2, 2 + dims))
        self.reduce = _CONV[dims](channels, hidden, 1)
        self.expand = _CONV[dims](hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean(dim=self.spatial_axes, keepdim=True)
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(squeezed))))
        return x * gate


class ResidualBlock(nn.Module):
    """Pre-activation-free basic residual block with optional squeeze-and-excitation.

    Two 3x3 convolutions; the skip path downsamples by average pooling then a 1x1
    convolution when the shape changes (the "ResNet-D" skip used by nnU-Net's ResEnc).
    With ``dropout > 0``, element-wise dropout between the two convolutions (as in wide
    ResNets), which Monte-Carlo dropout keeps active at inference.
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        stride: Stride = 1,
        se: bool = True,
        se_ratio: float = 0.25,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.conv1 = ConvNormAct(dims, in_channels, out_channels, stride)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Sequential(
            conv(dims, out_channels, out_channels), instance_norm(dims, out_channels)
        )
        self.se = SqueezeExcitation(dims, out_channels, se_ratio) if se else nn.Identity()
        skip: list[nn.Module] = []
        if _any_stride(stride):
            skip.append(_AVG_POOL[dims](stride, stride, ceil_mode=True))
        if in_channels != out_channels or skip:
            skip += [conv(dims, in_channels, out_channels, 1), instance_norm(dims, out_channels)]
        self.skip = nn.Sequential(*skip) if skip else nn.Identity()
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.se(self.conv2(self.dropout(self.conv1(x)))) + self.skip(x))


def _any_stride(stride: Stride) -> bool:
    return any(s != 1 for s in stride) if isinstance(stride, tuple) else stride != 1
