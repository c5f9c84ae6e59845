"""The grid a cascade stage works on: a centre part of the training patch, optionally
downsampled by integer factors.

Stages of one cascade may need different resolutions: the organ needs context (a coarse
grid covers a large field of view cheaply), a lesion inside it needs detail (the full
resolution, affordable because it only predicts inside the organ's box) — nnU-Net's
low-resolution -> full-resolution cascade. Here the data is prepared once, at the finest
grid; a coarser stage average-pools its input (area-weighted resampling by an integer factor,
aligned with the fine grid) and its outputs are interpolated back, so every stage's
probabilities meet on the data grid where the cascade is composed. A stage's training input
is the centre of the training patch (``window`` x ``factors`` data voxels), so a
full-resolution stage can train on a smaller field of view than a pooled one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medseg.errors import ConfigError
from medseg.utils.config import positive_ints

_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


@dataclass(frozen=True)
class StageGrid:
    """A stage's network input: ``window`` voxels of its own grid, which is the data grid
    downsampled by ``factors`` (per spatial axis)."""

    factors: tuple[int, ...]
    window: tuple[int, ...]

    @property
    def extent(self) -> tuple[int, ...]:
        """The data voxels one window covers."""
        return tuple(w * f for w, f in zip(self.window, self.factors, strict=True))

    @property
    def downsamples(self) -> bool:
        return any(f > 1 for f in self.factors)

    def crop(self, tensor: torch.Tensor) -> torch.Tensor:
        """The centre ``extent`` of the trailing spatial axes of a training patch."""
        shape = tensor.shape[-len(self.extent) :]
        box = tuple(
            slice((size - extent) // 2, (size - extent) // 2 + extent)
            for size, extent in zip(shape, self.extent, strict=True)
        )
        return tensor[(..., *box)]

    def crop_batch(self, batch: Mapping) -> dict:
        """Every field of a training batch on the patch's voxels (image, label, earlier
        stages' masks, dense targets), cropped to the centre ``extent``; the rest as is."""
        spatial = tuple(batch["image"].shape[2:])

        def cropped(value):
            if isinstance(value, Mapping):
                return {k: cropped(v) for k, v in value.items()}
            if torch.is_tensor(value) and value.ndim >= 3 and tuple(value.shape[2:]) == spatial:
                return self.crop(value)
            return value

        return {key: cropped(value) for key, value in batch.items()}

    def pool(self, tensor: torch.Tensor) -> torch.Tensor:
        """[N, C, *spatial] average-pooled by ``factors``; a volume whose size is not a
        multiple of them is padded with its edge voxels first."""
        if not self.downsamples:
            return tensor
        spatial = tensor.shape[2:]
        pad = [(-size) % f for size, f in zip(spatial, self.factors, strict=True)]
        if any(pad):
            # F.pad lists the last axis first, (before, after) per axis.
            widths = [w for p in reversed(pad) for w in (0, p)]
            tensor = F.pad(tensor, widths, mode="replicate")
        return _AVG_POOL[len(spatial)](tensor, self.factors, self.factors)

    def unpool(self, tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Outputs on the stage's grid [N, K, *coarse] back on the data grid [N, K, *shape]
        (linear interpolation, voxel centres aligned with :meth:`pool`'s blocks)."""
        if not self.downsamples:
            return tensor
        upsampled = F.interpolate(
            tensor,
            scale_factor=[float(f) for f in self.factors],
            mode=_LINEAR[tensor.ndim - 2],
            align_corners=False,
        )
        return upsampled[(..., *(slice(0, int(s)) for s in shape))]


def stage_grid(
    name: str,
    downsample: Sequence[int] | None,
    patch_size: Sequence[int] | None,
    data_window: Sequence[int],
) -> StageGrid:
    """A stage's grid from its ``downsample`` and ``patch_size`` settings and the data's
    patch (``data.patch_size``), with errors naming the stage and the keys."""
    dims = len(data_window)
    key = f"stage {name!r}"
    factors = (1,) * dims if downsample is None else downsample
    factors = positive_ints(f"{key}: downsample", factors, length=dims)
    if any(w % f for w, f in zip(data_window, factors, strict=True)):
        raise ConfigError(
            f"{key}: data.patch_size {list(data_window)} is not divisible by its downsample "
            f"factors {list(factors)}"
        )
    if patch_size is None:
        window = tuple(w // f for w, f in zip(data_window, factors, strict=True))
    else:
        window = positive_ints(f"{key}: patch_size", patch_size, length=dims)
    grid = StageGrid(factors, window)
    if any(e > w for e, w in zip(grid.extent, data_window, strict=True)):
        raise ConfigError(
            f"{key}: patch_size {list(window)} x downsample {list(factors)} covers "
            f"{list(grid.extent)} data voxels, more than data.patch_size {list(data_window)}: "
            "raise data.patch_size or lower the stage's patch_size"
        )
    return grid
