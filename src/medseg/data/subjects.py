"""Cases as TorchIO subjects, and subjects as the batch dict the LightningModule consumes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torchio as tio

from medseg.data.alignment import reorient_to_grid
from medseg.data.cascade import PRIOR_PREFIX
from medseg.data.cases import Case
from medseg.data.image_io import DEFAULT_READING, ReadOptions
from medseg.data.targets import TARGET_PREFIX

# Label maps named merge_<value> are folded into `label` by preprocess.MergeLabelMasks.
MERGE_PREFIX = "merge_"


def case_to_subject(
    case: Case,
    label_maps: Mapping[str, Path] | None = None,
    options: ReadOptions = DEFAULT_READING,
) -> tio.Subject:
    """A lazy subject: files are read (with `options`) when a transform or `load()` first
    needs them.

    `label_maps` adds more label maps by name (e.g. earlier-stage predictions of a cascade).
    """
    images = list(case.images)
    reader = options.reader()
    fields: dict = {
        "image": tio.ScalarImage(images if len(images) > 1 else images[0], reader=reader),
        "case_id": case.case_id,
    }
    if case.label is not None:
        fields["label"] = tio.LabelMap(case.label, reader=reader)
    for value, path in case.label_masks:
        fields[f"{MERGE_PREFIX}{value}"] = tio.LabelMap(path, reader=reader)
    for name, path in (label_maps or {}).items():
        fields[name] = tio.LabelMap(path, reader=reader)
    return tio.Subject(**fields)


def reorient_labels(subject: tio.Subject) -> None:
    """Move every loaded label map stored on the image's grid with flipped or permuted axes
    onto the image grid (exact: voxels change places, nothing is interpolated). Label maps
    on another grid are left for validation to report."""
    image = subject["image"]
    for label in subject.get_images(intensity_only=False):
        if label.type != tio.LABEL:
            continue
        data = np.moveaxis(label.data.numpy(), 0, -1)
        moved = reorient_to_grid(data, label.affine, image.spatial_shape, image.affine)
        if moved is not None and moved is not data:
            label.set_data(torch.from_numpy(np.moveaxis(moved, -1, 0).copy()))
            label.affine = image.affine.copy()


def collate_subjects(subjects: Sequence[tio.Subject]) -> dict:
    """Batch dict: ``image`` float32 [B, C, *spatial], ``label`` int64 [B, 1, *spatial],
    ``case_id`` list, ``spacing`` float [B, 3] (mm), ``location`` [B, 6] for patches,
    ``priors``: stage -> float [B, 1, *spatial] earlier-stage masks of a cascade, and every
    task's targets under the task's name: int64 [B] class indices, float32 [B] values or
    float32 [B, 1, *spatial] maps."""
    batch: dict = {
        "image": torch.stack([s["image"].data.float() for s in subjects]),
        "case_id": [s["case_id"] for s in subjects],
        "spacing": torch.tensor([s["image"].spacing for s in subjects], dtype=torch.float64),
    }
    if "label" in subjects[0]:
        batch["label"] = torch.stack([s["label"].data.long() for s in subjects])
    priors = [k for k in subjects[0] if k.startswith(PRIOR_PREFIX)]
    if priors:
        batch["priors"] = {
            k.removeprefix(PRIOR_PREFIX): torch.stack([s[k].data.float() for s in subjects])
            for k in priors
        }
    for key in (k for k in subjects[0] if k.startswith(TARGET_PREFIX)):
        values = [s[key] for s in subjects]
        if isinstance(values[0], tio.Image):
            target = torch.stack([v.data.float() for v in values])
        elif isinstance(values[0], int):
            target = torch.tensor(values, dtype=torch.int64)
        else:
            target = torch.tensor(values, dtype=torch.float32)
        batch[key.removeprefix(TARGET_PREFIX)] = target
    if tio.LOCATION in subjects[0]:
        batch["location"] = torch.stack([torch.as_tensor(s[tio.LOCATION]) for s in subjects])
    return batch
