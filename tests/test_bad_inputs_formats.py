"""Bad-input suite for image formats and geometry: NRRD and MetaImage wherever NIfTI is read,
unknown extensions, DICOM series with a missing slice, labels stored on a flipped grid.

Every input is generated from the phantom inside the test; the entry points run as a user
runs them (prepare = scripts/prepare.py, train = src/train.py, predict = src/predict.py,
eval = src/eval.py). Each case checks the exit status, the one line naming the file and the
problem, no traceback, the good files still processed and nothing half-written.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813 (the conventional name)

from medseg import pipeline
from medseg.data.cache import cache_location, open_cases, prepare_cache
from medseg.data.cases import CaseValidationError, discover_cases, validate_cases
from medseg.data.image_io import ReadOptions
from medseg.data.preprocess import preprocess_settings
from medseg.data.splits import split_cases
from medseg.errors import DataError
from medseg.prediction import Predictor, find_input_cases, write_prediction

from .conftest import (
    SHARED_DATA,
    TINY_MODEL,
    assert_clean_failure,
    compose_config,
    run_script,
    tiny_data_overrides,
)
from .test_data_dicom import write_dicom_series
from .test_prediction import flip_affine, oracle_module

LABELS = "{0: background, 1: liver, 2: lesion}"
SETTINGS = {"intensity": {"mode": "ct_window", "window": [-160, 240]}}
CASES = [f"phantom_{i:03d}" for i in range(8)]
ENDINGS = {"phantom_002": ".nrrd", "phantom_004": ".mha"}


def convert(source: Path, target: Path) -> Path:
    """`source` saved by SimpleITK in the format of `target`'s ending, geometry only."""
    image = sitk.ReadImage(str(source))
    for key in image.GetMetaDataKeys():
        image.EraseMetaData(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(target))
    return target


def save_flipped(source: Path, target: Path, axes: list[int]) -> Path:
    """The same voxels stored with `axes` reversed: another affine, the same world grid."""
    image = nib.load(source)
    data = np.asanyarray(image.dataobj)
    flipped = np.ascontiguousarray(np.flip(data, axes))
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(flipped, flip_affine(image.affine, data.shape, axes)), target)
    return target


def dicom_with_a_missing_slice(source: Path, folder: Path, missing: int = 7) -> Path:
    write_dicom_series(source, folder)
    (folder / f"slice_{missing:03d}.dcm").unlink()
    return folder


def link(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source)
    return target


def geometry(path: Path) -> tuple:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetSize(), reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection()


