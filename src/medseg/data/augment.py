"""Random augmentation presets, applied to training patches (never to whole volumes).

A preset has two parts:

- a spatial part (rotation and scaling), applied while the patch is read: the sampled
  transform maps the patch grid into the volume, only the box of voxels it touches is read,
  and the patch is interpolated from that box. Written with ``torch.nn.functional.grid_sample``
  rather than TorchIO's RandomAffine because RandomAffine resamples onto its input grid: to
  get a rotated or zoomed-out patch without empty corners it would need a region up to 1.8x
  larger per axis, and would resample all of it;
- TorchIO transforms (noise, blur, gamma, flips) applied to the patch.

In 2D mode (slices along ``slice_axis``) rotations turn about the slice axis only, scaling,
blurring and flipping stay in the slice plane.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from scipy.spatial.transform import Rotation

from medseg.errors import ConfigError


@dataclass(frozen=True)
class SpatialAugmentation:
    """Rotation by up to ``degrees`` about each of ``rotation_axes`` and scaling by a factor
    in ``scales`` along each of ``scaled_axes`` (a factor above 1 zooms in), with
    probability ``probability``; as TorchIO's RandomAffine samples them (non-isotropic)."""

    probability: float
    scales: tuple[float, float]
    degrees: float
    rotation_axes: tuple[int, ...]
    scaled_axes: tuple[int, ...]

    def sample(self, rng: np.random.Generator, spacing: Sequence[float]) -> np.ndarray | None:
        """A 3x3 matrix mapping patch voxel offsets to volume voxel offsets, or None when
        the augmentation is not applied this time."""
        if rng.random() >= self.probability:
            return None
        angles = np.zeros(3)
        angles[list(self.rotation_axes)] = rng.uniform(
            -self.degrees, self.degrees, len(self.rotation_axes)
        )
        zoom = np.ones(3)
        zoom[list(self.scaled_axes)] = rng.uniform(*self.scales, len(self.scaled_axes))
        rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
        physical = rotation @ np.diag(1 / zoom)
        spacing = np.asarray(spacing, dtype=np.float64)
        return np.diag(1 / spacing) @ physical @ np.diag(spacing)


