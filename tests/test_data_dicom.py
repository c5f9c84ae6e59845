"""A DICOM series folder is accepted as an image wherever a NIfTI file is."""

import json
import locale
import shutil
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813 (the conventional name)

from medseg.data.cache import open_cases, prepare_cache
from medseg.data.cases import CaseValidationError, discover_cases, validate_cases
from medseg.data.preprocess import preprocess_settings
from medseg.prediction import Predictor, find_input_cases, write_prediction

from .test_prediction import oracle_module


def write_dicom_series(nifti: Path, folder: Path) -> None:
    """One CT slice per file with the geometry tags readers need (SimpleITK's recipe)."""
    image = sitk.ReadImage(str(nifti))
    folder.mkdir(parents=True)
    direction = image.GetDirection()
    orientation = [
        direction[0],
        direction[3],
        direction[6],
        direction[1],
        direction[4],
        direction[7],
    ]
    shared = {
        "0008|0060": "CT",
        "0008|103e": nifti.name,
        "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
        "0020|000e": "1.2.826.0.1.3680043.2.1125.1." + str(zlib.crc32(nifti.name.encode())),
        "0020|0037": "\\".join(f"{v:.6f}" for v in orientation),
        "0018|0050": str(image.GetSpacing()[2]),
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    # GDCM's writer sets the process locale to "C" (ASCII), which would make every later
    # subprocess output in the test session fail to decode: restore it.
    saved = locale.setlocale(locale.LC_ALL)
    try:
        for index in range(image.GetDepth()):
            piece = image[:, :, index]
            for tag, value in shared.items():
                piece.SetMetaData(tag, value)
            position = image.TransformIndexToPhysicalPoint((0, 0, index))
            piece.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))
            piece.SetMetaData("0020|0013", str(index + 1))
            writer.SetFileName(str(folder / f"slice_{index:03d}.dcm"))
            writer.Execute(piece)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture(scope="module")
def dicom_dataset(phantom_root, tmp_path_factory) -> Path:
    """Three phantom cases whose images are DICOM folders (labels stay NIfTI)."""
    root = tmp_path_factory.mktemp("dicom") / "ds"
    (root / "labelsTr").mkdir(parents=True)
    for index in range(3):
        name = f"phantom_{index:03d}"
        write_dicom_series(phantom_root / "imagesTr" / f"{name}.nii.gz", root / "imagesTr" / name)
        shutil.copy(phantom_root / "labelsTr" / f"{name}.nii.gz", root / "labelsTr")
    meta = json.loads((phantom_root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({"labels": meta["labels"]}))
    return root


def test_dicom_folders_are_discovered_validated_and_prepared_like_nifti(
    dicom_dataset, phantom_root, tmp_path
):
    dataset = discover_cases(dicom_dataset)
    assert [c.case_id for c in dataset.cases] == ["phantom_000", "phantom_001", "phantom_002"]
    assert all(c.images[0].is_dir() for c in dataset.cases)
    validate_cases(dataset)  # shapes and affines agree with the NIfTI labels

    settings = preprocess_settings({"intensity": {"mode": "ct_window", "window": [-160, 240]}})
    from_dicom = open_cases(
        dataset, settings, prepare_cache(dataset, settings, tmp_path), ["phantom_001"]
    )
    nifti = discover_cases(phantom_root)
    from_nifti = open_cases(nifti, settings, None, ["phantom_001"])
    image, label = from_dicom[0].read_volume()
    expected_image, expected_label = from_nifti[0].read_volume()
    np.testing.assert_allclose(image, expected_image, atol=1e-6)
    np.testing.assert_array_equal(label, expected_label)
    np.testing.assert_allclose(from_dicom[0].affine, from_nifti[0].affine, atol=1e-4)


def test_a_folder_without_dicom_files_is_reported(dicom_dataset, tmp_path):
    root = Path(shutil.copytree(dicom_dataset, tmp_path / "ds"))
    for file in (root / "imagesTr" / "phantom_002").iterdir():
        file.unlink()
    with pytest.raises(CaseValidationError, match=r"phantom_002: .*cannot be read as a DICOM"):
        validate_cases(discover_cases(root))


def test_dicom_series_are_predicted_in_their_own_geometry(phantom_root, tmp_path):
    label_file = phantom_root / "labelsTr" / "phantom_004.nii.gz"
    label = nib.load(label_file)
    as_image = tmp_path / "label_as_image.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj).astype(np.int16), label.affine), as_image)
    write_dicom_series(as_image, tmp_path / "inputs" / "series_a")
    # A folder of series, or one series folder.
    assert [c.case_id for c in find_input_cases(tmp_path / "inputs")] == ["series_a"]
    (case,) = find_input_cases(tmp_path / "inputs" / "series_a")
    written = write_prediction(Predictor([oracle_module()]).predict(case), tmp_path / "out")
    output = nib.load(written)
    np.testing.assert_allclose(output.affine, label.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(output.dataobj), np.asarray(label.dataobj))
