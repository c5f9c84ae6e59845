"""Training data for later cascade stages: what they see of earlier stages' masks, and where
their patches come from.

A later stage trained on perfect ground-truth masks of the earlier stage learns to trust
them, then fails on the imperfect masks it gets at inference. So during training a later
stage sees either the earlier stage's ground truth *perturbed* (random dilation or erosion
in mm, randomly removed connected components, applied to each training patch after
augmentation) or the earlier stage's real predictions read from a folder (out-of-fold
predictions when k-fold is used; preprocessed like their case and read patch by patch).
Either way they reach the batch as label maps named ``prior_<stage>``. Where patches of a
later stage come from is decided by :class:`medseg.data.patches.RegionFilter`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torchio as tio
from scipy import ndimage

from medseg.data.formats import IMAGE_ENDINGS
from medseg.errors import ConfigError, DataError

PRIOR_PREFIX = "prior_"
MASK_SOURCES = ("perturbed", "predictions")


def prior_key(stage: str) -> str:
    return f"{PRIOR_PREFIX}{stage}"


def dilate_mm(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Grow a boolean mask by `radius_mm` (exact Euclidean distance in mm)."""
    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm


def erode_mm(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Shrink a boolean mask by `radius_mm` (exact Euclidean distance in mm)."""
    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(mask, sampling=spacing) > radius_mm


class PerturbedStageMasks(tio.Transform):
    """Add ``prior_<stage>`` masks: ground truth of each stage, randomly perturbed.

    Args:
        stage_values: stage name -> source label values of that stage's foreground.
        perturb_probability: chance that a mask is perturbed at all (else it is the ground
            truth). Not named ``probability``: TorchIO uses that for skipping the transform.
        dilate_mm, erode_mm: ranges (mm) of the random dilation or erosion radius; one of the
            two is applied, with equal chance.
        drop_component: chance of removing each connected component of the mask (so later
            stages learn to live with an earlier stage that missed a part).
    """

    def __init__(
        self,
        stage_values: Mapping[str, Sequence[int]],
        perturb_probability: float = 0.8,
        dilate_mm: Sequence[float] = (0.0, 6.0),
        erode_mm: Sequence[float] = (0.0, 4.0),
        drop_component: float = 0.2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.stage_values = {k: list(v) for k, v in stage_values.items()}
        self.perturb_probability = perturb_probability
        self.dilate_mm = tuple(float(v) for v in dilate_mm)
        self.erode_mm = tuple(float(v) for v in erode_mm)
        self.drop_component = drop_component
        self.args_names = [
            "stage_values",
            "perturb_probability",
            "dilate_mm",
            "erode_mm",
            "drop_component",
        ]

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(()))

    def perturb(self, mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        if float(torch.rand(())) >= self.perturb_probability:
            return mask
        if float(torch.rand(())) < 0.5:
            mask = dilate_mm(mask, self._uniform(*self.dilate_mm), spacing)
        else:
            mask = erode_mm(mask, self._uniform(*self.erode_mm), spacing)
        if self.drop_component > 0:
            components, count = ndimage.label(mask)
            if count:
                dropped = (torch.rand(count) < self.drop_component).numpy()
                mask = mask & ~np.isin(components, np.flatnonzero(dropped) + 1)
        return mask

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        label = subject["label"]
        values = label.data[0].numpy()
        for stage, stage_values in self.stage_values.items():
            mask = self.perturb(np.isin(values, stage_values), label.spacing)
            tensor = torch.from_numpy(mask[None].astype(np.uint8))
            subject.add_image(tio.LabelMap(tensor=tensor, affine=label.affine), prior_key(stage))
        return subject


def prediction_mask_paths(
    folder: str | Path, stages: Sequence[str], case_ids: Sequence[str]
) -> dict[str, dict[str, Path]]:
    """``<folder>/<stage>/<case_id>.nii.gz`` (or any image format: predict writes the input's)
    for every stage and case; one error lists gaps."""
    folder = Path(folder).expanduser()
    paths: dict[str, dict[str, Path]] = {}
    missing = []
    for case_id in case_ids:
        paths[case_id] = {}
        for stage in stages:
            candidates = [folder / stage / f"{case_id}{e}" for e in IMAGE_ENDINGS]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                missing.append(f"{folder / stage / case_id}.nii.gz")
            paths[case_id][stage] = path or candidates[0]
    if missing:
        shown = "\n".join(f"  - {p}" for p in missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise DataError(
            f"stage.training_masks.source=predictions: {len(missing)} earlier-stage prediction "
            f"file(s) are missing:\n{shown}{more}"
        )
    return paths


def check_mask_source(source: str) -> None:
    if source not in MASK_SOURCES:
        raise ConfigError(
            f"stage.training_masks.source must be one of {list(MASK_SOURCES)}, got {source!r}"
        )
