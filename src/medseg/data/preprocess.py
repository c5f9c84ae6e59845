"""Deterministic preprocessing: non-finite voxels, orientation, crop to the non-zero region,
resampling, intensity.

Intensity normalization is one :class:`IntensityNormalization` used in two ways: as a TorchIO
transform on whole volumes (NIfTI/DICOM cases, prepared once into the cache) and point by
point on patches read from a Zarr dataset, with statistics gathered block by block so a
volume larger than memory is never loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchio as tio

from medseg.data.geometry import ResampleLimit, thin_axes, thin_axes_error, thin_axis_padding
from medseg.data.nonfinite import NonFinitePolicy, nonfinite_counts
from medseg.data.subjects import MERGE_PREFIX
from medseg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

INTENSITY_MODES = ("ct_window", "zscore", "zscore_nonzero", "none")
# Subject key under which CropToNonzero records its box: [x0, y0, z0, x1, y1, z1] voxels.
NONZERO_BOX = "nonzero_box"


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


@dataclass(frozen=True)
class IntensityNormalization:
    """Intensity normalization by mode.

    ``ct_window``: clip to a HU ``window`` and rescale it to [-1, 1]; ``zscore``: per-channel
    z-score; ``zscore_nonzero``: z-score over non-zero voxels, zeros stay zero (skull-stripped
    MRI, as nnU-Net does); ``none``.
    """

    mode: str = "zscore"
    window: tuple[float, float] | None = None

    @classmethod
    def from_config(cls, mode: str = "zscore", window: Sequence[float] | None = None):
        if mode not in INTENSITY_MODES:
            raise ConfigError(
                f"data.preprocess.intensity.mode must be one of {list(INTENSITY_MODES)}, "
                f"got {mode!r}"
            )
        if mode != "ct_window":
            if window is not None:
                raise ConfigError("data.preprocess.intensity.window is only used by mode ct_window")
            return cls(mode)
        if not isinstance(window, Sequence) or len(window) != 2 or window[0] >= window[1]:
            raise ConfigError(
                f"data.preprocess.intensity.window must be [low, high] in HU, got {window!r}"
            )
        return cls(mode, (float(window[0]), float(window[1])))

    @property
    def needs_statistics(self) -> bool:
        return self.mode in ("zscore", "zscore_nonzero")

    def statistics(self, blocks: Iterable[np.ndarray], source: str) -> np.ndarray | None:
        """Per-channel [mean, std] ([C, 2] float64) over blocks of [C, ...] voxels.

        Sums are accumulated in float64 so blocks can come one at a time from a large array.
        """
        if not self.needs_statistics:
            return None
        count = total = squares = None
        for block in blocks:
            values = np.asarray(block, dtype=np.float64).reshape(block.shape[0], -1)
            mask = values != 0 if self.mode == "zscore_nonzero" else np.ones_like(values, bool)
            values = np.where(mask, values, 0)
            parts = mask.sum(1), values.sum(1), (values**2).sum(1)
            if count is None:
                count, total, squares = parts
            else:
                count, total, squares = count + parts[0], total + parts[1], squares + parts[2]
        if count is None:
            raise DataError(f"{source}: the image is empty")
        count = np.maximum(count, 1)
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean**2, 0))
        if np.any(std <= 1e-8 * np.maximum(np.abs(mean), 1)):
            raise DataError(f"{source}: an image channel is constant, it cannot be z-scored")
        return np.stack([mean, std], axis=1)

    def apply(self, data: np.ndarray, stats: np.ndarray | None) -> np.ndarray:
        """Normalize [C, ...] voxels (float32 out); ``stats`` from :meth:`statistics`."""
        data = np.asarray(data, dtype=np.float32)
        if self.mode == "none":
            return data
        if self.mode == "ct_window":
            low, high = self.window
            scaled = (data - np.float32(low)) * np.float32(2 / (high - low)) - 1
            return np.clip(scaled, -1, 1, out=scaled)
        shape = (-1,) + (1,) * (data.ndim - 1)
        mean = stats[:, 0].astype(np.float32).reshape(shape)
        std = stats[:, 1].astype(np.float32).reshape(shape)
        normalized = (data - mean) / std
        return np.where(data != 0, normalized, 0) if self.mode == "zscore_nonzero" else normalized


def image_source(image: tio.Image) -> str:
    """The file(s) an image was read from, for messages."""
    if image.path is None:
        return "image"
    paths = image.path if isinstance(image.path, list | tuple) else [image.path]
    return ", ".join(str(p) for p in paths)


class ScreenNonFinite(tio.IntensityTransform):
    """Apply a :class:`NonFinitePolicy` to every intensity image: refuse non-finite voxels,
    naming the channel's file, or replace them."""

    def __init__(self, policy: NonFinitePolicy, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy
        self.args_names = ["policy"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            data = image.data.numpy()
            files = image.path if isinstance(image.path, list | tuple) else [image.path]
            if len(files) == len(data) > 1:  # one file per channel: name the one at fault
                for channel, path in zip(data, files, strict=True):
                    self.policy.check(nonfinite_counts(channel), str(path))
            else:
                self.policy.check(nonfinite_counts(data), image_source(image))
            replaced = self.policy.replace(data)
            if replaced is not data:
                image.set_data(torch.from_numpy(replaced))
        return subject


class Normalize(tio.IntensityTransform):
    """:class:`IntensityNormalization` of whole images, with statistics per image."""

    def __init__(self, normalization: IntensityNormalization, **kwargs):
        super().__init__(**kwargs)
        self.normalization = normalization
        self.args_names = ["normalization"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            data = image.data.numpy()
            stats = self.normalization.statistics([data], image_source(image))
            image.set_data(torch.from_numpy(self.normalization.apply(data, stats)))
        return subject


class CropToNonzero(tio.SpatialTransform):
    """Crop every image to the bounding box of the non-zero voxels of the intensity images.

    The box is recorded in the subject under ``NONZERO_BOX``. TorchIO's CropOrPad crops to
    a mask's box only when the mask is an image of the subject; this computes it directly.
    """

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        images = self.get_images(subject)
        nonzero = torch.zeros(subject.spatial_shape, dtype=torch.bool)
        for image in images:
            if image.type == tio.INTENSITY:
                nonzero |= (image.data != 0).any(0)
        if not nonzero.any():
            path = next((im.path for im in images if im.type == tio.INTENSITY), None)
            raise DataError(f"{path}: every voxel of the image is zero")
        low, high = [], []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            indices = torch.nonzero(nonzero.any(dim=other))[:, 0]
            low.append(int(indices[0]))
            high.append(int(indices[-1]) + 1)
        shape = subject.spatial_shape
        cropping = [v for a in range(3) for v in (low[a], shape[a] - high[a])]
        cropped = tio.Crop(cropping)(subject) if any(cropping) else subject
        cropped[NONZERO_BOX] = low + high
        return cropped


class GuardedResample(tio.SpatialTransform):
    """TorchIO's antialiased Resample to a spacing, after the checks it lacks.

    A resampling that would grow the volume more than ``limit`` allows is refused before it
    starts. An axis thinner than ITK's smoothing needs is padded by repeating its edge voxels
    (``pad_thin_axes``: prediction, whose output is resampled back onto the input's own grid)
    or refused with a DataError (training: padding would invent slices of label).
    """

    def __init__(
        self, spacing: tuple[float, float, float], limit: ResampleLimit, pad_thin_axes: bool
    ):
        super().__init__()
        self.spacing = spacing
        self.limit = limit
        self.pad_thin_axes = pad_thin_axes
        self.args_names = ["spacing", "limit", "pad_thin_axes"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image = subject["image"]
        source, shape = image_source(image), image.spatial_shape
        self.limit.check(source, shape, image.spacing, self.spacing)
        if thin_axes(shape):
            if not self.pad_thin_axes:
                raise thin_axes_error(source, shape)
            padding = thin_axis_padding(shape)
            log.warning(
                "%s: %s voxels, padded by repeating edge voxels to resample it (%s)",
                source,
                "x".join(map(str, shape)),
                padding,
            )
            subject = tio.Pad(padding, padding_mode="edge", copy=False)(subject)
        return tio.Resample(self.spacing, antialias=True, copy=False)(subject)


def build_preprocessing(
    canonical: bool = True,
    crop_nonzero: bool = False,
    spacing: Sequence[float] | None = None,
    intensity: Mapping | None = None,
    nonfinite: str = "error",
    nonfinite_value: float | None = None,
    *,
    nonfinite_key: str = "data.preprocess",
    resample_limit: ResampleLimit | None = None,
    pad_thin_axes: bool = False,
) -> tio.Compose:
    """The deterministic part of the data pipeline, applied once per case.

    Args:
        canonical: reorient to RAS+ so axes mean the same thing for every case.
        crop_nonzero: crop to the box of non-zero image voxels (skull-stripped MRI, padded
            scans; a no-op for CT, whose air is -1000 HU).
        spacing: target voxel spacing in mm (x, y, z); None keeps each case's own.
        intensity: keyword arguments of :meth:`IntensityNormalization.from_config`.
        nonfinite, nonfinite_value: the :class:`NonFinitePolicy` for NaN/Inf image voxels,
            applied before anything else (resampling would smear them); ``nonfinite_key``
            is where users set it (named in errors).
        resample_limit, pad_thin_axes: see :class:`GuardedResample` (not settings of the
            prepared data: they decide only whether a case is refused); None: the default
            limit of ``data.max_resample_growth``.
    """
    policy = NonFinitePolicy.from_config(nonfinite, nonfinite_value, nonfinite_key)
    transforms: list[tio.Transform] = [MergeLabelMasks(), ScreenNonFinite(policy)]
    if canonical:
        transforms.append(tio.ToCanonical())
    if crop_nonzero:
        transforms.append(CropToNonzero())
    target = check_spacing(spacing)
    if target is not None:
        limit = resample_limit or ResampleLimit()
        transforms.append(GuardedResample(target, limit, pad_thin_axes))
    normalization = IntensityNormalization.from_config(**dict(intensity or {"mode": "none"}))
    if normalization.mode != "none":
        transforms.append(Normalize(normalization))
    return tio.Compose(transforms)


def check_spacing(spacing: Sequence[float] | None) -> tuple[float, float, float] | None:
    if spacing is None:
        return None
    if len(spacing) != 3 or any(float(s) <= 0 for s in spacing):
        raise ConfigError(
            f"data.preprocess.spacing must be 3 positive numbers (mm), got {spacing!r}"
        )
    return tuple(float(s) for s in spacing)


PREPROCESS_DEFAULTS = {
    "canonical": True,
    "crop_nonzero": False,
    "spacing": None,
    "intensity": {"mode": "none"},
    "nonfinite": "error",
    "nonfinite_value": None,
}


def preprocess_settings(preprocess: Mapping | None) -> dict:
    """``data.preprocess`` with defaults filled in, checked, as plain JSON-able values (it
    keys the cache, so equal settings must give equal dicts)."""
    preprocess = dict(preprocess or {})
    unknown = sorted(set(preprocess) - set(PREPROCESS_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"data.preprocess has unknown keys {unknown} (known: {sorted(PREPROCESS_DEFAULTS)})"
        )
    settings = {**PREPROCESS_DEFAULTS, **preprocess}
    spacing = check_spacing(settings["spacing"])
    normalization = IntensityNormalization.from_config(**dict(settings["intensity"]))
    intensity: dict = {"mode": normalization.mode}
    if normalization.window is not None:
        intensity["window"] = list(normalization.window)
    nonfinite = NonFinitePolicy.from_config(settings["nonfinite"], settings["nonfinite_value"])
    return {
        "canonical": bool(settings["canonical"]),
        "crop_nonzero": bool(settings["crop_nonzero"]),
        "spacing": None if spacing is None else list(spacing),
        "intensity": intensity,
        "nonfinite": nonfinite.mode,
        "nonfinite_value": nonfinite.value,
    }
