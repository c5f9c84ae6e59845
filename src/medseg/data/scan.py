"""One pass over a case's arrays that records what patch sampling and the fingerprint need.

Arrays are read in slabs along the first spatial axis, so a Zarr volume larger than memory is
scanned without loading it. Per label value the scan keeps a uniform random subset of voxel
locations (as nnU-Net's preprocessing does), from which patch centres are later drawn without
touching the label map again.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from medseg.errors import DataError

# Voxel locations kept per label value; nnU-Net keeps 10,000 as well.
LOCATIONS_PER_CLASS = 10_000
# Foreground intensities kept per case for the dataset fingerprint.
INTENSITIES_PER_CASE = 2_000
_SLAB_VOXELS = 16_000_000


@dataclass
class LabelIndex:
    """Per label value: voxel count and up to LOCATIONS_PER_CLASS random (x, y, z) locations;
    per spatial axis: which slices hold foreground (any label other than 0)."""

    counts: dict[int, int]
    locations: dict[int, np.ndarray]  # value -> [N, 3] int32
    foreground_slices: tuple[np.ndarray, np.ndarray, np.ndarray]  # bool per index of each axis


def case_rng(case_id: str, purpose: str) -> np.random.Generator:
    """A generator that depends only on the case and the purpose: scans are reproducible."""
    return np.random.default_rng(zlib.crc32(f"{purpose}:{case_id}".encode()))


def slabs(array, spatial_offset: int = 0) -> Iterator[tuple[int, slice]]:
    """(start, slice) along the first spatial axis (axis ``spatial_offset``) of ``array``,
    aligned to its chunks when it is chunked (Zarr) so every chunk is decoded once."""
    shape = array.shape[spatial_offset:]
    chunks = getattr(array, "chunks", None)
    per_row = int(np.prod(shape[1:])) * (array.shape[0] if spatial_offset else 1)
    step = max(1, _SLAB_VOXELS // max(per_row, 1))
    if chunks is not None:
        chunk = chunks[spatial_offset]
        step = max(chunk, step // chunk * chunk)
    for start in range(0, shape[0], step):
        yield start, slice(start, min(start + step, shape[0]))


def scan_label(
    label, allowed: Mapping[int, str], rng: np.random.Generator, source: str
) -> LabelIndex:
    """Count label values, check them against ``allowed`` and keep random locations.

    Args:
        label: [x, y, z] integer array (numpy, or Zarr read slab by slab).
        allowed: the declared label map (value -> name).
        rng: source of the location subsets.
        source: names the array in errors.
    """
    shape = tuple(label.shape)
    counts: dict[int, int] = {}
    foreground = [np.zeros(n, dtype=bool) for n in shape]
    for _, rows in slabs(label):
        slab = np.asarray(label[rows])
        values, value_counts = _values(slab, source)
        for value, count in zip(values.tolist(), value_counts.tolist(), strict=True):
            counts[value] = counts.get(value, 0) + count
        nonzero = slab != 0
        foreground[0][rows] = nonzero.any((1, 2))
        foreground[1] |= nonzero.any((0, 2))
        foreground[2] |= nonzero.any((0, 1))
    unknown = sorted(set(counts) - set(allowed))
    if unknown:
        declared = ", ".join(f"{k}: {v}" for k, v in allowed.items())
        raise DataError(
            f"{source}: label values {unknown} are not in the declared label map {{{declared}}}"
        )
    rates = {v: min(1.0, LOCATIONS_PER_CLASS / n) for v, n in counts.items()}
    found: dict[int, list[np.ndarray]] = {v: [] for v in counts}
    for start, rows in slabs(label):
        slab = np.asarray(label[rows])
        draws = rng.random(slab.shape, dtype=np.float32)
        for value, rate in rates.items():
            where = np.argwhere((slab == value) & (draws < rate))
            where[:, 0] += start
            found[value].append(where.astype(np.int32))
    locations = {v: np.concatenate(parts) for v, parts in found.items()}
    return LabelIndex(dict(sorted(counts.items())), locations, tuple(foreground))


def _values(slab: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    if not np.issubdtype(slab.dtype, np.integer):
        if not np.all(np.equal(np.mod(slab, 1), 0)):
            raise DataError(f"{source}: label map has non-integer values")
        slab = slab.astype(np.int64)
    if slab.size and slab.min() < 0:
        values, counts = np.unique(slab, return_counts=True)
        return values, counts
    counts = np.bincount(slab.ravel())
    values = np.flatnonzero(counts)
    return values, counts[values]


def foreground_intensities(
    image, label, num_foreground: int, rng: np.random.Generator
) -> np.ndarray:
    """A uniform random sample [C, <= INTENSITIES_PER_CASE] of image values inside the label
    (label > 0); ``image`` is [C, x, y, z], ``label`` [x, y, z]."""
    channels = image.shape[0]
    if num_foreground == 0:
        return np.zeros((channels, 0), dtype=np.float32)
    rate = min(1.0, INTENSITIES_PER_CASE / num_foreground)
    parts = []
    for _, rows in slabs(label):
        mask = np.asarray(label[rows]) > 0
        mask &= rng.random(mask.shape, dtype=np.float32) < rate
        if mask.any():
            parts.append(np.asarray(image[:, rows])[:, mask].astype(np.float32))
    return np.concatenate(parts, axis=1) if parts else np.zeros((channels, 0), np.float32)
