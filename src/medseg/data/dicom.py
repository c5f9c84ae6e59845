"""DICOM series: read a folder's series, refusing (or, when asked, resampling) slices that
are not evenly spaced along the slice normal.

SimpleITK's ``ImageSeriesReader`` puts the slices of a series on a uniform grid whatever
their positions: with a slice missing, every slice past the gap lands up to a slice
spacing away from where it was scanned, and the only sign is a warning on stderr. So the
positions are checked here first, from each file's ImagePositionPatient (0020|0032)
projected on the normal of its ImageOrientationPatient (0020|0037).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the conventional name)

from medseg.errors import ConfigError, DataError

# What the `dicom.nonuniform_slices` keys may say.
NONUNIFORM_SLICE_MODES = ("error", "resample")
# Slice gaps within this fraction of the median gap are even (DICOM positions are rounded).
GAP_TOLERANCE = 0.01
POSITION_TAG, ORIENTATION_TAG = "0020|0032", "0020|0037"


def check_nonuniform_slices(key: str, mode: str) -> str:
    if mode not in NONUNIFORM_SLICE_MODES:
        raise ConfigError(f"{key} must be one of {list(NONUNIFORM_SLICE_MODES)}, got {mode!r}")
    return mode


def holds_dicom_series(path: Path) -> bool:
    return path.is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


@dataclass(frozen=True)
class SliceStack:
    """The files of a series in order along the slice normal, with their positions (mm)."""

    files: list[str]
    positions: np.ndarray | None  # None when the files carry no position tags
    normal: np.ndarray | None


def read_series(folder: Path, nonuniform_slices: str = "error", key: str = "") -> sitk.Image:
    """The first series of `folder` as one image.

    Args:
        nonuniform_slices: ``error``: uneven slice positions raise a DataError; ``resample``:
            the slices are placed at their true positions and interpolated linearly along
            the slice normal onto a uniform grid at the median slice spacing.
        key: the config key of `nonuniform_slices`, named in the error.
    """
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    if not names:
        raise DataError(f"{folder}: cannot be read as a DICOM series (no DICOM files found)")
    stack = _slice_stack(list(names))
    gaps = None if stack.positions is None else np.diff(stack.positions)
    uneven = gaps is not None and len(gaps) > 1 and _uneven(gaps)
    if uneven and (nonuniform_slices != "resample" or np.median(gaps) <= 0):
        raise DataError(
            f"{folder}: {_describe_gaps(stack, gaps)}: set {key}=resample to read "
            "the slices at their true positions, resampled onto an even grid"
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(stack.files)
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(not uneven)  # the gaps are handled below
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise DataError(f"{folder}: cannot be read as a DICOM series ({error})") from error
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    return _resampled(image, stack) if uneven else image


def _slice_stack(files: list[str]) -> SliceStack:
    positions, normal = [], None
    reader = sitk.ImageFileReader()
    for file in files:
        reader.SetFileName(file)
        reader.ReadImageInformation()
        if not (reader.HasMetaDataKey(POSITION_TAG) and reader.HasMetaDataKey(ORIENTATION_TAG)):
            return SliceStack(files, None, None)
        if normal is None:
            cosines = _numbers(reader.GetMetaData(ORIENTATION_TAG))
            normal = np.cross(cosines[:3], cosines[3:])
        positions.append(float(_numbers(reader.GetMetaData(POSITION_TAG)) @ normal))
    order = np.argsort(positions, kind="stable")
    return SliceStack([files[i] for i in order], np.asarray(positions)[order], normal)


def _numbers(text: str) -> np.ndarray:
    return np.array([float(v) for v in text.strip().split("\\")])


def _uneven(gaps: np.ndarray) -> bool:
    expected = float(np.median(gaps))
    return expected <= 0 or bool(np.any(np.abs(gaps - expected) > GAP_TOLERANCE * expected))


def _describe_gaps(stack: SliceStack, gaps: np.ndarray) -> str:
    expected = float(np.median(gaps))
    if expected <= 0:
        return "slice positions are not evenly spaced: most slices share their position"
    bad = np.flatnonzero(np.abs(gaps - expected) > GAP_TOLERANCE * expected)
    first = int(bad[0])
    gap = float(gaps[first])
    if gap < GAP_TOLERANCE * expected:
        cause = "two slices at one position"
    elif gap > 1.5 * expected:
        cause = "a missing slice?"
    else:
        cause = "uneven spacing"
    names = f"{Path(stack.files[first]).name}, {Path(stack.files[first + 1]).name}"
    more = f"; {len(bad) - 1} more uneven gap(s)" if len(bad) > 1 else ""
    return (
        f"slice positions are not evenly spaced: {expected:.4g} mm expected, {gap:.4g} mm "
        f"between slices {first + 1} and {first + 2} ({names}; {cause}){more}"
    )


def _resampled(image: sitk.Image, stack: SliceStack) -> sitk.Image:
    """The slices at their true positions, linearly interpolated along the normal onto an
    even grid from the first to the last slice at the median spacing."""
    positions = stack.positions
    spacing = float(np.median(np.diff(positions)))
    count = round(float(positions[-1] - positions[0]) / spacing) + 1
    targets = positions[0] + spacing * np.arange(count)
    below = np.clip(np.searchsorted(positions, targets, side="right") - 1, 0, len(positions) - 2)
    gaps = positions[below + 1] - positions[below]
    weight = (targets - positions[below]) / np.where(gaps > 0, gaps, 1)  # 0: duplicate slices
    weight = np.clip(weight, 0, 1).astype(np.float32)
    slices = sitk.GetArrayFromImage(image).astype(np.float32)  # [z, y, x(, c)]
    shape = (-1,) + (1,) * (slices.ndim - 1)
    data = slices[below] * (1 - weight.reshape(shape)) + slices[below + 1] * weight.reshape(shape)
    resampled = sitk.GetImageFromArray(data, isVector=image.GetNumberOfComponentsPerPixel() > 1)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    direction[:, 2] = stack.normal / np.linalg.norm(stack.normal)
    resampled.SetDirection(direction.ravel().tolist())
    reader = sitk.ImageFileReader()
    reader.SetFileName(stack.files[0])
    reader.ReadImageInformation()
    resampled.SetOrigin(_numbers(reader.GetMetaData(POSITION_TAG)).tolist())
    resampled.SetSpacing((*image.GetSpacing()[:2], spacing))
    return resampled
