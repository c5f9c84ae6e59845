"""Bad input, numbers and sizes: non-finite voxels, axes too thin to resample, implausible
spacings. Every bad file is made from the phantom here; each entry point that reads it
(prepare, train, predict) names the file and the problem in one line, without a traceback,
and still processes the good files, writing nothing half-done."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import zarr

from medseg import pipeline
from medseg.checkpoints import load_checkpoint, load_module
from medseg.data.cache import open_cases, prepare_cache
from medseg.data.cases import CaseValidationError, discover_cases, validate_cases
from medseg.data.datamodule import SegmentationDataModule
from medseg.data.geometry import implausible_spacing
from medseg.data.preprocess import preprocess_settings
from medseg.data.subjects import case_to_subject
from medseg.data.zarr_store import convert_to_zarr, discover_zarr_dataset
from medseg.errors import ConfigError, DataError
from medseg.prediction import Predictor, find_input_cases, predict_cases

from .conftest import assert_clean_failure, compose_config, run_script, tiny_overrides

# Non-finite voxels written into phantom_001 (RAS volume: ToCanonical keeps these indices).
NONFINITE = {(10, 10, 5): np.nan, (20, 20, 5): np.inf, (30, 30, 5): -np.inf}
NONFINITE_LINE = "3 non-finite voxel(s) (1 NaN, 1 +Inf, 1 -Inf)"
PHANTOM_SPACING = "data.preprocess.spacing=[2.5,2.5,7.5]"
CT_WINDOW = (-160, 240)  # configs/data/phantom.yaml
REPLACEMENT = 140.0  # HU; ct_window maps it to 0.5
ON_STORED_GRID = {"canonical": False, "crop_nonzero": False, "spacing": None}  # Zarr datasets


def _copy_phantom(phantom_root: Path, root: Path, num_cases: int = 5) -> Path:
    """The first `num_cases` cases of the phantom (fewer cases to prepare and train on)."""
    shutil.copytree(phantom_root, root)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] = meta["training"][:num_cases]
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _rewrite(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


def _with_nonfinite_voxels(path: Path) -> None:
    image = nib.load(path)
    data = np.asarray(image.dataobj).astype(np.float32)
    for voxel, value in NONFINITE.items():
        data[voxel] = value
    _rewrite(path, data, image.affine)


def _one_slice(path: Path) -> None:
    """A single 2D slice saved as a 3D volume (48x48x1)."""
    image = nib.load(path)
    _rewrite(path, np.asarray(image.dataobj)[:, :, 8:9], image.affine)


def _four_slices_of_1000_mm(path: Path) -> None:
    image = nib.load(path)
    affine = image.affine.copy()
    affine[:3, 2] *= 1000 / np.linalg.norm(affine[:3, 2])
    _rewrite(path, np.asarray(image.dataobj)[:, :, 6:10], affine)


@pytest.fixture(scope="module")
def bad_dataset(phantom_root, tmp_path_factory) -> Path:
    """Five phantom cases: phantom_001 holds NaN/Inf voxels, phantom_002 is one slice thick,
    phantom_003 is four slices of 1000 mm; phantom_000 and phantom_004 are good."""
    root = _copy_phantom(phantom_root, tmp_path_factory.mktemp("bad") / "dataset")
    assert nib.aff2axcodes(nib.load(root / "imagesTr" / "phantom_001.nii.gz").affine) == tuple(
        "RAS"
    )
    _with_nonfinite_voxels(root / "imagesTr" / "phantom_001.nii.gz")
    for folder in ("imagesTr", "labelsTr"):
        _one_slice(root / folder / "phantom_002.nii.gz")
        _four_slices_of_1000_mm(root / folder / "phantom_003.nii.gz")
    return root


def _assert_bad_cases_named(text: str, growth_key: str, nonfinite_key: str) -> None:
    """One line per bad case of `bad_dataset`, each naming its file and problem (checked on
    a CLI's output with assert_clean_failure, on an exception's message here)."""
    lines = text.splitlines()
    for fragments in (
        ("phantom_001.nii.gz", NONFINITE_LINE, f"{nonfinite_key}.nonfinite=replace"),
        ("phantom_002.nii.gz", "48x48x1 voxels", "at least 4 voxels along every axis"),
        ("phantom_003.nii.gz", "2.5x2.5x1000 mm", "48x48x533 voxels, 133x", growth_key),
    ):
        assert any(all(f in line for f in fragments) for line in lines), (fragments, text)


def test_prepare_names_each_bad_case_and_prepares_the_good_ones(bad_dataset, tmp_path):
    result = run_script(
        "scripts/prepare.py",
        f"paths.root_dir={tmp_path}",
        f"data.root={bad_dataset}",
        "data.phantom=null",
        f"data.cache_dir={tmp_path / 'cache'}",
        PHANTOM_SPACING,
    )
    assert_clean_failure(result, "phantom_001.nii.gz", NONFINITE_LINE, "nonfinite_value")
    assert_clean_failure(result, "phantom_002.nii.gz", "48x48x1 voxels", "at least 4")
    assert_clean_failure(result, "phantom_003.nii.gz", "133x", "data.max_resample_growth")
    assert_clean_failure(result, "phantom_003.nii.gz", "implausible voxel spacing 2.5x2.5x1000")
    (cache,) = (tmp_path / "cache").iterdir()
    # The good cases are prepared; nothing of the bad ones, no staging folders, and no
    # fingerprint of an incomplete dataset.
    assert sorted(p.name for p in cache.iterdir()) == ["phantom_000", "phantom_004", "zarr.json"]


def test_train_refuses_the_bad_cases_before_training(bad_dataset, tmp_path):
    overrides = [*tiny_overrides(tmp_path, bad_dataset), "data.phantom=null", PHANTOM_SPACING]
    with pytest.raises(CaseValidationError) as error:
        pipeline.train(compose_config("train", overrides))
    _assert_bad_cases_named(str(error.value), "data.max_resample_growth", "data.preprocess")
    assert len(error.value.problems) == 3
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.fixture
def resampling_checkpoint(trained_run, tmp_path) -> Path:
    """The session's tiny model as if trained with resampling to the phantom's own spacing
    (the same voxels: the weights still fit), so prediction resamples every input."""
    _, run, _ = trained_run
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    checkpoint["hyper_parameters"]["preprocess"]["spacing"] = [2.5, 2.5, 7.5]
    path = tmp_path / "resampling.ckpt"
    torch.save(checkpoint, path)
    return path


def test_predict_refuses_or_pads_each_bad_input_and_writes_the_good_one(
    bad_dataset, resampling_checkpoint, tmp_path
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in ("phantom_000", "phantom_001", "phantom_002", "phantom_003"):
        shutil.copy(bad_dataset / "imagesTr" / f"{case}.nii.gz", inputs)
    output = tmp_path / "out"
    result = run_script(
        "predict.py",
        f"ckpt_path={resampling_checkpoint}",
        f"input={inputs}",
        f"output={output}",
        f"paths.root_dir={tmp_path}",
        "prediction.device=cpu",
    )
    assert_clean_failure(result, "phantom_001.nii.gz", NONFINITE_LINE, "prediction.nonfinite")
    assert_clean_failure(
        result, "phantom_003.nii.gz", "48x48x533 voxels, 133x", "prediction.max_resample_growth"
    )
    assert_clean_failure(result, "phantom_003.nii.gz", "implausible voxel spacing")
    assert "2 of 4 input(s) could not be predicted" in result.stdout + result.stderr
    # The good case and the one-slice case (padded to resample, predicted back onto its own
    # slice) are written on their input's grid; nothing else is.
    assert sorted(p.name for p in output.iterdir()) == ["phantom_000.nii.gz", "phantom_002.nii.gz"]
    for case, shape in (("phantom_000", (48, 48, 16)), ("phantom_002", (48, 48, 1))):
        written, source = nib.load(output / f"{case}.nii.gz"), nib.load(inputs / f"{case}.nii.gz")
        assert written.shape == shape
        np.testing.assert_allclose(written.affine, source.affine)


def _nonfinite_voxel_values(volume: np.ndarray) -> list[float]:
    """[C, x, y, z] volume's first channel at the voxels made non-finite."""
    return [float(volume[0][voxel]) for voxel in NONFINITE]