def voxels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def read_rows(run: Path) -> list[dict]:
    with (run / "test_metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


@pytest.fixture(scope="module")
def formats_dataset(phantom_root, tmp_path_factory) -> Path:
    """The phantom with phantom_002 as NRRD stored LPS, phantom_004 as MetaImage (images and
    labels; the two test cases of the tiny split), phantom_000's label stored with axis 0 flipped
    (LAS of a RAS image), and a stray text file."""
    root = tmp_path_factory.mktemp("formats") / "ds"
    for case_id in CASES:
        for folder in ("imagesTr", "labelsTr"):
            source = phantom_root / folder / f"{case_id}.nii.gz"
            if case_id == "phantom_002":  # stored LPS: reads as RAS, like the NIfTI
                lps = save_flipped(source, root.parent / "lps" / folder / source.name, [0, 1])
                convert(lps, root / folder / f"{case_id}.nrrd")
            elif case_id in ENDINGS:
                convert(source, root / folder / f"{case_id}{ENDINGS[case_id]}")
            elif case_id == "phantom_000" and folder == "labelsTr":
                save_flipped(source, root / folder / f"{case_id}.nii.gz", [0])
            else:
                link(source, root / folder / source.name)
    (root / "imagesTr" / "README.txt").write_text("not an image")
    meta = json.loads((phantom_root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({"labels": meta["labels"]}))
    return root


def test_nrrd_mha_and_flipped_label_cases_prepare_like_their_nifti_originals(
    formats_dataset, phantom_root, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING):
        dataset = discover_cases(formats_dataset, reading=ReadOptions(reorient_labels=True))
    assert "README.txt" in caplog.text  # skipped, with a warning
    assert [c.case_id for c in dataset.cases] == CASES  # every known ending dropped
    assert [p.name for p in (*dataset.cases[2].images, dataset.cases[2].label)] == [
        "phantom_002.nrrd",
        "phantom_002.nrrd",
    ]
    assert dataset.cases[4].images[0].name == "phantom_004.mha"
    validate_cases(dataset)
    settings = preprocess_settings(SETTINGS)
    root = prepare_cache(dataset, settings, tmp_path)
    plain = discover_cases(formats_dataset)
    assert cache_location(tmp_path, plain, settings) != root  # the option keys the cache
    ids = ["phantom_000", "phantom_002", "phantom_004"]
    prepared = open_cases(dataset, settings, root, ids)
    expected = open_cases(discover_cases(phantom_root), settings, None, ids)
    for case, original in zip(prepared, expected, strict=True):
        image, label = case.read_volume()
        expected_image, expected_label = original.read_volume()
        np.testing.assert_array_equal(image, expected_image)
        np.testing.assert_array_equal(label, expected_label)
        np.testing.assert_allclose(case.affine, original.affine, atol=1e-6)


@pytest.fixture(scope="module")
def formats_run(formats_dataset, tmp_path_factory) -> Path:
    """A tiny training run on the formats dataset with data.reorient_labels=true (the run
    folder); its checkpoint predicts the inputs below."""
    root = tmp_path_factory.mktemp("formats_run")
    overrides = [o for o in tiny_data_overrides(root, formats_dataset) if "phantom" not in o]
    cfg = compose_config(
        "train",
        [
            "data=msd",
            *overrides,
            *TINY_MODEL,
            f"paths.output_dir={root}/run",
            f"data.cache_dir={root}/cache",
            "data.reorient_labels=true",
        ],
    )
    pipeline.train(cfg)
    return root / "run"


def test_evaluation_follows_data_reorient_labels():
    assert compose_config("eval", ["data.reorient_labels=true"]).evaluation.reorient_labels
    assert not compose_config("eval").evaluation.reorient_labels


def test_training_on_nrrd_mha_and_a_reoriented_label_predicts_the_test_cases_in_kind(
    formats_run, formats_dataset
):
    test_cases = split_cases(CASES, 0.25, 2, 0, 0).test
    assert sorted(test_cases) == sorted(ENDINGS)
    written = sorted(p.name for p in (formats_run / "predictions").iterdir())
    assert written == ["phantom_002.nrrd", "phantom_004.mha"]
    for name in written:
        assert geometry(formats_run / "predictions" / name) == geometry(
            formats_dataset / "imagesTr" / name
        )
    assert sorted(row["case_id"] for row in read_rows(formats_run)) == sorted(test_cases)


@pytest.fixture(scope="module")
def bad_dataset(phantom_root, tmp_path_factory) -> Path:
    """A dataset.json training list with good NIfTI cases, an image of unknown format
    (phantom_004.img), a DICOM series missing a slice (phantom_005) and a label stored with
    axis 1 flipped (phantom_006)."""
    root = tmp_path_factory.mktemp("bad") / "ds"
    images, labels = phantom_root / "imagesTr", phantom_root / "labelsTr"
    training = []
    for case_id in CASES:
        image = f"imagesTr/{case_id}.nii.gz"
        if case_id == "phantom_004":
            image = f"imagesTr/{case_id}.img"
            (root / image).parent.mkdir(parents=True, exist_ok=True)
            (root / image).write_bytes(b"\x00" * 512)
        elif case_id == "phantom_005":
            image = f"imagesTr/{case_id}"
            dicom_with_a_missing_slice(images / f"{case_id}.nii.gz", root / image)
        else:
            link(images / f"{case_id}.nii.gz", root / image)
        label = root / "labelsTr" / f"{case_id}.nii.gz"
        if case_id == "phantom_006":
            save_flipped(labels / label.name, label, [1])
        else:
            link(labels / label.name, label)
        training.append({"image": f"./{image}", "label": f"./labelsTr/{label.name}"})
    meta = json.loads((phantom_root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({"labels": meta["labels"], "training": training}))
    return root.resolve()


def test_prepare_cli_names_every_bad_case_and_writes_nothing(bad_dataset, tmp_path):
    result = run_script(
        "scripts/prepare.py",
        "data=msd",
        f"data.root={bad_dataset}",
        f"data.cache_dir={tmp_path}/cache",
        f"paths.root_dir={tmp_path}",
    )
    assert_clean_failure(
        result,
        f"phantom_004.img: {bad_dataset}/imagesTr/phantom_004.img",
        "unknown image format '.img'; medseg reads NIfTI (.nii.gz .nii), NRRD (.nrrd .nhdr), "
        "MetaImage (.mha .mhd) or a folder holding one DICOM series",
    )
    assert_clean_failure(
        result,
        f"phantom_005: {bad_dataset}/imagesTr/phantom_005: slice positions are not evenly "
        "spaced: 7.5 mm expected, 15 mm between slices 7 and 8 (slice_006.dcm, slice_008.dcm; "
        "a missing slice?): set data.dicom.nonuniform_slices=resample",
    )
    assert_clean_failure(
        result,
        f"phantom_006: {bad_dataset}/labelsTr/phantom_006.nii.gz: label grid differs from the "
        "image (phantom_006.nii.gz): a flip of axis 1 (the same world grid): set "
        "data.reorient_labels=true to reorient the label onto the image grid",
    )
    assert "3 problem(s) in 8 case(s)" in result.stdout + result.stderr
    assert not list((tmp_path / "cache").rglob("*"))  # nothing prepared, nothing half-written


def test_the_options_resample_the_gapped_series_and_reorient_the_flipped_label(
    bad_dataset, phantom_root, tmp_path
):
    reading = ReadOptions(nonuniform_slices="resample", reorient_labels=True)
    ids = ["phantom_005", "phantom_006"]
    dataset = discover_cases(bad_dataset, reading=reading).subset(ids)
    validate_cases(dataset)
    settings = preprocess_settings(SETTINGS)
    gapped, flipped = open_cases(dataset, settings, prepare_cache(dataset, settings, tmp_path), ids)
    expected = open_cases(discover_cases(phantom_root), settings, None, ids)
    image, label = gapped.read_volume()
    expected_image, expected_label = expected[0].read_volume()
    np.testing.assert_allclose(gapped.affine, expected[0].affine, atol=1e-4)
    kept = [z for z in range(16) if z != 7]  # slice 7 is interpolated from its neighbours
    np.testing.assert_allclose(image[..., kept], expected_image[..., kept], atol=1e-6)
    neighbours = expected_image[..., [6, 8]]  # intensity windowing keeps the order
    assert np.all(image[..., 7] >= neighbours.min(-1) - 1e-6)
    assert np.all(image[..., 7] <= neighbours.max(-1) + 1e-6)
    np.testing.assert_array_equal(label, expected_label)
    np.testing.assert_array_equal(flipped.read_volume()[1], expected[1].read_volume()[1])


def test_predict_cli_writes_each_input_in_its_format_and_names_the_gapped_series(
    formats_run, phantom_root, tmp_path
):
    images, inputs = phantom_root / "imagesTr", tmp_path / "inputs"
    lps = save_flipped(images / "phantom_000.nii.gz", tmp_path / "lps.nii.gz", [0, 1])
    convert(lps, inputs / "lps_case.nrrd")
    convert(images / "phantom_001.nii.gz", inputs / "mr_case.mha")
    link(images / "phantom_002.nii.gz", inputs / "ct_case.nii.gz")
    dicom_with_a_missing_slice(images / "phantom_003.nii.gz", inputs / "gapped")
    (inputs / "notes.txt").write_text("not an image")
    output = tmp_path / "out"
    result = run_script(
        "predict.py",
        f"ckpt_path={formats_run / 'checkpoints' / 'last.ckpt'}",
        f"input={inputs}",
        f"output={output}",
        f"paths.root_dir={tmp_path}",
    )
    assert_clean_failure(
        result,
        f"{inputs / 'gapped'}: slice positions are not evenly spaced: 7.5 mm expected, 15 mm "
        "between slices 7 and 8 (slice_006.dcm, slice_008.dcm; a missing slice?): set "
        "dicom.nonuniform_slices=resample",
    )
    log = result.stdout + result.stderr
    assert "1 of 4 input(s) could not be predicted" in log
    assert "skipping 1 file(s) of no image format" in log and "notes.txt" in log
    written = ["ct_case.nii.gz", "lps_case.nrrd", "mr_case.mha"]
    assert sorted(p.name for p in output.iterdir()) == written
    for name in written:
        assert geometry(output / name) == geometry(inputs / name)
        assert set(np.unique(voxels(output / name)).tolist()) <= {0, 1, 2}


def test_a_single_input_of_unknown_format_is_an_error_not_zero_cases(tmp_path):
    """(The predict CLI turns this DataError into its one line, as for the folder above.)"""
    scan = tmp_path / "scan.img"
    scan.write_bytes(b"\x00" * 512)
    message = (
        f"{scan}: unknown image format '.img'; medseg reads NIfTI (.nii.gz .nii), NRRD (.nrrd "
        ".nhdr), MetaImage (.mha .mhd) or a folder holding one DICOM series"
    )
    with pytest.raises(DataError, match=re.escape(message)):
        find_input_cases(scan)


def label_as_image(phantom_root: Path, case_id: str, target: Path) -> Path:
    """The case's label map as an int16 image: the oracle module predicts it back."""
    label = nib.load(phantom_root / "labelsTr" / f"{case_id}.nii.gz")
    data = np.asanyarray(label.dataobj).astype(np.int16)
    nib.save(nib.Nifti1Image(data, label.affine), target)
    return target


def test_resampled_series_and_nifti_output_keep_the_world_grid(phantom_root, tmp_path):
    image = label_as_image(phantom_root, "phantom_005", tmp_path / "label_image.nii.gz")
    expected = nib.load(phantom_root / "labelsTr" / "phantom_005.nii.gz")
    reading = ReadOptions(nonuniform_slices="resample", config_prefix="")
    predictor = Predictor([oracle_module()], reading=reading)
    (gapped,) = find_input_cases(dicom_with_a_missing_slice(image, tmp_path / "gapped"))
    written = nib.load(write_prediction(predictor.predict(gapped), tmp_path / "out"))
    assert written.shape == expected.shape  # the even grid spans the first to the last slice
    np.testing.assert_allclose(written.affine, expected.affine, atol=1e-4)
    kept = [z for z in range(16) if z != 7]
    np.testing.assert_array_equal(
        np.asanyarray(written.dataobj)[..., kept], np.asanyarray(expected.dataobj)[..., kept]
    )
    (nrrd,) = find_input_cases(convert(image, tmp_path / "case.nrrd"))
    prediction = predictor.predict(nrrd)
    as_input = write_prediction(prediction, tmp_path / "out")
    as_nifti = write_prediction(prediction, tmp_path / "out", output_format="nifti")
    assert (as_input.name, as_nifti.name) == ("case.nrrd", "case.nii.gz")
    assert geometry(as_input) == geometry(tmp_path / "case.nrrd")
    np.testing.assert_allclose(nib.load(as_nifti).affine, expected.affine, atol=1e-6)
    for path in (as_input, as_nifti):
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(path))),
            sitk.GetArrayFromImage(
                sitk.ReadImage(str(phantom_root / "labelsTr/phantom_005.nii.gz"))
            ),
        )
    assert no_temporary_files(tmp_path / "out")


