"""A preprocessed case ready for patch reads: arrays (in memory or Zarr) plus its label index.

Training reads boxes of voxels from here, never whole volumes; validation reads whole volumes.
The arrays may be numpy (preprocessed in memory), the Zarr cache written by
:mod:`medseg.data.cache`, or a user's Zarr dataset read in place (then intensities are
normalized box by box with statistics computed once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torchio as tio

from medseg.data.nonfinite import NonFinitePolicy
from medseg.data.preprocess import IntensityNormalization
from medseg.data.scan import LabelIndex


@dataclass
class PreparedCase:
    """One case on its training grid.

    Attributes:
        case_id: the case's id.
        image: [C, x, y, z] array (numpy or Zarr).
        label: [x, y, z] integer array, or None for unlabelled cases.
        affine: 4x4 voxel -> world (RAS, mm) of the training grid.
        index: label counts, sampled locations and foreground slices.
        normalization: applied to every read box (Zarr datasets read in place); None when
            the arrays hold normalized intensities already.
        statistics: the per-channel statistics ``normalization`` needs.
        nonfinite: replaces non-finite voxels of every read box before it is normalized
            (Zarr datasets read in place with ``data.preprocess.nonfinite=replace``).
        preselected: [N, 3] corners of patches with enough labelled voxels (sampler
            ``labelled``), or None.
        priors: stage -> [x, y, z] mask of an earlier cascade stage's predictions (training
            with ``stage.training_masks.source=predictions``).
        values: plain subject fields carried by every patch and volume of the case (the
            case-level targets of tasks, ``target_<task>``).
    """

    case_id: str
    image: Any
    label: Any | None
    affine: np.ndarray
    index: LabelIndex | None = None
    normalization: IntensityNormalization | None = None
    statistics: np.ndarray | None = None
    nonfinite: NonFinitePolicy | None = None
    preselected: np.ndarray | None = None
    priors: dict[str, Any] = field(default_factory=dict)
    values: dict[str, int | float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.image.shape[1:])

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    def _box(self, corner: Sequence[int], size: Sequence[int]) -> tuple[tuple, list]:
        """The part of the box at ``corner`` inside the volume (slices) and the padding
        [(before, after)] per axis that completes it."""
        corner = np.asarray(corner, dtype=np.int64)
        end = corner + np.asarray(size, dtype=np.int64)
        shape = np.asarray(self.shape)
        low, high = np.clip(corner, 0, shape), np.clip(end, 0, shape)
        if np.any(high <= low):
            raise ValueError(f"box {corner.tolist()}+{list(size)} is outside {self.case_id}")
        inside = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
        padding = list(zip((low - corner).tolist(), (end - high).tolist(), strict=True))
        return inside, padding

    def read(
        self, corner: Sequence[int], size: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Image [C, *size] float32 and label [1, *size] of the box at ``corner``.

        Parts of the box outside the volume repeat the nearest image voxel (as sliding-window
        inference pads) and have label 0. The box must overlap the volume.
        """
        inside, padding = self._box(corner, size)
        # Copies, never views: augmentation must not write into in-memory volumes.
        image = self.image[(slice(None), *inside)]
        if self.nonfinite is not None:
            image = self.nonfinite.replace(np.asarray(image))
        if self.normalization is not None:
            image = self.normalization.apply(image, self.statistics)
        else:
            image = np.array(image, dtype=np.float32)
        if any(a or b for a, b in padding):
            image = np.pad(image, [(0, 0), *padding], mode="edge")
        label = None if self.label is None else _read_mask(self.label, inside, padding)
        return image, label

    def read_priors(self, corner: Sequence[int], size: Sequence[int]) -> dict[str, np.ndarray]:
        """Stage -> [1, *size] prior mask of the box at ``corner`` (0 outside the volume)."""
        inside, padding = self._box(corner, size)
        return {stage: _read_mask(mask, inside, padding) for stage, mask in self.priors.items()}

    def read_volume(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self.read((0, 0, 0), self.shape)

    def subject(self) -> tio.Subject:
        """The whole case as a TorchIO subject (validation, test)."""
        image, label = self.read_volume()
        fields: dict = {
            "image": tio.ScalarImage(tensor=torch.from_numpy(image), affine=self.affine),
            "case_id": self.case_id,
        }
        if label is not None:
            fields["label"] = tio.LabelMap(tensor=torch.from_numpy(label), affine=self.affine)
        return tio.Subject(**fields, **self.values)


def _read_mask(array: Any, inside: tuple, padding: list) -> np.ndarray:
    mask = np.array(array[inside])[None]
    if any(a or b for a, b in padding):
        mask = np.pad(mask, [(0, 0), *padding])
    return mask


class ChannelAxis:
    """A [x, y, z] array seen as [1, x, y, z] (Zarr datasets may store one-channel images
    without a channel axis); reads stay lazy."""

    def __init__(self, array: Any):
        self.array = array

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, *self.array.shape)

    @property
    def chunks(self) -> tuple[int, ...] | None:
        chunks = getattr(self.array, "chunks", None)
        return None if chunks is None else (1, *chunks)

    def __getitem__(self, key: tuple) -> np.ndarray:
        channels, *spatial = key
        return np.asarray(self.array[tuple(spatial)])[None][channels]
