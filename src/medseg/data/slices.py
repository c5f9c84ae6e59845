"""2D mode: train on slices of 3D volumes, predict slice by slice back into a volume.

A slice is a patch of size 1 along ``slice_axis`` (so the 3D patch machinery samples,
augments and reads it); the batch then drops that axis: ``image`` [B, C, a, b] for the
in-plane axes (a, b) in the volume's axis order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch

from medseg.data.subjects import collate_subjects
from medseg.errors import ConfigError


def check_slice_axis(slice_axis: int | None) -> int | None:
    if slice_axis is not None and (
        isinstance(slice_axis, bool)
        or not isinstance(slice_axis, int)
        or slice_axis not in (0, 1, 2)
    ):
        raise ConfigError(f"data.slice_axis must be null (3D), 0, 1 or 2, got {slice_axis!r}")
    return slice_axis


def volume_patch_size(patch_size: Sequence[int], slice_axis: int | None) -> tuple[int, ...]:
    """The 3D patch read from a volume: the 2D patch with size 1 inserted at the slice axis."""
    size = list(patch_size)
    if slice_axis is not None:
        size.insert(slice_axis, 1)
    return tuple(size)


def _collate_slices(subjects, slice_axis: int) -> dict:
    """Every [B, C, x, y, z] field of the batch (image, label, earlier-stage priors, voxel
    targets) without the slice axis."""

    def drop_slice_axis(value):
        if isinstance(value, dict):
            return {k: drop_slice_axis(v) for k, v in value.items()}
        if torch.is_tensor(value) and value.ndim == 5:
            return value.squeeze(2 + slice_axis)
        return value

    return {key: drop_slice_axis(value) for key, value in collate_subjects(subjects).items()}


def patch_collate(slice_axis: int | None) -> Callable:
    """Batch collation for training patches (3D) or slices (2D)."""
    if slice_axis is None:
        return collate_subjects
    return partial(_collate_slices, slice_axis=slice_axis)


def predict_slices(
    image: torch.Tensor,
    slice_axis: int,
    predict_2d: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Predict a volume [1, C, x, y, z] one slice at a time along ``slice_axis``.

    ``predict_2d`` maps one slice [1, C, a, b] to logits [1, K, a, b] (e.g. sliding-window
    inference with a 2D network); the slices' logits are stacked back: [1, K, x, y, z].
    """
    dim = 2 + slice_axis
    logits = [predict_2d(image.select(dim, i)) for i in range(image.shape[dim])]
    return torch.stack(logits, dim=dim)