def test_truncated_nrrd_and_missing_mhd_data_are_errors_not_zeros(phantom_root, tmp_path):
    root = tmp_path / "ds"
    for case_id in CASES:
        for folder in ("imagesTr", "labelsTr"):
            link(phantom_root / folder / f"{case_id}.nii.gz", root / folder / f"{case_id}.nii.gz")
    meta = json.loads((phantom_root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({"labels": meta["labels"]}))
    labels, images = root / "labelsTr", root / "imagesTr"
    (labels / "phantom_000.nii.gz").unlink()
    truncated = convert(phantom_root / "labelsTr/phantom_000.nii.gz", labels / "phantom_000.nrrd")
    truncated.write_bytes(truncated.read_bytes()[:-2000])
    with pytest.raises(CaseValidationError) as caught:
        validate_cases(discover_cases(root))
    (problem,) = caught.value.problems
    assert problem.startswith(f"phantom_000: {truncated.resolve()}: cannot be read as a NRRD")
    truncated.unlink()
    link(phantom_root / "labelsTr/phantom_000.nii.gz", labels / "phantom_000.nii.gz")
    (images / "phantom_001.nii.gz").unlink()
    detached = convert(phantom_root / "imagesTr/phantom_001.nii.gz", images / "phantom_001.mhd")
    detached.with_suffix(".raw").unlink()
    settings = preprocess_settings(SETTINGS)
    dataset = discover_cases(root)
    with pytest.raises(CaseValidationError) as caught:
        prepare_cache(dataset, settings, tmp_path / "cache")
    (problem,) = caught.value.problems
    assert problem.startswith(f"phantom_001: {detached.resolve()}: cannot be read as a MetaImage")
    cache = cache_location(tmp_path / "cache", dataset, settings)
    prepared = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert prepared == [c for c in CASES if c != "phantom_001"]  # the others were prepared


@pytest.fixture
def eval_folders(phantom_root, tmp_path) -> tuple[Path, Path]:
    """NRRD predictions (the labels themselves) and NIfTI references, phantom_001's stored
    with axis 1 flipped."""
    predictions, references = tmp_path / "predictions", tmp_path / "references"
    for case_id in CASES[:3]:
        label = phantom_root / "labelsTr" / f"{case_id}.nii.gz"
        convert(label, predictions / f"{case_id}.nrrd")
        if case_id == "phantom_001":
            save_flipped(label, references / label.name, [1])
        else:
            link(label, references / label.name)
    return predictions, references


def test_eval_names_a_flipped_reference_and_scores_it_with_the_option(eval_folders, tmp_path):
    predictions, references = eval_folders
    overrides = [
        f"pred_dir={predictions}",
        f"label_dir={references}",
        f"labels={LABELS}",
        f"paths.root_dir={tmp_path}",
        "evaluation.worst_cases=0",
    ]
    result = run_script("eval.py", *overrides, f"paths.output_dir={tmp_path}/plain")
    assert_clean_failure(
        result,
        f"{predictions / 'phantom_001.nrrd'}: prediction grid differs from the reference "
        f"{references / 'phantom_001.nii.gz'}: a flip of axis 1 (the same world grid): set "
        "evaluation.reorient_labels=true to reorient the reference onto the prediction grid",
    )
    assert [row["case_id"] for row in read_rows(tmp_path / "plain")] == [
        "phantom_000",
        "phantom_002",
    ]
    cfg = compose_config(
        "eval",
        [*overrides, f"paths.output_dir={tmp_path}/reoriented", "evaluation.reorient_labels=true"],
    )
    pipeline.evaluate(cfg)
    rows = read_rows(tmp_path / "reoriented")
    assert [row["case_id"] for row in rows] == CASES[:3]
    assert all(float(row["dice_liver"]) == 1.0 for row in rows)


@pytest.mark.skipif(
    not (SHARED_DATA / "totalseg_ct" / "mr_sm").is_dir(),
    reason="../shared/data/totalseg_ct is absent",
)
def test_totalsegmentator_mr_liver_stored_las_is_reported_and_reoriented(tmp_path):
    """The real LPS MR case with its liver map stored LAS (axis 1 flipped)."""
    source = SHARED_DATA / "totalseg_ct" / "mr_sm"
    root = tmp_path / "ds"
    link(source / "example_mr_sm.nii.gz", root / "imagesTr" / "mr.nii.gz")
    label = save_flipped(source / "example_seg_mr_liver.nii.gz", root / "labelsTr/mr.nii.gz", [1])
    assert nib.aff2axcodes(nib.load(label).affine) == ("L", "A", "S")
    labels = {0: "background", 1: "liver"}
    with pytest.raises(CaseValidationError, match=r"a flip of axis 1 \(the same world grid\)"):
        validate_cases(discover_cases(root, labels))
    reading = ReadOptions(reorient_labels=True)
    dataset = discover_cases(root, labels, reading=reading)
    validate_cases(dataset)
    settings = preprocess_settings({"canonical": False})
    (case,) = open_cases(dataset, settings, None, ["mr"])
    original = nib.load(source / "example_seg_mr_liver.nii.gz")
    np.testing.assert_array_equal(case.read_volume()[1][0], np.asanyarray(original.dataobj))