def test_replace_policy_trains_and_predicts_with_the_stated_value(phantom_root, tmp_path):
    """With nonfinite=replace the NaN/Inf case trains (the prepared volume holds the value,
    windowed) and the checkpoint carries the policy to prediction."""
    dataset = _copy_phantom(phantom_root, tmp_path / "dataset")
    _with_nonfinite_voxels(dataset / "imagesTr" / "phantom_001.nii.gz")
    overrides = [
        *tiny_overrides(tmp_path, dataset),
        "data.phantom=null",
        "data.preprocess.nonfinite=replace",
        f"data.preprocess.nonfinite_value={REPLACEMENT}",
        "test=false",
        "+trainer.limit_val_batches=1",
    ]
    pipeline.train(compose_config("train", overrides))
    low, high = CT_WINDOW
    windowed = (REPLACEMENT - low) * 2 / (high - low) - 1
    (cache,) = (tmp_path / "data" / "cache").iterdir()
    prepared = np.asarray(zarr.open_group(str(cache / "phantom_001"))["image"][:])
    assert np.isfinite(prepared).all()
    assert _nonfinite_voxel_values(prepared) == pytest.approx([windowed] * 3)

    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    predictor = Predictor([load_module(checkpoint)], device="cpu")
    (case,) = find_input_cases(dataset / "imagesTr" / "phantom_001.nii.gz")
    network_input = predictor.preprocessing(case_to_subject(case))["image"].data.numpy()
    assert np.isfinite(network_input).all()
    assert _nonfinite_voxel_values(network_input) == pytest.approx([windowed] * 3)
    run = predict_cases(predictor, [case], tmp_path / "out", progress=False)
    assert run.failures == [] and nib.load(run.written["phantom_001"]).shape == (48, 48, 16)

    # prediction.nonfinite overrides the checkpoint's policy, named in the message.
    strict = Predictor([load_module(checkpoint)], device="cpu", nonfinite="error")
    with pytest.raises(DataError, match=r"phantom_001.nii.gz: 3 non-finite .*prediction\."):
        strict.predict(case)


