"""How two voxel grids differ, exact reorientation, and the messages that use them."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medseg.data.alignment import grid_difference, reorient_to_grid
from medseg.evaluation import ScoringPair, score_pairs

from .test_prediction import flip_affine, rotation_z

SHAPE = (8, 9, 4)
AFFINE = np.array([[1.5, 0, 0, 10], [0, 1.5, 0, 20], [0, 0, 3.0, 30], [0, 0, 0, 1]])


def shifted(affine: np.ndarray, offset) -> np.ndarray:
    moved = affine.copy()
    moved[:3, 3] += offset
    return moved


@pytest.mark.parametrize(
    ("shape", "affine", "description"),
    [
        ((8, 9, 5), AFFINE, "shape (8, 9, 5) vs (8, 9, 4)"),
        (SHAPE, shifted(AFFINE, [10, 0, 0]), "a translation of 10 mm"),
        (
            SHAPE,
            AFFINE @ np.diag([1, 1, 2.5 / 3, 1]),
            "spacing (1.5, 1.5, 2.5) vs (1.5, 1.5, 3) mm",
        ),
        (SHAPE, rotation_z(30) @ AFFINE, "a rotation of 30.00 degrees, a translation of 11.6 mm"),
        (SHAPE, flip_affine(AFFINE, SHAPE, [1]), "a flip of axis 1 (the same world grid)"),
        (
            SHAPE,
            flip_affine(AFFINE, SHAPE, [0, 2]),
            "a flip of axes 0 and 2 (the same world grid)",
        ),
        (
            (4, 8, 9),
            AFFINE[:, [2, 0, 1, 3]],
            "a permutation of axes (0, 1, 2 -> 2, 0, 1) (the same world grid)",
        ),
        (
            SHAPE,
            shifted(flip_affine(AFFINE, SHAPE, [1]), [0, 3, 0]),
            "a flip of axis 1, a translation of 3 mm",
        ),
    ],
)
def test_grid_difference_says_what_differs_and_by_how_much(shape, affine, description):
    difference = grid_difference(shape, affine, SHAPE, AFFINE)
    assert str(difference) == description
    assert difference.same_world_grid == ("same world grid" in description)


def test_the_same_grid_has_no_difference():
    assert grid_difference(SHAPE, AFFINE + 1e-6, SHAPE, AFFINE) is None


def test_reorientation_moves_voxels_exactly_onto_the_reference_grid():
    data = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    stored = np.ascontiguousarray(np.flip(data, (0, 2)).transpose(2, 0, 1))
    affine = flip_affine(AFFINE, SHAPE, [0, 2])[:, [2, 0, 1, 3]]
    np.testing.assert_array_equal(reorient_to_grid(stored, affine, SHAPE, AFFINE), data)
    assert reorient_to_grid(data, shifted(AFFINE, [1, 0, 0]), SHAPE, AFFINE) is None


def test_eval_says_how_far_a_reference_is_moved(tmp_path):
    label = np.zeros(SHAPE, np.uint8)
    label[2:5, 2:5, 1:3] = 1
    prediction, reference = tmp_path / "case.nii.gz", tmp_path / "reference.nii.gz"
    nib.save(nib.Nifti1Image(label, AFFINE), prediction)
    nib.save(nib.Nifti1Image(label, shifted(AFFINE, [0, 0, 6])), reference)
    pair = ScoringPair("case", prediction, reference)
    evaluation = score_pairs([pair], ["background", "organ"], {0: 0, 1: 1})
    assert evaluation.rows == []
    assert evaluation.failures == [
        f"{prediction}: prediction grid differs from the reference {reference}: a translation "
        "of 6 mm"
    ]
