"""Cases as TorchIO subjects, and subjects as the batch dict the LightningModule consumes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchio as tio

from medseg.data.cases import Case


def case_to_subject(case: Case) -> tio.Subject:
    """A lazy subject: files are read when a transform or `load()` first needs them."""
    images = list(case.images)
    fields: dict = {
        "image": tio.ScalarImage(images if len(images) > 1 else images[0]),
        "case_id": case.case_id,
    }
    if case.label is not None:
        fields["label"] = tio.LabelMap(case.label)
    return tio.Subject(**fields)


def collate_subjects(subjects: Sequence[tio.Subject]) -> dict:
    """Batch dict: ``image`` float32 [B, C, *spatial], ``label`` int64 [B, 1, *spatial],
    ``case_id`` list, ``spacing`` float [B, 3] (mm), ``location`` [B, 6] for patches."""
    batch: dict = {
        "image": torch.stack([s["image"].data.float() for s in subjects]),
        "case_id": [s["case_id"] for s in subjects],
        "spacing": torch.tensor([s["image"].spacing for s in subjects], dtype=torch.float64),
    }
    if "label" in subjects[0]:
        batch["label"] = torch.stack([s["label"].data.long() for s in subjects])
    if tio.LOCATION in subjects[0]:
        batch["location"] = torch.stack([torch.as_tensor(s[tio.LOCATION]) for s in subjects])
    return batch
