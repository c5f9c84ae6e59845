import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.cases import CaseValidationError, discover_cases, validate_cases
from medseg.errors import DataError

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def make_msd(root: Path, n: int = 3, channels: int = 1, dataset_json: bool = True) -> Path:
    """An MSD folder; with channels > 1 images use nnU-Net's <case>_000c naming."""
    rng = np.random.default_rng(0)
    training = []
    for i in range(n):
        case = f"case_{i:03d}"
        for c in range(channels):
            suffix = f"_{c:04d}" if channels > 1 else ""
            save(
                root / "imagesTr" / f"{case}{suffix}.nii.gz",
                rng.normal(size=(8, 8, 4)).astype(np.float32),
            )
        label = np.zeros((8, 8, 4), np.uint8)
        label[2:5, 2:5, 1:3] = 1
        save(root / "labelsTr" / f"{case}.nii.gz", label)
        training.append(
            {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
        )
    if dataset_json:
        meta = {
            "labels": {"0": "background", "1": "organ"},
            "modality": {str(c): f"MR{c}" for c in range(channels)},
            "training": training,
        }
        (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_discovers_msd_cases_and_labels(tmp_path):
    info = discover_cases(make_msd(tmp_path))
    assert [c.case_id for c in info.cases] == ["case_000", "case_001", "case_002"]
    assert info.labels == {0: "background", 1: "organ"}
    assert info.channels == ("MR0",)
    assert info.cases[0].images == (tmp_path.resolve() / "imagesTr/case_000.nii.gz",)
    validate_cases(info)


def test_nnunet_channel_files_are_grouped_per_case(tmp_path):
    info = discover_cases(make_msd(tmp_path, channels=2))
    assert [p.name for p in info.cases[1].images] == [
        "case_001_0000.nii.gz",
        "case_001_0001.nii.gz",
    ]
    assert info.channels == ("MR0", "MR1")
    validate_cases(info)


def test_scan_without_dataset_json_needs_declared_labels(tmp_path):
    make_msd(tmp_path, channels=2, dataset_json=False)
    with pytest.raises(DataError, match=re.escape("declare one with data.labels=")):
        discover_cases(tmp_path)
    info = discover_cases(tmp_path, labels={0: "background", 1: "organ"})
    assert len(info.cases) == 3 and len(info.cases[0].images) == 2
    assert info.cases[0].label.name == "case_000.nii.gz"


def test_nnunet_v2_label_map_orientation(tmp_path):
    make_msd(tmp_path)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "organ": 1}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    assert discover_cases(tmp_path).labels == {0: "background", 1: "organ"}


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope'} does not exist")):
        discover_cases(tmp_path / "nope")


def test_validation_names_every_bad_file(tmp_path):
    root = make_msd(tmp_path, n=5)
    bad_shape = save(root / "labelsTr/case_001.nii.gz", np.zeros((8, 8, 5), np.uint8))
    wrong_values = np.zeros((8, 8, 4), np.uint8)
    wrong_values[0, 0, 0] = 7
    bad_value = save(root / "labelsTr/case_003.nii.gz", wrong_values)
    shifted = AFFINE.copy()
    shifted[0, 3] = 10.0
    bad_affine = save(root / "labelsTr/case_004.nii.gz", np.zeros((8, 8, 4), np.uint8), shifted)
    with pytest.raises(CaseValidationError) as caught:
        validate_cases(discover_cases(root))
    problems = caught.value.problems
    assert len(problems) == 3
    assert str(bad_shape.resolve()) in problems[0] and "shape (8, 8, 5)" in problems[0]
    assert str(bad_value.resolve()) in problems[1] and "label values [7]" in problems[1]
    assert str(bad_affine.resolve()) in problems[2]
    assert (
        "label grid differs from the image (case_004.nii.gz): a translation of 10 mm"
        in (problems[2])
    )
    assert "3 problem(s) in 5 case(s)" in str(caught.value)


def test_validation_reports_missing_and_corrupt_files(tmp_path):
    root = make_msd(tmp_path)
    (root / "imagesTr/case_000.nii.gz").unlink()
    corrupt = root / "labelsTr/case_002.nii.gz"
    content = corrupt.read_bytes()
    corrupt.write_bytes(content[: len(content) // 2])
    with pytest.raises(CaseValidationError) as caught:
        validate_cases(discover_cases(root))
    text = str(caught.value)
    assert f"case_000: {root.resolve() / 'imagesTr/case_000.nii.gz'}: file does not exist" in text
    assert f"case_002: {corrupt.resolve()}:" in text
    assert "2 problem(s) in 3 case(s)" in text


def test_validation_checks_the_channel_count(tmp_path):
    root = make_msd(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "FLAIR", "1": "T1c"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(CaseValidationError, match="has 1 channel"):
        validate_cases(discover_cases(root))