@pytest.fixture(scope="module")
def nonfinite_zarr(phantom_root, tmp_path_factory) -> Path:
    """Three phantom cases as a Zarr dataset; phantom_001 holds the NaN/Inf voxels."""
    root = tmp_path_factory.mktemp("zarr")
    cases = discover_cases(phantom_root).subset(["phantom_000", "phantom_001", "phantom_004"])
    store = convert_to_zarr(cases, root / "nonfinite.zarr")
    group = zarr.open_group(str(store / "phantom_001"))
    data = group["image"][:].astype(np.float32)  # [C, x, y, z]
    for voxel, value in NONFINITE.items():
        data[(0, *voxel)] = value
    del group["image"]
    group.create_array("image", data=data)
    return store


def test_zarr_dataset_nonfinite_voxels_are_counted_slab_by_slab(nonfinite_zarr, tmp_path):
    dataset = discover_zarr_dataset(nonfinite_zarr)
    settings = preprocess_settings(
        {**ON_STORED_GRID, "intensity": {"mode": "ct_window", "window": list(CT_WINDOW)}}
    )
    with pytest.raises(CaseValidationError) as error:
        prepare_cache(dataset, settings, tmp_path)
    (problem,) = error.value.problems
    assert f"{nonfinite_zarr / 'phantom_001' / 'image'}: {NONFINITE_LINE}" in problem
    (cache,) = tmp_path.iterdir()
    assert sorted(p.name for p in cache.iterdir()) == ["phantom_000", "phantom_004", "zarr.json"]


