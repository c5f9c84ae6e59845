"""Checks of a volume's voxel grid: header spacings that look wrong, and resamplings that cannot
run (an axis thinner than ITK's smoothing needs) or would blow a volume up.

A wrong spacing in a header is silent everywhere else: a z spacing of 1000 mm resampled to
1.5 mm turns 4 slices into 2,666, minutes of work and gigabytes of memory for a result that
means nothing. Spacings are checked where a case is first read (validation, prediction) and
every resampling is checked before it starts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medseg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Voxel sizes outside this range (mm) are not those of a medical scan.
PLAUSIBLE_SPACING_MM = (0.01, 50.0)
# A header without spacing reads as 1 mm on every axis; a scan at 1 mm spans more voxels.
UNIT_SPACING_MIN_VOXELS = 64
# data.max_resample_growth and prediction.max_resample_growth by default.
DEFAULT_MAX_RESAMPLE_GROWTH = 64.0
# TorchIO's antialiased Resample smooths with ITK's recursive Gaussian, which needs four
# voxels along every axis ("requires a minimum of four pixels").
MIN_RESAMPLE_VOXELS = 4


def check_affine(affine: np.ndarray, source: str) -> np.ndarray:
    """The voxel -> world affine of `source`, refused when it cannot place voxels in space.

    A NaN in the header, or two voxel axes pointing the same way (a singular matrix), gives
    no world grid: resampling onto it fails deep inside a library, or predicts nonsense.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DataError(f"{source}: the voxel-to-world affine holds NaN or Inf: check the header")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(
            f"{source}: the voxel-to-world affine is singular (voxel axes that do not span "
            "3D space, or a zero spacing): check the header"
        )
    return affine


def voxel_spacing(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size (mm) along each axis of a voxel -> world affine."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def implausible_spacing(spacing: Sequence[float], shape: Sequence[int]) -> str | None:
    """Why a volume's spacing looks wrong (to warn about), or None."""
    low, high = PLAUSIBLE_SPACING_MM
    outside = [f"{s:g}" for s in spacing if not low <= s <= high]
    if outside:
        return (
            f"implausible voxel spacing {_mm(spacing)} mm ({', '.join(outside)} outside "
            f"{low:g}-{high:g} mm): check the file's header"
        )
    if all(s == 1 for s in spacing) and max(shape) < UNIT_SPACING_MIN_VOXELS:
        return (
            f"voxel spacing is exactly 1 mm on every axis for a {_shape(shape)} volume: the "
            "header may hold no spacing (1 mm is the default); check it"
        )
    return None


def warn_implausible_spacing(source: str, affine: np.ndarray, shape: Sequence[int]) -> None:
    reason = implausible_spacing(voxel_spacing(affine), shape)
    if reason:
        log.warning("%s: %s", source, reason)


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[int, ...]:
    """The shape TorchIO's Resample gives: the extent over the target spacing, rounded down;
    a one-voxel axis stays one voxel."""
    axes = zip(shape, spacing, target, strict=True)
    return tuple(n if n == 1 else math.floor(n * s / t) for n, s, t in axes)


@dataclass(frozen=True)
class ResampleLimit:
    """The largest growth in voxels a resampling may cause; ``key`` raises it."""

    max_growth: float = DEFAULT_MAX_RESAMPLE_GROWTH
    key: str = "data.max_resample_growth"

    @classmethod
    def from_config(cls, max_growth: float, key: str) -> ResampleLimit:
        number = isinstance(max_growth, int | float) and not isinstance(max_growth, bool)
        if not number or not 1 <= max_growth < math.inf:
            raise ConfigError(
                f"{key} must be a number >= 1 (a factor in voxels), got {max_growth!r}"
            )
        return cls(float(max_growth), key)

    def check(
        self, source: str, shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
    ) -> None:
        """Refuse, before it starts, a resampling that leaves an axis without voxels or grows
        the volume more than the limit."""
        new = resampled_shape(shape, spacing, target)
        what = (
            f"resampling {_shape(shape)} voxels of {_mm(spacing)} mm to {_mm(target)} mm "
            f"gives {_shape(new)} voxels"
        )
        if min(new) < 1:
            raise DataError(f"{source}: {what}, an empty volume: check the file's spacing")
        growth = math.prod(new) / math.prod(shape)
        if growth > self.max_growth:
            raise DataError(
                f"{source}: {what}, {growth:.0f}x as many, more than {self.key}="
                f"{self.max_growth:g}: check the file's spacing, or raise {self.key}"
            )


def thin_axes(shape: Sequence[int]) -> list[int]:
    """Axes with fewer voxels than resampling needs."""
    return [axis for axis, n in enumerate(shape) if n < MIN_RESAMPLE_VOXELS]


def thin_axis_padding(shape: Sequence[int]) -> tuple[int, ...]:
    """TorchIO ``Pad`` widths (x before, x after, y before, ...) that bring every thin axis to
    MIN_RESAMPLE_VOXELS voxels, split evenly so the volume keeps its centre."""
    padding = []
    for n in shape:
        missing = max(MIN_RESAMPLE_VOXELS - n, 0)
        padding += [missing // 2, missing - missing // 2]
    return tuple(padding)


def thin_axes_error(source: str, shape: Sequence[int]) -> DataError:
    axes = ", ".join(f"{shape[a]} along axis {a}" for a in thin_axes(shape))
    return DataError(
        f"{source}: {_shape(shape)} voxels ({axes}): resampling to data.preprocess.spacing "
        f"needs at least {MIN_RESAMPLE_VOXELS} voxels along every axis; leave the case out, or "
        "keep each case's spacing (data.preprocess.spacing=null)"
    )


def _mm(values: Sequence[float]) -> str:
    return "x".join(f"{v:g}" for v in values)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(n)) for n in shape)
