"""Patch pre-selection by minimum labelled fraction (sampler ``labelled``).

Candidate patches lie on a grid with a step of half the patch size. The label is read once,
slab by slab, and reduced to foreground counts per grid block; a patch covers 2 blocks per
axis (1 along an axis of patch size 1, or along an axis shorter than the patch), so its
labelled fraction is a sum of block counts. For even patch sizes this is exact; for odd
sizes the last voxel plane of the patch is left out of the count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.data.scan import slabs


def _axis_grid(size: int, patch: int) -> tuple[int, int, int]:
    """(block step, blocks per patch, corner of the only patch if the axis is short)."""
    if size <= patch:
        return size, 1, -((patch - size) // 2)
    if patch == 1:
        return 1, 1, 0
    return patch // 2, 2, 0


def labelled_corners(label, patch_size: Sequence[int], min_fraction: float) -> np.ndarray:
    """[N, 3] int32 corners of grid patches whose labelled (label > 0) fraction is at least
    ``min_fraction``; ``label`` is [x, y, z] (numpy or Zarr)."""
    shape = tuple(int(n) for n in label.shape)
    grids = [_axis_grid(n, p) for n, p in zip(shape, patch_size, strict=True)]
    steps = [g[0] for g in grids]
    blocks = [n // s for n, s in zip(shape, steps, strict=True)]
    counts = np.zeros(blocks, dtype=np.int64)
    for start, rows in slabs(label):
        slab = np.asarray(label[rows]) > 0
        for x in range(rows.start, rows.stop):
            block = x // steps[0]
            if block >= blocks[0]:
                break
            plane = slab[x - start, : blocks[1] * steps[1], : blocks[2] * steps[2]]
            plane = plane.reshape(blocks[1], steps[1], blocks[2], steps[2]).sum((1, 3))
            counts[block] += plane
    windows = counts
    for axis, (_, width, _) in enumerate(grids):
        if width == 2:
            windows = np.take(windows, range(windows.shape[axis] - 1), axis) + np.take(
                windows, range(1, windows.shape[axis]), axis
            )
    # Voxels a patch counts: the patch itself along a short axis (the rest is padding).
    volume = np.prod(
        [p if n <= p else g[0] * g[1] for n, p, g in zip(shape, patch_size, grids, strict=True)]
    )
    selected = np.argwhere(windows >= min_fraction * volume)
    corners = selected * np.asarray(steps)
    for axis, (_, _, fixed) in enumerate(grids):
        if fixed:
            corners[:, axis] = fixed
    return corners.astype(np.int32)