def test_zarr_dataset_nonfinite_voxels_are_replaced_before_statistics_and_reads(
    nonfinite_zarr, tmp_path
):
    dataset = discover_zarr_dataset(nonfinite_zarr)
    settings = preprocess_settings(
        {
            **ON_STORED_GRID,
            "intensity": {"mode": "zscore"},
            "nonfinite": "replace",
            "nonfinite_value": REPLACEMENT,
        }
    )
    root = prepare_cache(dataset, settings, tmp_path)
    (case,) = open_cases(dataset, settings, root, ["phantom_001"])
    mean, std = case.statistics[0]
    assert np.isfinite([mean, std]).all()
    volume, _ = case.read_volume()
    assert np.isfinite(volume).all()
    assert _nonfinite_voxel_values(volume) == pytest.approx(
        [(REPLACEMENT - mean) / std] * 3, rel=1e-5
    )
    fingerprint = json.loads((root / "fingerprint.json").read_text())
    assert np.isfinite(list(fingerprint["foreground_intensities"]["CT"].values())).all()


def test_nonfinite_labels_are_refused_as_non_integer(phantom_root, tmp_path):
    root = tmp_path / "dataset"
    shutil.copytree(phantom_root, root)
    label = root / "labelsTr" / "phantom_001.nii.gz"
    _with_nonfinite_voxels(label)
    with pytest.raises(CaseValidationError) as error:
        validate_cases(discover_cases(root).subset(["phantom_000", "phantom_001"]))
    assert error.value.problems == [f"phantom_001: {label}: label map has non-integer values"]


def test_policy_and_limit_settings_name_their_keys(trained_run, phantom_root):
    with pytest.raises(
        ConfigError,
        match=r"data.preprocess.nonfinite=replace needs data.preprocess.nonfinite_value",
    ):
        preprocess_settings({"nonfinite": "replace"})
    with pytest.raises(
        ConfigError, match=r"data.preprocess.nonfinite must be one of \['error', 'replace'\]"
    ):
        preprocess_settings({"nonfinite": "skip"})
    with pytest.raises(ConfigError, match=r"data.max_resample_growth must be a number >= 1"):
        SegmentationDataModule(phantom_root, max_resample_growth=0)
    module = load_module(trained_run[1] / "checkpoints" / "last.ckpt")
    with pytest.raises(
        ConfigError, match=r"prediction.nonfinite=replace needs prediction.nonfinite_value"
    ):
        Predictor([module], nonfinite="replace")
    with pytest.raises(
        ConfigError,
        match=r"prediction.nonfinite_value=5 is only used with prediction.nonfinite=replace",
    ):
        Predictor([module], nonfinite_value=5)
    with pytest.raises(ConfigError, match=r"prediction.max_resample_growth must be a number >= 1"):
        Predictor([module], max_resample_growth=-1)


@pytest.mark.parametrize(
    ("spacing", "shape", "warned"),
    [
        ((0.8, 0.8, 2.5), (512, 512, 100), None),
        ((2.5, 2.5, 1000.0), (48, 48, 4), "1000 outside 0.01-50 mm"),
        ((0.001, 0.5, 0.5), (64, 64, 64), "0.001 outside"),
        ((1.0, 1.0, 1.0), (48, 48, 16), "the header may hold no spacing"),
        ((1.0, 1.0, 1.0), (256, 256, 160), None),
    ],
)
def test_implausible_spacings_are_explained(spacing, shape, warned):
    reason = implausible_spacing(spacing, shape)
    assert reason is None if warned is None else warned in reason
