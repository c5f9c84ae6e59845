"""Metrics against values computed by hand on cubes, spheres and single voxels."""

import math

import numpy as np
import pytest

from medseg.metrics import METRICS, case_metrics, class_metrics


def box(shape, corner, size) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(c, c + s) for c, s in zip(corner, size, strict=True))] = True
    return mask


def test_cube_extended_along_z_by_two_slices():
    """A 10x10x10 cube vs the same cube 12 slices high, at 3 x 3 x 1 mm.

    Surfaces: 10^3 - 8^3 = 488 voxels for the cube, 10*10*12 - 8*8*10 = 560 for the box.
    Cube -> box: the 64 inner voxels of the cube's top face are 2 mm below the box's top
    (the box's side walls are >= 3 mm away); the other 424 lie on the box's surface.
    Box -> cube: its top layer (100 voxels) is 2 mm above the cube's top, the rim of the
    layer below (36 voxels) 1 mm; the other 424 lie on the cube's surface.
    """
    shape, spacing = (14, 14, 16), (3.0, 3.0, 1.0)
    cube = box(shape, (2, 2, 2), (10, 10, 10))
    taller = box(shape, (2, 2, 2), (10, 10, 12))
    values = class_metrics(cube, taller, spacing, tolerance_mm=1.0)
    assert values["dice"] == pytest.approx(2 * 1000 / 2200)
    assert values["iou"] == pytest.approx(1000 / 1200)
    assert values["volume_similarity"] == pytest.approx(1 - 200 / 2200)
    assert values["hd95_mm"] == pytest.approx(2.0)
    assert values["assd_mm"] == pytest.approx((64 * 2 + 100 * 2 + 36 * 1) / (488 + 560))
    assert values["nsd"] == pytest.approx((424 + 424 + 36) / (488 + 560))
    assert class_metrics(cube, taller, spacing, tolerance_mm=2.0)["nsd"] == 1.0
    # The metrics are symmetric in prediction and reference, except volume similarity's sign.
    assert class_metrics(taller, cube, spacing, tolerance_mm=1.0) == pytest.approx(values)


@pytest.mark.parametrize(
    ("axis", "spacing", "expected_mm"),
    [(0, (0.5, 1.0, 2.0), 1.5), (1, (0.5, 1.0, 2.0), 3.0), (2, (0.5, 1.0, 2.0), 6.0)],
)
def test_single_voxels_three_apart_use_the_spacing_of_their_axis(axis, spacing, expected_mm):
    shape = (10, 10, 10)
    first = box(shape, (2, 2, 2), (1, 1, 1))
    corner = [2, 2, 2]
    corner[axis] += 3
    second = box(shape, tuple(corner), (1, 1, 1))
    values = class_metrics(first, second, spacing, tolerance_mm=expected_mm - 0.01)
    assert values["hd95_mm"] == pytest.approx(expected_mm)
    assert values["assd_mm"] == pytest.approx(expected_mm)
    assert values["dice"] == 0 and values["iou"] == 0 and values["volume_similarity"] == 1
    assert values["nsd"] == 0
    assert class_metrics(first, second, spacing, tolerance_mm=expected_mm)["nsd"] == 1


def sphere(shape, centre_mm, radius_mm, spacing) -> np.ndarray:
    grid = np.meshgrid(
        *(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij"
    )
    return sum((g - c) ** 2 for g, c in zip(grid, centre_mm, strict=True)) <= radius_mm**2


def test_concentric_spheres_are_their_radius_difference_apart():
    """Radii 8 and 11 mm on a 0.5 x 0.5 x 1 mm grid: every surface distance is ~3 mm."""
    spacing, shape = (0.5, 0.5, 1.0), (60, 60, 30)
    centre = (15.0, 15.0, 15.0)
    inner = sphere(shape, centre, 8.0, spacing)
    outer = sphere(shape, centre, 11.0, spacing)
    values = class_metrics(inner, outer, spacing, tolerance_mm=1.0)
    # Voxelized surfaces deviate from the true spheres by up to half the coarsest voxel.
    assert values["hd95_mm"] == pytest.approx(3.0, abs=1.0)
    assert values["assd_mm"] == pytest.approx(3.0, abs=0.5)
    assert values["nsd"] < 0.05
    assert values["dice"] == pytest.approx(2 * 8**3 / (8**3 + 11**3), abs=0.01)
    assert values["iou"] == pytest.approx(8**3 / 11**3, abs=0.01)


def test_identical_masks_are_perfect():
    mask = box((8, 8, 8), (1, 2, 3), (4, 3, 2))
    values = class_metrics(mask, mask, (1.0, 2.0, 3.0), tolerance_mm=0.0)
    assert values == {
        "dice": 1.0,
        "iou": 1.0,
        "volume_similarity": 1.0,
        "hd95_mm": 0.0,
        "assd_mm": 0.0,
        "nsd": 1.0,
    }


def test_empty_versus_empty_is_undefined():
    empty = np.zeros((5, 5, 5), dtype=bool)
    values = class_metrics(empty, empty, (1.0, 1.0, 1.0), tolerance_mm=1.0)
    assert set(values) == set(METRICS) and all(math.isnan(v) for v in values.values())


@pytest.mark.parametrize("empty_side", ["prediction", "reference"])
def test_empty_versus_nonempty_scores_zero_and_the_image_diagonal(empty_side):
    shape, spacing = (10, 20, 5), (1.0, 0.5, 4.0)
    mask, empty = box(shape, (2, 2, 2), (2, 2, 2)), np.zeros(shape, dtype=bool)
    pair = (empty, mask) if empty_side == "prediction" else (mask, empty)
    values = class_metrics(*pair, spacing, tolerance_mm=1.0)
    diagonal = math.sqrt(10**2 + 10**2 + 20**2)
    assert values == {
        "dice": 0.0,
        "iou": 0.0,
        "volume_similarity": 0.0,
        "hd95_mm": pytest.approx(diagonal),
        "assd_mm": pytest.approx(diagonal),
        "nsd": 0.0,
    }


def test_case_metrics_has_every_metric_and_volume_per_class():
    reference = np.zeros((6, 6, 6), dtype=np.int64)
    reference[1:3, 1:3, 1:3] = 1
    prediction = reference.copy()
    prediction[4, 4, 4] = 2  # a lesion where the reference has none
    row = case_metrics(prediction, reference, ["background", "liver", "lesion"], (2, 2, 2))
    assert list(row)[:2] == ["dice_liver", "dice_lesion"]
    assert row["dice_liver"] == 1 and row["dice_lesion"] == 0
    assert row["volume_ml_reference_liver"] == pytest.approx(8 * 8 / 1000)
    assert row["volume_ml_predicted_lesion"] == pytest.approx(8 / 1000)
    assert row["volume_ml_reference_lesion"] == 0
    assert len(row) == 2 * len(METRICS) + 4
