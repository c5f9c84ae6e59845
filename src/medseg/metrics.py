"""Per-case segmentation metrics.

Convention: a class absent from both the reference and the prediction has an undefined
Dice (NaN), left out of means; a class predicted where the reference has none scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional.segmentation import dice_score


def case_metrics(
    prediction: torch.Tensor,
    reference: torch.Tensor,
    class_names: Sequence[str],
    spacing: Sequence[float],
) -> dict[str, float]:
    """Dice and volumes (mL) of every foreground class for one case.

    Args:
        prediction, reference: integer label maps of the same spatial shape.
        class_names: names of classes 0..K-1 (0 is background).
        spacing: voxel size in mm, to turn voxel counts into millilitres.
    """
    num_classes = len(class_names)
    dice = dice_score(
        prediction[None].long(),
        reference[None].long(),
        num_classes=num_classes,
        include_background=False,
        average="none",
        input_format="index",
    ).reshape(-1)  # [1, K-1], or 0-d with one foreground class
    voxel_ml = float(torch.tensor(list(spacing), dtype=torch.float64).prod()) / 1000
    predicted_counts = torch.bincount(prediction.flatten().long(), minlength=num_classes)
    reference_counts = torch.bincount(reference.flatten().long(), minlength=num_classes)
    row: dict[str, float] = {}
    for index, name in enumerate(class_names[1:], start=1):
        row[f"dice_{name}"] = float(dice[index - 1])
        row[f"volume_ml_reference_{name}"] = float(reference_counts[index]) * voxel_ml
        row[f"volume_ml_predicted_{name}"] = float(predicted_counts[index]) * voxel_ml
    return row
