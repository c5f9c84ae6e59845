"""Per-case segmentation metrics in millimetres, on label maps in their original geometry.

Overlap: Dice, IoU (Jaccard), volume similarity 1 - |P - R| / (P + R). Surface: the 95th
percentile Hausdorff distance (HD95: the larger of the two directed 95th percentiles),
the average symmetric surface distance (ASSD) and the normalized surface Dice (NSD: the
fraction of both surfaces within ``tolerance_mm`` of the other). Surfaces are the mask
voxels with a background face neighbour (outside the volume counts as background);
distances are between voxel centres, in mm using the voxel spacing.

Empty masks, per class and case:
- absent from both the reference and the prediction: every metric is undefined (NaN in
  the CSV, null in JSON) and left out of means and counts;
- present in only one of them: Dice, IoU, NSD and volume similarity are 0, and HD95 and
  ASSD are the diagonal of the image in mm (the largest distance possible, as the BraTS
  challenge does), so missed and hallucinated structures weigh on the means.

Surface distances are written with scipy's Euclidean distance transform because
torchmetrics' distance transform handles 2D only and MONAI is not a dependency.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

# Metric names as they appear in CSV columns (`<metric>_<class>`), summaries and logs.
METRICS = ("dice", "iou", "hd95_mm", "assd_mm", "nsd", "volume_similarity")


def surface_distances(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of one non-empty mask to the other's surface."""
    both = prediction | reference
    box = tuple(
        slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2) for idx in np.nonzero(both)
    )  # the bounding box of both masks holds every surface voxel and every nearest one
    structure = ndi.generate_binary_structure(prediction.ndim, 1)
    surfaces = []
    for mask in (prediction[box], reference[box]):
        surfaces.append(mask & ~ndi.binary_erosion(mask, structure, border_value=0))
    to_reference = ndi.distance_transform_edt(~surfaces[1], sampling=spacing)
    to_prediction = ndi.distance_transform_edt(~surfaces[0], sampling=spacing)
    return to_reference[surfaces[0]], to_prediction[surfaces[1]]


def class_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float,
) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one pair of binary masks (see the module doc)."""
    predicted, expected = int(prediction.sum()), int(reference.sum())
    if predicted == 0 and expected == 0:
        return dict.fromkeys(METRICS, float("nan"))
    overlap = int((prediction & reference).sum())
    row = {
        "dice": 2 * overlap / (predicted + expected),
        "iou": overlap / (predicted + expected - overlap),
        "volume_similarity": 1 - abs(predicted - expected) / (predicted + expected),
    }
    if predicted == 0 or expected == 0:
        diagonal = float(np.linalg.norm(np.asarray(prediction.shape) * np.asarray(spacing)))
        return row | {"hd95_mm": diagonal, "assd_mm": diagonal, "nsd": 0.0}
    to_reference, to_prediction = surface_distances(prediction, reference, spacing)
    count = to_reference.size + to_prediction.size
    return row | {
        "hd95_mm": float(max(np.percentile(to_reference, 95), np.percentile(to_prediction, 95))),
        "assd_mm": float((to_reference.sum() + to_prediction.sum()) / count),
        "nsd": float(
            ((to_reference <= tolerance_mm).sum() + (to_prediction <= tolerance_mm).sum()) / count
        ),
    }


def case_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    class_names: Sequence[str],
    spacing: Sequence[float],
    tolerance_mm: float = 2.0,
) -> dict[str, float]:
    """Metrics and volumes (mL) of every foreground class for one case.

    Args:
        prediction, reference: class-index maps (0 is background) of the same shape.
        class_names: names of classes 0..K-1.
        spacing: voxel size in mm per axis.
        tolerance_mm: distance within which surfaces count as agreeing, for NSD.

    Returns:
        ``<metric>_<class>`` for every metric of :data:`METRICS`, then
        ``volume_ml_reference_<class>`` and ``volume_ml_predicted_<class>``.
    """
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ")
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000
    per_class = {
        name: class_metrics(prediction == index, reference == index, spacing, tolerance_mm)
        for index, name in enumerate(class_names)
        if index > 0
    }
    row = {
        f"{metric}_{name}": values[metric]
        for metric in METRICS
        for name, values in per_class.items()
    }
    counts = {
        "reference": np.bincount(reference.ravel(), minlength=len(class_names)),
        "predicted": np.bincount(prediction.ravel(), minlength=len(class_names)),
    }
    for which, bins in counts.items():
        for index, name in enumerate(class_names[1:], start=1):
            row[f"volume_ml_{which}_{name}"] = float(bins[index]) * voxel_ml
    return row
