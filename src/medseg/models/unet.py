"""ResidualSEUNet: a residual-encoder U-Net with squeeze-and-excitation, in 2D or 3D.

The layout follows nnU-Net's residual-encoder presets (Isensee et al., 2024): a stem
convolution, encoder stages of residual blocks whose first block downsamples, and a
light decoder (transposed convolution, skip concatenation, conv-norm-act) with one
segmentation output per decoder level for deep supervision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg.errors import ConfigError
from medseg.models.blocks import ConvNormAct, ResidualBlock, Stride, conv, transposed_conv
from medseg.models.bottleneck import total_stride


class ResidualSEUNet(nn.Module):
    """Residual U-Net with squeeze-and-excitation blocks.

    Args:
        in_channels: image channels (modalities).
        num_classes: segmentation output channels (background included); 0 for a network
            whose outputs are all task heads (see :mod:`medseg.models.heads`).
        dims: 2 or 3 spatial dimensions.
        width: features of the first stage; stage i has ``min(width * 2**i, max_features)``.
        max_features: cap on features per stage.
        num_stages: encoder stages (resolution levels).
        blocks_per_stage: residual blocks in each encoder stage (one int or one per stage).
        strides: downsampling stride of each stage (int or one per axis); default 1 for the
            first stage and 2 for the others.
        features: explicit features per stage; overrides ``width`` and ``max_features``.
        decoder_blocks: conv-norm-act units per decoder level.
        se: squeeze-and-excitation in every residual block.
        se_ratio: hidden size of the excitation MLP relative to the channels.
        deep_supervision: in training mode, return logits at every decoder level
            (full resolution first); in eval mode only the full-resolution logits.
        dropout: dropout probability inside every residual block (0 disables it; needed
            > 0 for Monte-Carlo dropout uncertainty at inference).
        decoder: build the decoder (a network whose heads all read encoder features, such as
            case classification, needs none).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        dims: int = 3,
        width: int = 32,
        max_features: int = 320,
        num_stages: int = 6,
        blocks_per_stage: int | Sequence[int] = (1, 3, 4, 6, 6, 6),
        strides: Sequence[Stride] | None = None,
        features: Sequence[int] | None = None,
        decoder_blocks: int = 1,
        se: bool = True,
        se_ratio: float = 0.25,
        deep_supervision: bool = True,
        dropout: float = 0.0,
        decoder: bool = True,
    ):
        super().__init__()
        _check_choice("model.dims", dims, (2, 3))
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, int | float)
            or not 0 <= dropout < 1
        ):
            raise ConfigError(f"model.dropout must be a number in [0, 1), got {dropout!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ConfigError(f"model.num_classes must be an integer >= 0, got {num_classes!r}")
        if num_classes and not decoder:
            raise ConfigError("a network with segmentation outputs needs its decoder")
        for key, value in {
            "model.in_channels": in_channels,
            "model.width": width,
            "model.max_features": max_features,
            "model.num_stages": num_stages,
            "model.decoder_blocks": decoder_blocks,
        }.items():
            _check_positive_int(key, value)
        self.dims = dims
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        self.features = _per_stage_features(features, width, max_features, num_stages)
        self.strides = _per_stage_strides(strides, num_stages, dims)
        blocks = _per_stage_ints("model.blocks_per_stage", blocks_per_stage, num_stages)

        self.stem = ConvNormAct(dims, in_channels, self.features[0])
        self.encoder = nn.ModuleList()
        channels = self.features[0]
        for out_channels, stride, n_blocks in zip(self.features, self.strides, blocks, strict=True):
            stage = [ResidualBlock(dims, channels, out_channels, stride, se, se_ratio, dropout)]
            stage += [
                ResidualBlock(dims, out_channels, out_channels, 1, se, se_ratio, dropout)
                for _ in range(n_blocks - 1)
            ]
            self.encoder.append(nn.Sequential(*stage))
            channels = out_channels

        self.upsamplers = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.seg_heads = nn.ModuleList()
        for level in reversed(range(num_stages - 1) if decoder else ()):
            skip_channels = self.features[level]
            self.upsamplers.append(
                transposed_conv(dims, channels, skip_channels, self.strides[level + 1])
            )
            units = [ConvNormAct(dims, 2 * skip_channels, skip_channels)]
            units += [
                ConvNormAct(dims, skip_channels, skip_channels) for _ in range(decoder_blocks - 1)
            ]
            self.decoder.append(nn.Sequential(*units))
            if num_classes:
                self.seg_heads.append(conv(dims, skip_channels, num_classes, kernel_size=1))
            channels = skip_channels
        self.apply(_init_weights)

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Product of the strides per axis: input sizes must be multiples of it."""
        return total_stride(self.strides)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of every encoder stage, highest resolution first."""
        skips = []
        x = self.stem(x)
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        return skips

    @property
    def decoder_features(self) -> list[int]:
        """Channels of the decoder's outputs, full resolution first."""
        return self.features[: len(self.decoder)]

    def decode_features(
        self, skips: list[torch.Tensor], all_levels: bool = True
    ) -> list[torch.Tensor]:
        """Features of every decoder level from the encoder features, full resolution first.

        With ``all_levels=False`` only the full-resolution level is returned.
        """
        if not self.decoder:
            raise RuntimeError("this network was built without a decoder")
        x = skips[-1]
        features = []
        for i, (up, block) in enumerate(zip(self.upsamplers, self.decoder, strict=True)):
            x = block(torch.cat([up(x), skips[-2 - i]], dim=1))
            if all_levels or i == len(self.decoder) - 1:
                features.append(x)
        return features[::-1]

    def segment(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Segmentation logits of decoder features (all levels, or only the full-resolution
        one), full resolution first."""
        if not self.seg_heads:
            raise RuntimeError("this network has no segmentation outputs (num_classes=0)")
        heads = list(self.seg_heads)[::-1][: len(features)]
        return [head(x) for head, x in zip(heads, features, strict=True)]

    def decode(self, skips: list[torch.Tensor], all_levels: bool = True) -> list[torch.Tensor]:
        """Segmentation logits from the encoder features, full resolution first.

        With ``all_levels=False`` only the full-resolution head runs (inference).
        """
        return self.segment(self.decode_features(skips, all_levels))

    def check_input_size(self, size: Sequence[int]) -> None:
        """Raise a ConfigError unless `size` suits the network (before any compute is spent)."""
        size = tuple(int(s) for s in size)
        stride = self.total_stride
        if len(size) != self.dims or any(s % t for s, t in zip(size, stride, strict=True)):
            raise ConfigError(
                f"input size {size} is not a multiple of the network's total stride {stride}: "
                "choose a patch size divisible by it"
            )
        if all(s == t for s, t in zip(size, stride, strict=True)):
            raise ConfigError(
                f"input size {size} leaves a 1-voxel bottleneck (total stride {stride}), which "
                "instance norm cannot normalize: use a larger patch or fewer stages"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_input_size(x.shape[2:])
        all_levels = self.deep_supervision and self.training
        outputs = self.decode(self.encode(x), all_levels)
        return outputs if all_levels else outputs[0]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d):
        nn.init.kaiming_normal_(module.weight, a=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _check_positive_int(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def _check_choice(key: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def _per_stage_ints(key: str, value: int | Sequence[int], num_stages: int) -> list[int]:
    values = [value] * num_stages if isinstance(value, int) else list(value)
    if len(values) != num_stages:
        raise ConfigError(f"{key} needs {num_stages} entries (one per stage), got {values}")
    for v in values:
        _check_positive_int(key, v)
    return values


def _per_stage_features(
    features: Sequence[int] | None, width: int, max_features: int, num_stages: int
) -> list[int]:
    if features is not None:
        return _per_stage_ints("model.features", features, num_stages)
    return [min(width * 2**i, max_features) for i in range(num_stages)]


def _per_stage_strides(
    strides: Sequence[Stride] | None, num_stages: int, dims: int
) -> list[tuple[int, ...]]:
    if strides is None:
        strides = [1] + [2] * (num_stages - 1)
    if len(strides) != num_stages:
        raise ConfigError(
            f"model.strides needs {num_stages} entries (one per stage), got {list(strides)}"
        )
    result = []
    for stride in strides:
        axes = (stride,) * dims if isinstance(stride, int) else tuple(stride)
        if len(axes) != dims or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in axes
        ):
            raise ConfigError(
                f"model.strides entries must be a positive int or {dims} positive ints, "
                f"got {stride!r}"
            )
        result.append(axes)
    return result
