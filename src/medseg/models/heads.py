"""Task heads on a stage's ResidualSEUNet, in 2D or 3D.

Case-level tasks (classification, regression) read the encoder: a multi-scale attention head
pools the last encoder stages and weighs them with learned attention, so a task can rely on
coarse context or on finer detail as it needs. Dense tasks (another label map, a distance
map) read the decoder's full-resolution features through a 1x1 convolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg.errors import ConfigError
from medseg.tasks import TaskSpec

_POINTWISE = {2: nn.Conv2d, 3: nn.Conv3d}
CASE_HEAD_SETTINGS = ("scales", "hidden", "dropout")


class MultiScaleAttentionHead(nn.Module):
    """Case-level outputs from the last encoder stages, weighed by learned attention.

    Every scale is embedded voxel by voxel (a linear layer and LeakyReLU over the channels),
    then pooled over all spatial axes by mean and max, and projected to ``hidden`` features.
    The embedding comes first because the encoder's features are instance-normalized: their
    spatial means are nearly the same for every case, while the mean of a learned, rectified
    embedding measures how much of the volume shows a learned pattern (an organ's volume, a
    lesion load) and the max whether it shows at all. A shared scoring layer gives each scale
    a score, and the softmax of the scores over scales weighs their sum; dropout and a linear
    layer then give the outputs.

    Args:
        in_channels: channels of each scale, coarsest last (as the encoder orders them).
        num_outputs: output values (classes, or 1 for regression).
        hidden: features of each scale's embedding and projection.
        dropout: dropout before the output layer.
    """

    def __init__(
        self, in_channels: Sequence[int], num_outputs: int, hidden: int = 64, dropout: float = 0.1
    ):
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ConfigError(f"head.hidden must be a positive integer, got {hidden!r}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"head.dropout must be in [0, 1), got {dropout!r}")
        self.embeddings = nn.ModuleList(
            nn.Sequential(nn.Linear(c, hidden), nn.LeakyReLU(0.01)) for c in in_channels
        )
        # No normalization here: the magnitudes of the pooled embeddings are what a volume or
        # a count is read from.
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * hidden, hidden), nn.LeakyReLU(0.01)) for _ in in_channels
        )
        self.score = nn.Linear(hidden, 1)
        self.output = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_outputs))

    @property
    def num_scales(self) -> int:
        return len(self.projections)

    def scale_features(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Features [B, hidden] of scale `index` from its feature map [B, C, *spatial]."""
        voxels = self.embeddings[index](x.flatten(2).transpose(1, 2))  # [B, voxels, hidden]
        return self.projections[index](torch.cat([voxels.mean(1), voxels.amax(1)], dim=1))

    def attend(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention-weighted features [B, hidden] and the weights [B, scales].

        Computed in float32 even under mixed precision: a volume's statistics differ between
        cases by less than bfloat16 resolves (about 0.4 %).
        """
        if len(features) != self.num_scales:
            raise ValueError(f"expected {self.num_scales} scales, got {len(features)}")
        with torch.autocast(features[0].device.type, enabled=False):
            stacked = torch.stack(
                [self.scale_features(i, x.float()) for i, x in enumerate(features)], 1
            )
            weights = torch.softmax(self.score(stacked).squeeze(-1), dim=1)
            return (weights.unsqueeze(-1) * stacked).sum(1), weights

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        pooled = self.attend(features)[0]
        with torch.autocast(pooled.device.type, enabled=False):
            return self.output(pooled)


class DenseHead(nn.Module):
    """A 1x1 convolution (with bias) over decoder features: logits or a regressed map."""

    def __init__(self, dims: int, in_channels: int, num_outputs: int):
        super().__init__()
        self.conv = _POINTWISE[dims](in_channels, num_outputs, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TaskHeads(nn.Module):
    """The heads of one stage's tasks.

    Args:
        tasks: the stage's tasks; a case-level task's ``head`` settings are ``scales`` (the
            last encoder stages it pools, default 3), ``hidden`` and ``dropout``.
        dims: spatial dimensions of the network.
        encoder_channels: channels of every encoder stage, highest resolution first.
        decoder_channels: channels of the decoder's full-resolution features (None for a
            network without decoder, which then has no dense tasks).
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        dims: int,
        encoder_channels: Sequence[int],
        decoder_channels: int | None,
    ):
        super().__init__()
        heads = {}
        for task in tasks:
            settings = dict(task.head)
            allowed = CASE_HEAD_SETTINGS if task.is_case_level else ()
            unknown = sorted(set(settings) - set(allowed))
            if unknown:
                raise ConfigError(
                    f"task {task.name!r}: unknown head settings {unknown}; a {task.type} head "
                    f"takes {list(allowed)}"
                )
            if task.is_case_level:
                scales = settings.pop("scales", 3)
                if not isinstance(scales, int) or not 1 <= scales <= len(encoder_channels):
                    raise ConfigError(
                        f"task {task.name!r}: head.scales must be an integer in "
                        f"[1, {len(encoder_channels)}] (the encoder's stages), got {scales!r}"
                    )
                channels = list(encoder_channels[-scales:])
                heads[task.name] = MultiScaleAttentionHead(channels, task.num_outputs, **settings)
            else:
                if decoder_channels is None:
                    raise ValueError(f"task {task.name!r} needs the network's decoder")
                heads[task.name] = DenseHead(dims, decoder_channels, task.num_outputs)
        self.heads = nn.ModuleDict(heads)

    def forward(
        self, encoder: Sequence[torch.Tensor], decoder: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Outputs by task name: [B, K] for case-level tasks, [B, K, *spatial] for dense ones.

        Args:
            encoder: features of every encoder stage, highest resolution first.
            decoder: the decoder's full-resolution features (None without dense tasks).
        """
        return {
            name: head(encoder[-head.num_scales :])
            if isinstance(head, MultiScaleAttentionHead)
            else head(decoder)
            for name, head in self.heads.items()
        }
