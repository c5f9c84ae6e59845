"""Patch-level building blocks: label scans, pre-selection, patch warping, the locator."""

import numpy as np
import pytest
import torch
import zarr

from medseg.data import scan
from medseg.data.augment import input_box, warp_patch
from medseg.data.patches import PatchLocator
from medseg.data.prepared import PreparedCase
from medseg.data.preselect import labelled_corners
from medseg.data.scan import case_rng, scan_label
from medseg.errors import DataError

LABELS = {0: "background", 1: "a", 2: "b"}


def random_label(shape=(20, 18, 12), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    label[4:12, 3:10, 2:8] = 1
    label[rng.random(shape) < 0.02] = 2
    return label


def test_label_scan_counts_values_and_keeps_locations_of_each_value(tmp_path, monkeypatch):
    monkeypatch.setattr(scan, "LOCATIONS_PER_CLASS", 200)
    monkeypatch.setattr(scan, "_SLAB_VOXELS", 18 * 12 * 3)  # several slabs
    label = random_label()
    index = scan_label(label, LABELS, case_rng("x", "locations"), "x")
    values, counts = np.unique(label, return_counts=True)
    assert index.counts == dict(zip(values.tolist(), counts.tolist(), strict=True))
    for value, where in index.locations.items():
        assert np.all(label[tuple(where.T)] == value)
        expected = min(counts[value], 200)
        assert abs(len(where) - expected) <= 4 * np.sqrt(expected) + 1
    assert len(index.locations[2]) == counts[2] or counts[2] > 200
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        np.testing.assert_array_equal(index.foreground_slices[axis], label.any(other))
    # Chunked Zarr labels, read slab by slab, give the same index.
    chunked = zarr.create_array(str(tmp_path / "l"), data=label, chunks=(4, 18, 12))
    again = scan_label(chunked, LABELS, case_rng("x", "locations"), "x")
    assert again.counts == index.counts


def test_label_scan_rejects_undeclared_and_fractional_values():
    label = random_label()
    label[0, 0, 0] = 7
    with pytest.raises(DataError, match=r"case.nii: label values \[7\] are not in the declared"):
        scan_label(label, LABELS, case_rng("x", "l"), "case.nii")
    with pytest.raises(DataError, match="non-integer values"):
        scan_label(label.astype(np.float32) / 2, LABELS, case_rng("x", "l"), "case.nii")


def test_preselected_patches_are_exactly_those_with_enough_labelled_voxels():
    label = random_label(seed=1)
    patch = (8, 6, 4)
    corners = labelled_corners(label, patch, 0.3)
    expected = [
        (x, y, z)
        for x in range(0, 20 - 8 + 1, 4)
        for y in range(0, 18 - 6 + 1, 3)
        for z in range(0, 12 - 4 + 1, 2)
        if (label[x : x + 8, y : y + 6, z : z + 4] > 0).mean() >= 0.3
    ]
    assert sorted(map(tuple, corners.tolist())) == sorted(expected)
    # An axis shorter than the patch is centred (the patch is padded there).
    short = labelled_corners(label[:, :, :3], (8, 6, 4), 0.0)
    assert set(short[:, 2].tolist()) == {0}
    assert set(labelled_corners(label[:, :, :2], (8, 6, 4), 0.0)[:, 2].tolist()) == {-1}


def test_identity_warp_reads_the_patch_and_a_quarter_turn_rotates_it():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(size=(2, 9, 9, 5)).astype(np.float32))
    label = torch.from_numpy(rng.integers(0, 3, size=(1, 9, 9, 5)).astype(np.uint8))
    centre = np.array([4.0, 4.0, 2.0])
    low, high = input_box(centre, np.eye(3), (7, 7, 3))
    np.testing.assert_array_equal(low, [1, 1, 1])
    np.testing.assert_array_equal(high, [8, 8, 4])
    same, same_label = warp_patch(image, label, centre, np.eye(3), (7, 7, 3))
    torch.testing.assert_close(same, image[:, 1:8, 1:8, 1:4])
    torch.testing.assert_close(same_label, label[:, 1:8, 1:8, 1:4])
    quarter = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    turned, turned_label = warp_patch(image, label, centre, quarter, (7, 7, 3))
    # Patch offset (i, j) from the centre reads box offset (-j, i): rot90 with k=-1.
    expected = torch.rot90(image[:, 1:8, 1:8, 1:4], k=-1, dims=(1, 2))
    torch.testing.assert_close(turned, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(turned_label, torch.rot90(label[:, 1:8, 1:8, 1:4], -1, (1, 2)))
    # A one-voxel-thick slice turns in its plane.
    flat, flat_label = warp_patch(
        image[..., 2:3], label[..., 2:3], np.array([4.0, 4.0, 0.0]), quarter, (7, 7, 1)
    )
    expected = torch.rot90(image[:, 1:8, 1:8, 2:3], k=-1, dims=(1, 2))
    torch.testing.assert_close(flat, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(flat_label, torch.rot90(label[:, 1:8, 1:8, 2:3], -1, (1, 2)))
    # Zooming in by 2 reads half the extent (6 voxels -> 3), plus a voxel to interpolate.
    low, high = input_box(centre, np.eye(3) / 2, (7, 7, 3))
    np.testing.assert_array_equal(low, [2, 2, 1])
    np.testing.assert_array_equal(high, [7, 7, 4])


def prepared(label: np.ndarray, case_id: str = "c") -> PreparedCase:
    index = scan_label(label, LABELS, case_rng(case_id, "locations"), case_id)
    image = label[None].astype(np.float32)
    return PreparedCase(case_id, image, label, np.eye(4), index)


def test_locator_keeps_patches_inside_and_centres_them_on_short_axes():
    label = random_label()
    case = prepared(label)
    rng = np.random.default_rng(0)
    locator = PatchLocator((8, 8, 16), "label", {1: 1.0})
    for _ in range(200):
        corner = locator.corner(case, rng)
        assert 0 <= corner[0] <= 12 and 0 <= corner[1] <= 10
        assert corner[2] == -2  # 12 voxels in a 16-voxel patch: 2 of padding on each side
        assert np.any(label[corner[0] + 4, corner[1] + 4] == 1)  # the centre's column


def test_a_stage_that_sees_the_patch_centre_gets_its_sampled_voxel_there_anywhere():
    # Label 2 only near the volume's edge: a 16x16x8 patch centred there sticks out of the
    # 20x18x12 volume (padded), so that its 8x8x4 centre, the stage's view, holds the voxel.
    label = np.zeros((20, 18, 12), np.uint8)
    label[4:6, 12:14, 2:4] = 2
    case = prepared(label)
    whole = PatchLocator((16, 16, 8), "label", {2: 1.0})
    focused = PatchLocator((16, 16, 8), "label", {2: 1.0}, focus_size=(8, 8, 4))
    for seed in range(50):
        rng = np.random.default_rng(seed)
        corner = focused.corner(case, rng)
        centre = corner + np.array([8, 8, 4])
        view = tuple(slice(c - h, c + h) for c, h in zip(centre, (4, 4, 2), strict=True))
        assert (label[view] == 2).any()
        assert corner[0] < 0 and corner[1] + 16 > 18  # past the edges: padded there
        # Keeping the whole patch inside the volume, the lesion is never at its centre.
        corner = whole.corner(case, np.random.default_rng(seed))
        assert np.all(corner >= 0) and np.all(corner + np.array([16, 16, 8]) <= [20, 18, 12])
        assert label[tuple(corner + np.array([8, 8, 4]))] != 2
    uniform = PatchLocator((16, 16, 8), "uniform", {}, focus_size=(8, 8, 4))
    centres = np.array([uniform.corner(case, np.random.default_rng(i)) for i in range(300)])
    centres += (8, 8, 4)
    assert centres.min(0).tolist() == [4, 4, 2] and centres.max(0).tolist() == [16, 14, 10]


def test_locator_falls_back_to_uniform_when_no_requested_label_is_present():
    label = np.zeros((10, 10, 10), np.uint8)
    case = prepared(label)
    locator = PatchLocator((4, 4, 4), "label", {2: 1.0})
    corners = np.array([locator.corner(case, np.random.default_rng(i)) for i in range(300)])
    assert corners.min() == 0 and corners.max() == 6
