"""How two voxel grids (spatial shape and RAS affine) line up: how they differ, and exact
reorientation between grids that place the same voxel centres in the world. (Checks of one
grid's spacing and resampling are in :mod:`medseg.data.geometry`.)

Every check that two files must share a grid (image channels, image and label, merged masks,
prediction and reference) says how they differ with :func:`grid_difference`, so a user reads
"a translation of 10.0 mm" or "a flip of axis 1 (the same world grid)" rather than "the
affines differ".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from nibabel import orientations
from nibabel.affines import voxel_sizes

# Below these, two grids are the same (the translation tolerance is relative to the voxel
# size, as in affines_match).
RELATIVE_TOLERANCE = 1e-3
ROTATION_TOLERANCE_DEGREES = 0.01


def affines_match(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a tolerance relative to the voxel size (as nnU-Net's checks do)."""
    scale = max(float(np.abs(a[:3, :3]).max()), 1e-6)
    return bool(np.allclose(a, b, atol=RELATIVE_TOLERANCE * scale, rtol=0))


@dataclass(frozen=True)
class GridDifference:
    """How a grid differs from a reference grid, measured after turning its voxel axes
    (flips, permutation) to run along the reference's.

    ``flipped_axes`` and ``permutation`` describe that turn (axes of the grid; the
    permutation names the reference axis each axis runs along). When nothing else differs,
    both grids hold the same voxel centres (``same_world_grid``) and the data can be moved
    onto the reference grid exactly (:func:`reorient_to_grid`).
    """

    flipped_axes: tuple[int, ...]
    permutation: tuple[int, ...] | None
    shapes: tuple[tuple[int, ...], tuple[int, ...]] | None  # (grid, reference) when they differ
    spacings: tuple[tuple[float, ...], tuple[float, ...]] | None
    rotation_degrees: float
    translation_mm: float
    max_affine_difference: float

    @property
    def same_world_grid(self) -> bool:
        return not (
            self.shapes or self.spacings or self.rotation_degrees or self.translation_mm
        ) and bool(self.flipped_axes or self.permutation)

    def __str__(self) -> str:
        parts = []
        if self.flipped_axes:
            axes = " and ".join(map(str, self.flipped_axes))
            parts.append(f"a flip of {'axes' if len(self.flipped_axes) > 1 else 'axis'} {axes}")
        if self.permutation:
            targets = ", ".join(map(str, self.permutation))
            parts.append(f"a permutation of axes (0, 1, 2 -> {targets})")
        if self.same_world_grid:
            return f"{' and '.join(parts)} (the same world grid)"
        if self.shapes:
            parts.append(f"shape {self.shapes[0]} vs {self.shapes[1]}")
        if self.spacings:
            parts.append(f"spacing {_numbers(self.spacings[0])} vs {_numbers(self.spacings[1])} mm")
        if self.rotation_degrees:
            parts.append(f"a rotation of {self.rotation_degrees:.2f} degrees")
        if self.translation_mm:
            parts.append(f"a translation of {_numbers([self.translation_mm])[1:-1]} mm")
        if not parts:  # e.g. a shear: no simpler description
            parts.append(f"affine entries differing by up to {self.max_affine_difference:.3g}")
        return ", ".join(parts)


def _numbers(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}" for v in values) + ")"


def grid_difference(
    shape: Sequence[int],
    affine: np.ndarray,
    reference_shape: Sequence[int],
    reference_affine: np.ndarray,
) -> GridDifference | None:
    """How the grid (`shape`, `affine`) differs from the reference grid; None when they are
    the same grid (shapes equal, affines equal within :func:`affines_match`)."""
    shape, reference_shape = tuple(shape[:3]), tuple(reference_shape[:3])
    affine, reference_affine = np.asarray(affine, float), np.asarray(reference_affine, float)
    if shape == reference_shape and affines_match(affine, reference_affine):
        return None
    transform = _orientation_transform(affine, reference_affine)
    turned_shape = tuple(int(shape[int(a)]) for a in np.argsort(transform[:, 0]))
    turned = affine @ orientations.inv_ornt_aff(transform, shape)
    spacing, reference_spacing = voxel_sizes(turned), voxel_sizes(reference_affine)
    scale = RELATIVE_TOLERANCE * float(max(reference_spacing.max(), 1e-6))
    rotation = _rotation_degrees(turned, reference_affine)
    translation = float(np.linalg.norm(turned[:3, 3] - reference_affine[:3, 3]))
    permutation = tuple(int(a) for a in transform[:, 0])
    return GridDifference(
        flipped_axes=tuple(int(a) for a in np.flatnonzero(transform[:, 1] < 0)),
        permutation=None if permutation == (0, 1, 2) else permutation,
        shapes=None if turned_shape == reference_shape else (shape, reference_shape),
        spacings=(
            None
            if np.allclose(spacing, reference_spacing, atol=scale, rtol=0)
            else (tuple(spacing.tolist()), tuple(reference_spacing.tolist()))
        ),
        rotation_degrees=rotation if rotation > ROTATION_TOLERANCE_DEGREES else 0.0,
        translation_mm=translation if translation > scale else 0.0,
        max_affine_difference=float(np.abs(turned - reference_affine).max()),
    )


def _orientation_transform(affine: np.ndarray, reference_affine: np.ndarray) -> np.ndarray:
    """nibabel's orientation transform turning the grid's axes onto the reference's (the
    identity when an affine is degenerate and has no orientation)."""
    try:
        return orientations.ornt_transform(
            orientations.io_orientation(affine), orientations.io_orientation(reference_affine)
        )
    except ValueError:
        return np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def _rotation_degrees(affine: np.ndarray, reference_affine: np.ndarray) -> float:
    """The angle of the rotation between the two grids' axis directions."""
    directions = affine[:3, :3] / np.maximum(voxel_sizes(affine), 1e-12)
    reference = reference_affine[:3, :3] / np.maximum(voxel_sizes(reference_affine), 1e-12)
    cosine = (np.trace(directions @ reference.T) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def reorient_to_grid(
    data: np.ndarray,
    affine: np.ndarray,
    reference_shape: Sequence[int],
    reference_affine: np.ndarray,
) -> np.ndarray | None:
    """`data` ([x, y, z, ...] on the grid of `affine`) on the reference grid, when both grids
    hold the same voxel centres and differ only by flipped or permuted axes: an exact move
    of voxels, no interpolation. None when the grids differ otherwise."""
    difference = grid_difference(data.shape, affine, reference_shape, reference_affine)
    if difference is None:
        return data
    if not difference.same_world_grid:
        return None
    transform = _orientation_transform(np.asarray(affine, float), reference_affine)
    return np.ascontiguousarray(orientations.apply_orientation(data, transform))
