"""Deterministic preprocessing: canonical orientation, resampling, intensity normalization."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torchio as tio

from medseg.data.subjects import MERGE_PREFIX
from medseg.errors import ConfigError, DataError

INTENSITY_MODES = ("ct_window", "zscore", "zscore_nonzero", "none")


class ChannelwiseZNormalization(tio.IntensityTransform):
    """Z-score each channel on its own (TorchIO's ZNormalization pools all channels).

    With ``nonzero=True`` the statistics come from non-zero voxels only and zero voxels
    stay zero, as nnU-Net does for skull-stripped MRI.
    """

    def __init__(self, nonzero: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.nonzero = nonzero
        self.args_names = ["nonzero"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            data = image.data.float()
            mask = data != 0 if self.nonzero else torch.ones_like(data, dtype=torch.bool)
            axes = tuple(range(1, data.ndim))
            count = mask.sum(axes, keepdim=True).clamp_min(1)
            mean = (data * mask).sum(axes, keepdim=True) / count
            var = (((data - mean) * mask) ** 2).sum(axes, keepdim=True) / count
            std = var.sqrt()
            if bool((std == 0).any()):
                raise DataError(
                    f"{image.path}: an image channel is constant, it cannot be z-scored"
                )
            normalized = (data - mean) / std
            image.set_data(torch.where(mask, normalized, 0) if self.nonzero else normalized)
        return subject


class MergeLabelMasks(tio.Transform):
    """Fold binary masks named ``merge_<value>`` into ``label``: its background voxels inside
    a mask get ``value`` (e.g. a brain mask around a tumour label map), then drop the masks."""

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        masks = [k for k in subject if k.startswith(MERGE_PREFIX)]
        if not masks:
            return subject
        label = subject["label"]
        data = label.data.clone()
        for key in masks:
            value = int(key.removeprefix(MERGE_PREFIX))
            data[(data == 0) & (subject[key].data > 0)] = value
            subject.remove_image(key)
        label.set_data(data)
        return subject


def intensity_transforms(mode: str = "zscore", window: Sequence[float] | None = None):
    """Intensity normalization by mode.

    ``ct_window``: clip to a HU ``window`` and rescale it to [-1, 1]; ``zscore``: per-channel
    z-score; ``zscore_nonzero``: z-score over non-zero voxels (skull-stripped MRI); ``none``.
    """
    if mode not in INTENSITY_MODES:
        raise ConfigError(
            f"data.preprocess.intensity.mode must be one of {list(INTENSITY_MODES)}, got {mode!r}"
        )
    if mode != "ct_window":
        if window is not None:
            raise ConfigError("data.preprocess.intensity.window is only used by mode ct_window")
        if mode == "none":
            return []
        return [ChannelwiseZNormalization(nonzero=mode == "zscore_nonzero")]
    if not isinstance(window, Sequence) or len(window) != 2 or window[0] >= window[1]:
        raise ConfigError(
            f"data.preprocess.intensity.window must be [low, high] in HU, got {window!r}"
        )
    low, high = float(window[0]), float(window[1])
    return [
        tio.Clamp(low, high),
        tio.RescaleIntensity(out_min_max=(-1, 1), in_min_max=(low, high)),
    ]


def build_preprocessing(
    canonical: bool = True,
    spacing: Sequence[float] | None = None,
    intensity: Mapping | None = None,
    min_shape: Sequence[int] | None = None,
) -> tio.Compose:
    """The deterministic part of the data pipeline, applied once per case.

    Args:
        canonical: reorient to RAS+ so axes mean the same thing for every case.
        spacing: target voxel spacing in mm (x, y, z); None keeps each case's own.
        intensity: keyword arguments of :func:`intensity_transforms`.
        min_shape: pad (never crop) to at least this shape, e.g. the patch size.
    """
    transforms: list[tio.Transform] = [MergeLabelMasks()]
    if canonical:
        transforms.append(tio.ToCanonical())
    if spacing is not None:
        if len(spacing) != 3 or any(float(s) <= 0 for s in spacing):
            raise ConfigError(
                f"data.preprocess.spacing must be 3 positive numbers (mm), got {spacing!r}"
            )
        transforms.append(tio.Resample(tuple(float(s) for s in spacing), antialias=True))
    transforms += intensity_transforms(**dict(intensity or {"mode": "none"}))
    if min_shape is not None:
        transforms.append(tio.CropOrPad(tuple(min_shape), only_pad=True, padding_mode="minimum"))
    return tio.Compose(transforms)
