"""Zarr datasets read in place: validation, patch-only reads, normalization, pre-selection."""

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import zarr

from medseg import pipeline
from medseg.data import datamodule as datamodule_module
from medseg.data.cases import CaseValidationError, discover_cases
from medseg.data.datamodule import SegmentationDataModule
from medseg.data.preprocess import IntensityNormalization
from medseg.data.zarr_store import convert_to_zarr
from medseg.errors import ConfigError

from .conftest import TINY_PHANTOM, compose_config, tiny_datamodule, tiny_overrides

CT = {"mode": "ct_window", "window": [-160, 240]}
ON_STORED_GRID = {"canonical": False, "crop_nonzero": False, "spacing": None}


@pytest.fixture(scope="module")
def phantom_zarr(phantom_root, tmp_path_factory) -> Path:
    return convert_to_zarr(discover_cases(phantom_root), tmp_path_factory.mktemp("z") / "p.zarr")


def zarr_datamodule(root, **kwargs) -> SegmentationDataModule:
    settings = {
        "preprocess": {**ON_STORED_GRID, "intensity": CT},
        "patch_size": (16, 16, 8),
        "samples_per_volume": 4,
        "queue_length": 8,
    }
    dm = tiny_datamodule(root, **(settings | kwargs))
    dm.setup("fit")
    return dm


def test_zarr_dataset_trains_in_place_with_patches_normalized_on_read(phantom_zarr, tmp_path):
    dm = zarr_datamodule(phantom_zarr, cache_dir=tmp_path)
    assert dm.dataset.storage == "zarr" and dm.class_names == ["background", "liver", "lesion"]
    case = dm.cases["train"][0]
    assert isinstance(case.image, zarr.Array)  # the user's array, not a copy
    # The cache holds what sampling needs, no image copies.
    assert not (dm.cache_root / case.case_id / "image").exists()
    assert (dm.cache_root / case.case_id / "locations").is_dir()

    raw = zarr.open_group(str(phantom_zarr / case.case_id))["image"][:]
    expected = IntensityNormalization.from_config(**CT).apply(raw[:, 4:20, 8:24, 2:10], None)
    image, _ = case.read((4, 8, 2), (16, 16, 8))
    np.testing.assert_allclose(image, expected)

    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16, 8) and batch["label"].dtype == torch.int64
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    volume = next(iter(dm.val_dataloader()))
    assert volume["image"].shape == (1, 1, *TINY_PHANTOM["shape"])
    assert volume["spacing"][0].tolist() == pytest.approx(TINY_PHANTOM["spacing"])


def test_zscore_statistics_are_computed_once_over_the_whole_volume(phantom_zarr):
    dm = zarr_datamodule(
        phantom_zarr, preprocess={**ON_STORED_GRID, "intensity": {"mode": "zscore"}}
    )
    case = dm.cases["val"][0]
    image, _ = case.read_volume()
    assert image.mean() == pytest.approx(0, abs=1e-4)
    assert image.std() == pytest.approx(1, abs=1e-4)


class RecordingArray:
    """Wraps an array and records the number of voxels of every read."""

    def __init__(self, array):
        self.array, self.reads = array, []
        self.shape, self.chunks = array.shape, array.chunks

    def __getitem__(self, key):
        data = np.asarray(self.array[key])
        self.reads.append(data.size)
        return data


@pytest.fixture(scope="module")
def large_zarr(tmp_path_factory) -> Path:
    """Four 128 x 128 x 64 cases with a labelled block: larger than any patch read."""
    root = tmp_path_factory.mktemp("large") / "large.zarr"
    group = zarr.open_group(str(root), mode="w")
    group.attrs["labels"] = {"0": "background", "1": "organ"}
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "d"):
        case = group.create_group(name)
        case.attrs["spacing"] = [1.0, 1.0, 2.0]
        case.create_array("image", data=rng.normal(size=(128, 128, 64)).astype(np.float32))
        label = np.zeros((128, 128, 64), np.uint8)
        label[40:90, 30:100, 10:50] = 1
        case.create_array("label", data=label, chunks=(64, 64, 64))
    return root


def test_training_reads_only_the_patch_not_the_volume(large_zarr):
    dm = zarr_datamodule(
        large_zarr,
        patch_size=(32, 32, 16),
        preprocess={**ON_STORED_GRID, "intensity": {"mode": "none"}},
        augmentation="default",
        num_folds=2,
        test_fraction=0.0,
        samples_per_volume=20,
    )
    for case in dm.cases["train"]:
        case.image = RecordingArray(case.image)
    batches = list(dm.train_dataloader())
    assert sum(len(b["case_id"]) for b in batches) == 20 * len(dm.cases["train"])
    reads = [n for case in dm.cases["train"] for n in case.image.reads]
    assert len(reads) == 20 * len(dm.cases["train"])  # one read per patch
    patch = 32 * 32 * 16
    # Unrotated patches read the patch (less at the border); rotated or zoomed ones the box
    # around it (at most ~6.2x the patch for the default preset's 15 degrees and 0.7x zoom).
    assert sum(n == patch for n in reads) > len(reads) / 2
    assert max(reads) <= 7 * patch < 128 * 128 * 64 / 8


