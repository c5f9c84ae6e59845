"""Training data of later cascade stages: perturbed masks, predictions, region sampling."""

import re

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio
from scipy import ndimage

from medseg.data.cascade import PerturbedStageMasks, dilate_mm, erode_mm
from medseg.data.cases import discover_cases, validate_cases
from medseg.data.patches import PatchLocator, RegionFilter
from medseg.data.prepared import PreparedCase
from medseg.data.preprocess import build_preprocessing
from medseg.data.scan import case_rng, scan_label
from medseg.data.subjects import case_to_subject
from medseg.errors import DataError

from .conftest import tiny_datamodule
from .test_data_cases import save
from .test_stages import LABELS, cascade_cfg


def subject_with_organ(spacing=(1.0, 1.0, 2.0)) -> tio.Subject:
    label = torch.zeros(1, 24, 24, 12, dtype=torch.uint8)
    label[0, 6:18, 6:18, 3:9] = 1
    label[0, 10:13, 10:13, 5:7] = 2
    label[0, 1:3, 1:3, 1:2] = 1  # a second, small component
    affine = np.diag([*spacing, 1.0])
    return tio.Subject(
        image=tio.ScalarImage(tensor=torch.randn(1, 24, 24, 12), affine=affine),
        label=tio.LabelMap(tensor=label, affine=affine),
    )


def organ_of(subject) -> np.ndarray:
    return np.isin(subject["label"].data[0].numpy(), [1, 2])


def test_dilation_and_erosion_are_exact_in_millimetres():
    mask = np.zeros((21, 21, 11), bool)
    mask[10, 10, 5] = True
    grown = dilate_mm(mask, 4.0, (1.0, 1.0, 2.0))
    assert grown[10, 14, 5] and not grown[10, 15, 5]  # 4 voxels of 1 mm
    assert grown[10, 10, 7] and not grown[10, 10, 8]  # 2 voxels of 2 mm
    assert np.array_equal(
        erode_mm(grown, 4.0, (1.0, 1.0, 2.0)), grown & ~dilate_mm(~grown, 4.0, (1.0, 1.0, 2.0))
    )


def test_perturbation_is_applied():
    subject = subject_with_organ()
    organ = organ_of(subject)
    torch.manual_seed(0)
    always = PerturbedStageMasks(
        {"organ": [1, 2]},
        perturb_probability=1.0,
        dilate_mm=(3, 3),
        erode_mm=(3, 3),
        drop_component=0.0,
    )
    results = [always(subject)["prior_organ"].data[0].numpy().astype(bool) for _ in range(20)]
    dilated = dilate_mm(organ, 3, (1.0, 1.0, 2.0))
    eroded = erode_mm(organ, 3, (1.0, 1.0, 2.0))
    kinds = {
        "dilated"
        if np.array_equal(r, dilated)
        else "eroded"
        if np.array_equal(r, eroded)
        else "other"
        for r in results
    }
    assert kinds == {"dilated", "eroded"}
    never = PerturbedStageMasks({"organ": [1, 2]}, perturb_probability=0.0)
    assert np.array_equal(never(subject)["prior_organ"].data[0].numpy().astype(bool), organ)


def test_dropped_components_disappear():
    subject = subject_with_organ()
    drop_all = PerturbedStageMasks(
        {"organ": [1, 2]},
        perturb_probability=1.0,
        dilate_mm=(0, 0),
        erode_mm=(0, 0),
        drop_component=1.0,
    )
    assert not drop_all(subject)["prior_organ"].data.any()
    torch.manual_seed(3)
    counts = set()
    some = PerturbedStageMasks(
        {"organ": [1, 2]},
        perturb_probability=1.0,
        dilate_mm=(0, 0),
        erode_mm=(0, 0),
        drop_component=0.5,
    )
    for _ in range(20):
        counts.add(ndimage.label(some(subject)["prior_organ"].data[0].numpy())[1])
    assert counts == {0, 1, 2}


HALF_PATCH = np.array([2, 2, 1])  # of the (4, 4, 2) patches below: corner + half = centre


def prepared_with_organ(prior: np.ndarray | None = None) -> PreparedCase:
    subject = subject_with_organ()
    label = subject["label"].data[0].numpy()
    index = scan_label(label, {0: "bg", 1: "organ", 2: "lesion"}, case_rng("c", "l"), "c")
    case = PreparedCase("c", subject["image"].data.numpy(), label, subject["label"].affine, index)
    if prior is not None:
        case.priors = {"organ": prior}
    return case


def test_region_filter_keeps_patch_centres_inside_the_grown_region():
    prior = np.zeros((24, 24, 12), np.uint8)
    prior[8:12, 8:12, 4:6] = 1
    case = prepared_with_organ(prior)
    region = RegionFilter("organ", [1, 2], margin_mm=2.0)
    locator = PatchLocator((4, 4, 2), "label", {0: 1.0, 1: 1.0, 2: 1.0}, region=region)
    grown = dilate_mm(prior.astype(bool), 2.0, (1.0, 1.0, 2.0))
    rng = np.random.default_rng(0)
    centres = [locator.corner(case, rng) + HALF_PATCH for _ in range(200)]
    assert all(grown[tuple(c)] for c in centres)
    assert {int(case.label[tuple(c)]) for c in centres} == {1, 2}  # the region is in the organ
    # Without predictions the region is the stage's ground truth (organ and lesion), grown.
    truth = prepared_with_organ()
    grown = dilate_mm(np.isin(truth.label, [1, 2]), 2.0, (1.0, 1.0, 2.0))
    kept = RegionFilter("organ", [1, 2], margin_mm=2.0).locations(truth)
    assert all(grown[tuple(c)] for where in kept.values() for c in where)
    assert len(kept[0]) < len(truth.index.locations[0])


