"""Dataset fingerprint (spacings, shapes, foreground intensities) and the settings it suggests.

The rules follow nnU-Net's experiment planning, simplified: target spacing is the median
spacing (the 10th percentile along an axis that is more than 3x coarser than the others);
the patch covers the median volume, shrunk along its longest physical axis until it fits a
voxel budget, in multiples of the network's total stride; CT is windowed to the 0.5-99.5
percentiles of foreground intensities, other images are z-scored (over non-zero voxels when
cropping to them removes more than a quarter of the volume).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

ANISOTROPY = 3.0


def dataset_fingerprint(
    cases: Sequence[Mapping], intensities: Sequence[np.ndarray], channels: Sequence[str]
) -> dict:
    """Summarize per-case source geometry and pooled foreground intensities.

    Args:
        cases: per case, ``source`` (``shape``, ``spacing``) and ``cropped_shape``.
        intensities: per case, [C, n] raw foreground intensities.
        channels: channel names (``CT`` selects windowing).
    """
    spacings = np.array([c["source"]["spacing"] for c in cases], dtype=np.float64)
    shapes = np.array([c["source"]["shape"] for c in cases], dtype=np.float64)
    cropped = np.array([c["cropped_shape"] for c in cases], dtype=np.float64)
    pooled = np.concatenate([np.asarray(i, np.float64) for i in intensities], axis=1)
    channel_stats = {}
    for name, values in zip(channels, pooled, strict=True):
        if values.size == 0:
            channel_stats[name] = None
            continue
        p005, p50, p995 = np.percentile(values, [0.5, 50, 99.5])
        channel_stats[name] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "percentile_00_5": float(p005),
            "median": float(p50),
            "percentile_99_5": float(p995),
        }
    return {
        "num_cases": len(cases),
        "channels": list(channels),
        "spacing": _summary(spacings),
        "spacing_percentile_10": np.percentile(spacings, 10, axis=0).tolist(),
        "shape": _summary(shapes),
        "cropped_shape": _summary(cropped),
        "cropped_fraction_median": float(np.median(cropped.prod(1) / shapes.prod(1))),
        "physical_size_mm_median": np.median(cropped * spacings, axis=0).tolist(),
        "foreground_intensities": channel_stats,
    }


def _summary(values: np.ndarray) -> dict:
    return {
        "median": np.median(values, axis=0).tolist(),
        "min": values.min(0).tolist(),
        "max": values.max(0).tolist(),
    }


def suggest(fingerprint: Mapping, total_stride: Sequence[int], max_patch_voxels: int) -> dict:
    """Suggested ``spacing``, ``patch_size`` and ``intensity`` settings."""
    spacing = np.array(fingerprint["spacing"]["median"])
    coarse = int(np.argmax(spacing))
    others = np.delete(spacing, coarse)
    if spacing[coarse] > ANISOTROPY * others.max():
        spacing[coarse] = fingerprint["spacing_percentile_10"][coarse]
    size_mm = np.array(fingerprint["physical_size_mm_median"])
    stride = np.asarray(total_stride, dtype=np.int64)
    patch = np.maximum(np.round(size_mm / spacing), stride).astype(np.int64)
    patch = np.maximum(patch // stride * stride, stride)
    while patch.prod() > max_patch_voxels and np.any(patch > stride):
        extent = np.where(patch > stride, patch * spacing, -1)
        axis = int(np.argmax(extent))
        patch[axis] -= stride[axis]
    return {
        "spacing": [round(float(s), 3) for s in spacing],
        "patch_size": patch.tolist(),
        "intensity": _intensity(fingerprint),
    }


def _intensity(fingerprint: Mapping) -> dict:
    stats = fingerprint["foreground_intensities"]
    channels = fingerprint["channels"]
    if channels and all(c.upper() == "CT" for c in channels) and all(stats.values()):
        low = min(s["percentile_00_5"] for s in stats.values())
        high = max(s["percentile_99_5"] for s in stats.values())
        if high > low:
            return {"mode": "ct_window", "window": [round(low, 1), round(high, 1)]}
    if fingerprint["cropped_fraction_median"] < 0.75:
        return {"mode": "zscore_nonzero"}
    return {"mode": "zscore"}


def override_line(suggested: Mapping, current_intensity: Mapping) -> str:
    """The suggestion as Hydra command-line overrides of the ``data`` group."""
    spacing = ",".join(f"{s:g}" for s in suggested["spacing"])
    patch = ",".join(str(p) for p in suggested["patch_size"])
    intensity = suggested["intensity"]
    parts = [
        f"data.preprocess.spacing=[{spacing}]",
        f"data.patch_size=[{patch}]",
        f"data.preprocess.intensity.mode={intensity['mode']}",
    ]
    if "window" in intensity:
        window = ",".join(f"{w:g}" for w in intensity["window"])
        parts.append(f"++data.preprocess.intensity.window=[{window}]")
    elif "window" in current_intensity:
        parts.append("~data.preprocess.intensity.window")
    return " ".join(parts)