def input_box(
    centre: np.ndarray, matrix: np.ndarray, patch_size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """[low, high) voxel box of the volume that a patch centred at ``centre`` (continuous
    voxel coordinates) reads through ``matrix``, one voxel wider for interpolation."""
    half = (np.asarray(patch_size, dtype=np.float64) - 1) / 2
    reach = np.abs(matrix) @ half  # the farthest patch corner along each volume axis
    low = np.floor(centre - reach).astype(int)
    high = np.ceil(centre + reach).astype(int) + 1
    return low, high


def warp_patch(
    image: torch.Tensor,
    label: torch.Tensor | None,
    centre_in_box: np.ndarray,
    matrix: np.ndarray,
    patch_size: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Interpolate a patch from a box: image [C, *box] trilinear, label [L, *box] nearest.

    Patch voxel ``u`` (offset from the patch centre) reads box voxel
    ``centre_in_box + matrix @ u``. Axes where patch and box are one voxel thick (a 2D
    slice) are left out, so a slice is warped in its plane.
    """
    axes = [a for a in range(3) if not (patch_size[a] == 1 and image.shape[1 + a] == 1)]
    box = np.asarray(image.shape[1:], dtype=np.float64)[axes]
    half_patch = (np.asarray(patch_size, dtype=np.float64)[axes] - 1) / 2
    to_box = 2 / np.maximum(box - 1, 1)
    # The same map in grid_sample's normalized coordinates (align_corners: -1 and 1 are the
    # first and last voxel centres), axes reversed as affine_grid orders them (last first).
    linear = to_box[:, None] * matrix[np.ix_(axes, axes)] * half_patch[None, :]
    shift = to_box * np.asarray(centre_in_box, dtype=np.float64)[axes] - 1
    theta = np.concatenate([linear[::-1, ::-1], shift[::-1, None]], axis=1)
    size = [1, 1, *(int(patch_size[a]) for a in axes)]
    grid = F.affine_grid(torch.from_numpy(theta.copy()).float()[None], size, align_corners=True)
    dropped = [1 + a for a in range(3) if a not in axes]

    def sample(volume: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
        flat = volume.float()
        for dim in reversed(dropped):
            flat = flat.squeeze(dim)
        out = F.grid_sample(flat[None], grid, mode=mode, padding_mode=padding, align_corners=True)
        out = out[0]
        for dim in dropped:
            out = out.unsqueeze(dim)
        return out

    warped = sample(image, "bilinear", "border")
    if label is None:
        return warped, None
    return warped, sample(label, "nearest", "zeros").to(label.dtype)


@dataclass(frozen=True)
class Augmentation:
    """A preset built for 3D patches or for slices along ``slice_axis``."""

    spatial: SpatialAugmentation | None
    transforms: tio.Compose | None


def _spatial(p, scales, degrees, slice_axis):
    if slice_axis is None:
        return SpatialAugmentation(p, scales, degrees, (0, 1, 2), (0, 1, 2))
    in_plane = tuple(a for a in range(3) if a != slice_axis)
    return SpatialAugmentation(p, scales, degrees, (slice_axis,), in_plane)


def _in_plane(values: tuple[float, float], slice_axis: int | None) -> tuple[float, ...]:
    """A TorchIO (a, b) range for all three axes, or zero along the slice axis."""
    if slice_axis is None:
        return values
    ranges = [values] * 3
    ranges[slice_axis] = (0.0, 0.0)
    return tuple(v for pair in ranges for v in pair)


def _flip_axes(slice_axis: int | None) -> tuple[int, ...]:
    return tuple(a for a in range(3) if a != slice_axis)


def _none(slice_axis: int | None) -> Augmentation:
    return Augmentation(None, None)


def _light(slice_axis: int | None) -> Augmentation:
    return Augmentation(
        _spatial(0.2, (0.9, 1.1), 10.0, slice_axis),
        tio.Compose(
            [
                tio.RandomGamma(log_gamma=(-0.2, 0.2), p=0.2, copy=False),
                tio.RandomNoise(std=(0, 0.05), p=0.1, copy=False),
            ],
            copy=False,
        ),
    )


def _default(slice_axis: int | None) -> Augmentation:
    """Close to nnU-Net's default: spatial, intensity and mirroring on every axis."""
    return Augmentation(
        _spatial(0.2, (0.7, 1.4), 15.0, slice_axis),
        tio.Compose(
            [
                tio.RandomNoise(std=(0, 0.1), p=0.1, copy=False),
                tio.RandomBlur(std=_in_plane((0.5, 1.0), slice_axis), p=0.2, copy=False),
                tio.RandomGamma(log_gamma=(-0.3, 0.3), p=0.3, copy=False),
                tio.RandomFlip(axes=_flip_axes(slice_axis), flip_probability=0.5, copy=False),
            ],
            copy=False,
        ),
    )


def _mirror(slice_axis: int | None) -> Augmentation:
    """Mirroring only: keeps volumes and counts (for case-level targets such as an organ's
    volume in mL, which scaling would change)."""
    flip = tio.RandomFlip(axes=_flip_axes(slice_axis), flip_probability=0.5, copy=False)
    return Augmentation(None, tio.Compose([flip], copy=False))


PRESETS: dict[str, Callable[[int | None], Augmentation]] = {
    "none": _none,
    "light": _light,
    "default": _default,
    "mirror": _mirror,
}


def build_augmentation(preset: str, slice_axis: int | None = None) -> Augmentation:
    """The named preset, for 3D patches or for 2D slices along ``slice_axis``.

    The patch transforms do not copy their input (``copy=False``): every patch is a fresh
    subject, and TorchIO's default deep copy per transform costs more than the transform.
    """
    if preset not in PRESETS:
        raise ConfigError(f"data.augmentation must be one of {sorted(PRESETS)}, got {preset!r}")
    return PRESETS[preset](slice_axis)