def test_region_filter_falls_back_when_the_region_is_empty():
    case = prepared_with_organ(np.zeros((24, 24, 12), np.uint8))
    region = RegionFilter("organ", [1, 2], margin_mm=2.0)
    assert region.locations(case) is case.index.locations
    locator = PatchLocator((4, 4, 2), "label", {2: 1.0}, region=region)
    rng = np.random.default_rng(0)
    for _ in range(10):
        assert case.label[tuple(locator.corner(case, rng) + HALF_PATCH)] == 2


def test_cascade_batches_carry_perturbed_masks_and_regional_patches(phantom_root):
    from medseg.stages import build_cascade

    dm = tiny_datamodule(phantom_root, label_probabilities={0: 1.0, 1: 1.0, 2: 1.0})
    stages = cascade_cfg(s0={"epochs": 1}, s1={"patch_size": [16, 16, 8]})
    cascade = build_cascade(stages, LABELS)
    dm.attach_cascade(cascade, {"source": "perturbed", "perturb_probability": 0.0})
    dm.setup("fit")
    # Sampled voxels are centred in what the training stage sees: the organ stage the whole
    # patch (pooled), the lesion stage its centre.
    assert dm.train_dataset(0).locator.focus_size.tolist() == [32, 32, 16]
    assert dm.train_dataset(1).locator.focus_size.tolist() == [16, 16, 8]
    batch = next(iter(dm.train_dataloader()))  # epoch 0: organ stage, whole volume
    organ = torch.isin(batch["label"], torch.tensor([1, 2])).float()
    torch.testing.assert_close(batch["priors"]["organ"], organ)

    class Epoch:  # the lesion stage's epochs sample inside the organ (+10 mm)
        current_epoch = 1

    dm.trainer = Epoch()
    for batch in dm.train_dataloader():
        centres = batch["priors"]["organ"]  # unperturbed: the organ itself
        grown = torch.from_numpy(
            np.stack([dilate_mm(c[0].numpy() > 0, 10.0, (2.5, 2.5, 7.5)) for c in centres])
        )
        assert torch.all(grown[:, 16, 16, 8])


def test_predictions_source_needs_every_file_and_loads_them(phantom_root, tmp_path):
    from medseg.stages import build_cascade

    # binary_first's lesion stage takes 64x64x32 of each patch: more than the tiny 32x32x16
    cascade = build_cascade(cascade_cfg(s1={"patch_size": [16, 16, 8]}), LABELS)
    dm = tiny_datamodule(phantom_root)
    dm.attach_cascade(cascade, {"source": "predictions", "dir": str(tmp_path)})
    with pytest.raises(
        DataError, match=r"3 earlier-stage prediction file\(s\) are missing"
    ) as caught:
        dm.setup("fit")
    assert str(tmp_path / "organ" / f"{dm.split.train[0]}.nii.gz") in str(caught.value)
    for case_id in dm.split.train:
        label = nib.load(phantom_root / "labelsTr" / f"{case_id}.nii.gz")
        empty = np.zeros(label.shape, np.uint8)
        empty[:4] = 1  # a recognisable "prediction": the first 4 x-slices
        save(tmp_path / "organ" / f"{case_id}.nii.gz", empty, label.affine)
    dm = tiny_datamodule(phantom_root, samples_per_volume=1)
    dm.attach_cascade(cascade, {"source": "predictions", "dir": str(tmp_path)})
    dm.setup("fit")
    prior = np.asarray(dm.cases["train"][0].priors["organ"])
    assert prior[:4].all() and not prior[4:].any()
    batch = next(iter(dm.train_dataloader()))
    assert batch["priors"]["organ"].shape == batch["label"].shape


def test_folder_layout_with_a_merged_mask(tmp_path):
    for case in ("site_a/case_1", "site_b/case_2"):
        folder = tmp_path / case
        label = np.zeros((8, 8, 4), np.uint8)
        label[3:5, 3:5, 1:3] = 1
        brain = np.zeros((8, 8, 4), np.uint8)
        brain[1:7, 1:7, :] = 1
        save(
            folder / "t1.nii.gz", np.random.default_rng(0).normal(size=(8, 8, 4)).astype(np.float32)
        )
        save(folder / "flair.nii.gz", np.ones((8, 8, 4), np.float32))
        save(folder / "seg.nii.gz", label)
        save(folder / "brain.nii.gz", brain)
    layout = {
        "channels": {"T1": "t1.nii.gz", "FLAIR": "flair*.nii.gz"},
        "label": "seg.nii.gz",
        "merge_masks": {5: "brain.nii.gz"},
    }
    labels = {0: "background", 1: "tumour", 5: "brain"}
    info = discover_cases(tmp_path, labels, layout)
    assert [c.case_id for c in info.cases] == ["case_1", "case_2"] and info.channels == (
        "T1",
        "FLAIR",
    )
    validate_cases(info)
    subject = build_preprocessing(canonical=False)(case_to_subject(info.cases[0]))
    label = subject["label"].data[0]
    assert subject["image"].data.shape == (2, 8, 8, 4)
    assert (label == 1).sum() == 8 and (label == 5).sum() == 6 * 6 * 4 - 8
    assert not any(k.startswith("merge_") for k in subject)
    with pytest.raises(
        DataError, match=re.escape("merges value 5, which the label map does not declare")
    ):
        validate_cases(discover_cases(tmp_path, {0: "background", 1: "tumour"}, layout))