def test_zarr_cases_are_validated_with_every_problem_listed(tmp_path):
    root = tmp_path / "bad.zarr"
    group = zarr.open_group(str(root), mode="w")
    group.attrs["labels"] = {"0": "background", "1": "organ"}
    image = np.ones((8, 8, 8), np.float32)
    no_spacing = group.create_group("no_spacing")
    no_spacing.create_array("image", data=image)
    no_spacing.create_array("label", data=np.zeros((8, 8, 8), np.uint8))
    wrong_shape = group.create_group("wrong_shape")
    wrong_shape.attrs["spacing"] = [1, 1, 1]
    wrong_shape.create_array("image", data=image)
    wrong_shape.create_array("label", data=np.zeros((8, 8, 4), np.uint8))
    for name in ("good_1", "good_2"):
        good = group.create_group(name)
        good.attrs["spacing"] = [1, 1, 1]
        good.create_array("image", data=image * np.arange(8)[:, None, None])
        good.create_array("label", data=np.ones((8, 8, 8), np.uint8))
    with pytest.raises(CaseValidationError) as error:
        zarr_datamodule(root, patch_size=(8, 8, 8), test_fraction=0.0)
    message = str(error.value)
    assert "2 problem(s) in 4 case(s)" in message
    assert re.search(r"no_spacing: .*no_spacing: needs an attribute 'spacing'", message)
    assert "wrong_shape/label: label shape (8, 8, 4) differs from the image shape (8, 8, 8)" in (
        message
    )

    del group["no_spacing"], group["wrong_shape"]
    group["good_2"]["label"][0, 0, 0] = 5
    with pytest.raises(CaseValidationError, match=r"good_2/label: label values \[5\] are not in"):
        zarr_datamodule(root, patch_size=(8, 8, 8), test_fraction=0.0, cache_dir=tmp_path / "c")


def test_zarr_data_refuses_resampling(phantom_zarr):
    with pytest.raises(ConfigError, match=r"data.preprocess.spacing=\[2.0, 2.0, 2.0\]: Zarr"):
        zarr_datamodule(phantom_zarr, preprocess={**ON_STORED_GRID, "spacing": [2, 2, 2]})


def test_labelled_sampler_preselects_patches_once_and_caches_them(
    phantom_zarr, tmp_path, monkeypatch
):
    kwargs = dict(
        sampler="labelled",
        min_label_fraction=0.5,
        patch_size=(16, 16, 8),
        cache_dir=tmp_path,
        samples_per_volume=10,
    )
    dm = zarr_datamodule(phantom_zarr, **kwargs)
    case = dm.cases["train"][0]
    stored = dm.cache_root / case.case_id / "preselected_16x16x8_0.5"
    assert (stored / "zarr.json").is_file() and len(case.preselected) > 0
    for batch in dm.train_dataloader():
        labelled = (batch["label"] > 0).float().mean((1, 2, 3, 4))
        assert torch.all(labelled >= 0.5)

    def not_again(*args):
        raise AssertionError("pre-selection was computed again")

    monkeypatch.setattr(datamodule_module, "labelled_corners", not_again)
    again = zarr_datamodule(phantom_zarr, **kwargs)
    np.testing.assert_array_equal(again.cases["train"][0].preselected, case.preselected)


def test_training_on_a_zarr_dataset_reports_the_test_split(phantom_zarr, tmp_path):
    tiny = [o for o in tiny_overrides(tmp_path, phantom_zarr) if "phantom" not in o]
    overrides = [
        *tiny,
        "data=zarr",
        f"data.root={phantom_zarr}",
        "data.preprocess.intensity.mode=ct_window",
        "++data.preprocess.intensity.window=[-160,240]",
    ]
    metrics = pipeline.train(compose_config("train", overrides))
    assert 0 <= metrics["test/dice_liver"] <= 1
    predictions = sorted((tmp_path / "run" / "predictions").glob("*.nii.gz"))
    assert len(predictions) == 2
    written = nib.load(predictions[0])
    assert written.shape == tuple(TINY_PHANTOM["shape"])
    assert nib.affines.voxel_sizes(written.affine).tolist() == pytest.approx(
        TINY_PHANTOM["spacing"]
    )
