"""Tests for the synthetic CT phantom (medseg.data.phantom)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from medseg.data import phantom
from medseg.data.phantom import (
    FORMAT_VERSION,
    PhantomCase,
    case_seed,
    generate_case,
    phantom_affine,
    write_phantom_dataset,
)
from medseg.errors import DataError

SHAPE = (48, 48, 16)
SPACING = (2.0, 2.0, 5.0)
SEEDS = range(8)
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_phantom.py"


@pytest.fixture(scope="module")
def cases() -> list[PhantomCase]:
    return [generate_case(seed, SHAPE, SPACING) for seed in SEEDS]


@pytest.fixture(scope="module")
def lesion_cases(cases: list[PhantomCase]) -> list[PhantomCase]:
    with_lesions = [case for case in cases if case.num_lesions > 0]
    assert len(with_lesions) >= 3
    return with_lesions


def world_x(case: PhantomCase) -> np.ndarray:
    """World x (mm) of every voxel column along the first array axis."""
    return case.affine[0, 0] * np.arange(case.image.shape[0]) + case.affine[0, 3]


def test_same_seed_gives_identical_case() -> None:
    first, second = generate_case(5, SHAPE, SPACING), generate_case(5, SHAPE, SPACING)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.label, second.label)
    np.testing.assert_array_equal(first.affine, second.affine)
    assert first.num_lesions == second.num_lesions
    assert first.liver_volume_ml == second.liver_volume_ml


def test_different_seeds_give_different_cases(cases: list[PhantomCase]) -> None:
    assert not np.array_equal(cases[0].image, cases[1].image)
    assert not np.array_equal(cases[0].label, cases[1].label)


def test_default_case_shape_and_types() -> None:
    case = generate_case(0)
    assert case.image.shape == case.label.shape == (160, 160, 48)
    assert case.image.dtype == np.int16
    assert case.label.dtype == np.uint8
    assert case.affine.dtype == np.float64
    np.testing.assert_allclose(np.diag(case.affine)[:3], (0.8, 0.8, 2.5))


def test_intensities_are_plausible_hounsfield_units(cases: list[PhantomCase]) -> None:
    for case in cases:
        image, label = case.image, case.label
        assert image.dtype == np.int16
        assert image.min() >= -1024
        assert image.max() <= 3071
        assert set(np.unique(label).tolist()) <= {0, 1, 2}
        corners = image[[0, 0, -1, -1], [0, -1, 0, -1], :]
        assert abs(float(corners.mean()) + 1000.0) < 10.0
        assert 50.0 <= float(image[label == 1].mean()) <= 70.0
        assert image.max() > 300  # the spine is there


def test_lesions_are_clearly_hypodense(lesion_cases: list[PhantomCase]) -> None:
    for case in lesion_cases:
        liver_mean = float(case.image[case.label == 1].mean())
        lesion_mean = float(case.image[case.label == 2].mean())
        assert lesion_mean <= liver_mean - 25.0


def test_liver_is_brighter_than_surrounding_soft_tissue() -> None:
    case = generate_case(2)
    liver = case.label == 1
    shell = ndi.binary_dilation(case.label > 0, iterations=8) & ~ndi.binary_dilation(
        case.label > 0, iterations=4
    )
    soft = shell & (case.image > -30) & (case.image < 150)  # excludes air, fat and bone
    assert float(case.image[liver].mean()) - float(case.image[soft].mean()) > 12.0


def test_lesion_neighbours_are_liver_or_lesion(lesion_cases: list[PhantomCase]) -> None:
    for case in lesion_cases:
        organ = np.pad(case.label > 0, 1)
        lesion = np.pad(case.label == 2, 1)
        for axis in range(3):
            for shift in (-1, 1):
                assert np.all(np.roll(organ, shift, axis=axis)[lesion])


def test_liver_is_one_connected_component(cases: list[PhantomCase]) -> None:
    for case in cases:
        assert ndi.label(case.label > 0)[1] == 1


def test_liver_lies_on_patients_right(cases: list[PhantomCase]) -> None:
    # RAS+: world +x points to the patient's Right (nibabel axis codes name the positive end).
    for case in cases:
        xs = world_x(case)[np.nonzero(case.label > 0)[0]]
        assert xs.mean() > 10.0
        assert np.mean(xs > 0) > 0.8


def test_spine_is_posterior() -> None:
    case = generate_case(1, SHAPE, SPACING)
    ys = case.affine[1, 1] * np.nonzero(case.image > 300)[1] + case.affine[1, 3]
    assert ys.mean() < -5.0


def test_affine_is_ras_with_requested_spacing(cases: list[PhantomCase]) -> None:
    for case in cases:
        np.testing.assert_allclose(np.linalg.norm(case.affine[:3, :3], axis=0), SPACING)
        assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
        centre = case.affine @ np.array([*((np.array(SHAPE) - 1) / 2.0), 1.0])
        np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)


def test_num_lesions_and_volume_match_label(cases: list[PhantomCase]) -> None:
    voxel_ml = float(np.prod(SPACING)) / 1000.0
    for case in cases:
        assert case.num_lesions == ndi.label(case.label == 2)[1]
        assert case.num_lesions == ndi.label(case.label == 2, np.ones((3, 3, 3)))[1]
        expected = np.count_nonzero(case.label) * voxel_ml
        assert case.liver_volume_ml == pytest.approx(expected)


def test_lesion_counts_cover_zero_to_three() -> None:
    # Same field of view as the default volume, at a coarser (faster) resolution.
    counts = Counter(
        generate_case(case_seed(0, i), (80, 80, 24), (1.6, 1.6, 5.0)).num_lesions for i in range(30)
    )
    assert set(counts) == {0, 1, 2, 3}
    assert sum(n for k, n in counts.items() if k > 0) >= 0.75 * 30


def test_max_lesions_zero_gives_no_lesions() -> None:
    case = generate_case(4, SHAPE, SPACING, max_lesions=0)
    assert case.num_lesions == 0
    assert not np.any(case.label == 2)


def test_case_seed_does_not_depend_on_case_count() -> None:
    children = np.random.SeedSequence(7).spawn(3)
    expected = [int(child.generate_state(1, dtype=np.uint32)[0]) for child in children]
    assert [case_seed(7, i) for i in range(3)] == expected
    assert len({case_seed(7, i) for i in range(3)}) == 3


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="spacing"):
        generate_case(0, SHAPE, (2.0, 0.0, 5.0))
    with pytest.raises(ValueError, match="max_lesions"):
        generate_case(0, SHAPE, SPACING, max_lesions=-1)


def write_small(root: Path, num_cases: int = 3, seed: int = 0) -> Path:
    return write_phantom_dataset(
        root, num_cases=num_cases, seed=seed, shape=SHAPE, spacing=SPACING, max_lesions=3
    )


def file_mtimes(root: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}


def test_write_dataset_layout_and_json(tmp_path: Path) -> None:
    root = write_small(str(tmp_path / "phantom"))
    assert root == tmp_path / "phantom"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantom"]
    meta = json.loads((root / "dataset.json").read_text())
    names = [f"phantom_{i:03d}.nii.gz" for i in range(3)]
    assert meta["name"] == "Phantom"
    assert meta["tensorImageSize"] == "3D"
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "lesion"}
    assert meta["numTraining"] == 3
    assert meta["numTest"] == 0
    assert meta["test"] == []
    assert meta["training"] == [
        {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"} for name in names
    ]
    assert meta["medseg_phantom"] == {
        "format_version": FORMAT_VERSION,
        "num_cases": 3,
        "seed": 0,
        "shape": list(SHAPE),
        "spacing": list(SPACING),
        "max_lesions": 3,
    }
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == names
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == names


def test_written_files_match_generated_cases(tmp_path: Path) -> None:
    root = write_small(tmp_path / "phantom", num_cases=2, seed=3)
    for index in range(2):
        case = generate_case(case_seed(3, index), SHAPE, SPACING)
        image = nib.load(root / "imagesTr" / f"phantom_{index:03d}.nii.gz")
        label = nib.load(root / "labelsTr" / f"phantom_{index:03d}.nii.gz")
        assert image.get_data_dtype() == np.int16
        assert label.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(image.dataobj), case.image)
        np.testing.assert_array_equal(np.asarray(label.dataobj), case.label)
        for loaded in (image, label):
            np.testing.assert_allclose(loaded.affine, phantom_affine(SHAPE, SPACING), atol=1e-5)
            assert nib.aff2axcodes(loaded.affine) == ("R", "A", "S")
            assert int(loaded.header["qform_code"]) == 1
            assert int(loaded.header["sform_code"]) == 1
            assert loaded.header.get_xyzt_units()[0] == "mm"


def test_second_call_with_same_params_rewrites_nothing(tmp_path: Path) -> None:
    root = write_small(tmp_path / "phantom")
    before = file_mtimes(root)
    assert write_small(tmp_path / "phantom") == root
    assert file_mtimes(root) == before
    assert len(before) == 8  # 3 images, 3 labels, dataset.json, targets.tsv


def test_call_with_other_params_regenerates(tmp_path: Path) -> None:
    root = write_small(tmp_path / "phantom", num_cases=2, seed=0)
    old_image = np.asarray(nib.load(root / "imagesTr" / "phantom_000.nii.gz").dataobj)
    write_small(root, num_cases=3, seed=1)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["medseg_phantom"]["seed"] == 1
    assert meta["numTraining"] == 3
    new_image = np.asarray(nib.load(root / "imagesTr" / "phantom_000.nii.gz").dataobj)
    assert not np.array_equal(old_image, new_image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantom"]


def test_refuses_folder_that_is_not_a_phantom(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a medseg phantom") as error:
        write_small(root)
    assert str(root) in str(error.value)
    assert [p.name for p in root.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_refuses_foreign_msd_dataset(tmp_path: Path) -> None:
    root = tmp_path / "Task03_Liver"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"name": "Liver"}))
    with pytest.raises(DataError, match="Task03_Liver"):
        write_small(root)
    assert json.loads((root / "dataset.json").read_text()) == {"name": "Liver"}


def test_empty_existing_folder_is_filled(tmp_path: Path) -> None:
    root = tmp_path / "phantom"
    root.mkdir()
    write_small(root, num_cases=1)
    assert (root / "dataset.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantom"]


def test_concurrent_writer_that_finishes_first_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that does not take the lock (an older medseg, a file system without flock)
    installs the same phantom while this one is still generating."""
    root = tmp_path / "phantom"
    original = phantom._write_all
    raced: list[dict[Path, int]] = []

    def write_then_lose_race(staging: Path, params: dict) -> None:
        original(staging, params)
        if not raced:  # the "other writer" installs first
            other = tmp_path / "other"
            other.mkdir()
            original(other, params)
            other.rename(root)
            raced.append(file_mtimes(root))

    monkeypatch.setattr(phantom, "_write_all", write_then_lose_race)
    write_small(root, num_cases=2)
    assert raced
    assert file_mtimes(root) == raced[0]  # the winner's files were kept untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantom"]


def test_failed_generation_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(staging: Path, params: dict) -> None:
        (staging / "imagesTr").mkdir()
        raise RuntimeError("disk full")

    monkeypatch.setattr(phantom, "_write_all", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        write_small(tmp_path / "phantom")
    assert list(tmp_path.iterdir()) == []


def test_make_phantom_script(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    grid = ["--shape", *map(str, SHAPE), "--spacing", *map(str, SPACING)]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--num-cases", "2", "--seed", "1", *grid],
        capture_output=True,
        text=True,
        check=True,
    )
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 2
    assert meta["medseg_phantom"]["seed"] == 1
    assert result.stdout.startswith("2 phantom cases")
    assert str(out) in result.stdout
