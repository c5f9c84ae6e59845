"""Cases as TorchIO subjects, and subjects as the batch dict the LightningModule consumes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio

from medseg.data.cascade import PRIOR_PREFIX
from medseg.data.cases import NIFTI_SUFFIXES, Case
from medseg.data.targets import TARGET_PREFIX


def read_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Data ([C, x, y, z] or [x, y, z]) and RAS affine of a NIfTI file, a DICOM series folder
    or an array of a Zarr dataset (see :mod:`medseg.data.zarr_store`).

    TorchIO's reader, except that NIfTI files are read with nibabel: SimpleITK (TorchIO's
    default) fills a truncated ``.nii.gz`` with zeros without an error; nibabel raises, so a
    damaged file is reported instead of trained on. DICOM folders go to TorchIO's reader.
    """
    path = Path(path)
    if path.is_dir():
        # Imported here: zarr_store builds subjects with this module.
        from medseg.data.zarr_store import is_zarr_array, read_zarr_array

        return read_zarr_array(path) if is_zarr_array(path) else tio.io.read_image(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        return tio.io.read_image(path)
    image = nib.load(path)
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4:  # (x, y, z, C) -> (C, x, y, z)
        data = np.moveaxis(data, -1, 0)
    return data, image.affine


def open_as_nifti(path: str | Path) -> nib.Nifti1Image:
    """A NIfTI file as nibabel opens it (header kept); a DICOM series or Zarr array read
    into a NIfTI image with its affine, so code that reads NIfTI files accepts them too."""
    path = Path(path)
    if not path.is_dir():
        return nib.load(path)
    data, affine = read_image(path)
    data = np.asarray(data)
    if data.ndim == 4:  # (C, x, y, z) -> (x, y, z, C), one channel as 3D
        data = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
    return nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))


# Label maps named merge_<value> are folded into `label` by preprocess.MergeLabelMasks.
MERGE_PREFIX = "merge_"


def case_to_subject(case: Case, label_maps: Mapping[str, Path] | None = None) -> tio.Subject:
    """A lazy subject: files are read when a transform or `load()` first needs them.

    `label_maps` adds more label maps by name (e.g. earlier-stage predictions of a cascade).
    """
    images = list(case.images)
    fields: dict = {
        "image": tio.ScalarImage(images if len(images) > 1 else images[0], reader=read_image),
        "case_id": case.case_id,
    }
    if case.label is not None:
        fields["label"] = tio.LabelMap(case.label, reader=read_image)
    for value, path in case.label_masks:
        fields[f"{MERGE_PREFIX}{value}"] = tio.LabelMap(path, reader=read_image)
    for name, path in (label_maps or {}).items():
        fields[name] = tio.LabelMap(path, reader=read_image)
    return tio.Subject(**fields)


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
