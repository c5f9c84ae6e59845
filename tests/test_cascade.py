"""Cascade inference: ROI crop and paste-back, composition, and nesting of the classes."""

import pytest
import torch

from medseg.errors import ConfigError
from medseg.models.cascade import bounding_box, crop, grow_box, paste, predict_cascade
from medseg.stages import build_cascade

from .test_stages import LABELS, cascade_cfg


def test_crop_and_paste_back_restore_the_geometry_exactly():
    volume = torch.randn(1, 2, 20, 17, 9)
    mask = torch.zeros(20, 17, 9, dtype=torch.bool)
    mask[5:8, 3, 2:4] = True
    box = bounding_box(mask, margin=[2, 1, 0])
    assert box == (slice(3, 10), slice(2, 5), slice(2, 4))
    region = crop(volume, box)
    assert region.shape == (1, 2, 7, 3, 2)
    restored = paste(region, box, volume.shape[2:], fill=torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(restored[(..., *box)], volume[(..., *box)])
    outside = torch.ones(20, 17, 9, dtype=torch.bool)
    outside[box] = False
    assert torch.all(restored[:, :, outside] == 0)


def test_bounding_box_is_clipped_to_the_volume_and_none_when_empty():
    mask = torch.zeros(6, 6, 6, dtype=torch.bool)
    assert bounding_box(mask, [1, 1, 1]) is None
    mask[0, 5, 2] = True
    assert bounding_box(mask, [3, 3, 3]) == (slice(0, 4), slice(2, 6), slice(0, 6))


def fake_predictors(organ: torch.Tensor, lesion_everywhere: float = 0.9):
    """Stage 1 predicts `organ` exactly; stage 2 claims lesion everywhere it is asked."""
    seen = {}

    def predict(stage, inputs):
        seen[stage.name] = inputs
        if stage.name == "organ":
            fg = organ[None, None].float()
            return torch.cat([1 - fg, fg], dim=1)
        fg = torch.full((1, 1, *inputs.shape[2:]), lesion_everywhere)
        return torch.cat([1 - fg, fg], dim=1)

    return predict, seen


def test_composed_lesion_stays_inside_the_organ_mask():
    cascade = build_cascade(cascade_cfg(), LABELS)
    organ = torch.zeros(16, 16, 8, dtype=torch.bool)
    organ[4:10, 5:9, 2:6] = True
    predict, seen = fake_predictors(organ)
    image = torch.randn(1, 1, 16, 16, 8)
    result = predict_cascade(image, [2.0, 2.0, 5.0], cascade, predict)
    # Stage 2 saw the organ's bounding box grown by 10 mm (5, 5, 2 voxels), clipped, with
    # the organ mask as its second input channel.
    assert seen["lesion"].shape == (1, 2, 15, 14, 8)
    assert torch.equal(seen["lesion"][0, 1].bool(), organ[0:15, 0:14, :])
    assert torch.equal(result.labels[0] == 2, organ)  # lesion claimed only inside the organ
    assert not torch.any(result.labels[0][~organ] > 0)
    assert torch.equal(result.stage_labels["organ"][0] > 0, organ)
    torch.testing.assert_close(result.probabilities.sum(1), torch.ones(1, 16, 16, 8))
    # Inside the organ: p(lesion) = p(organ) * p(lesion | organ box) = 1 * 0.9.
    assert torch.allclose(result.probabilities[0, 2][organ], torch.tensor(0.9))


def test_no_organ_means_no_lesion_and_stage_two_is_not_run():
    cascade = build_cascade(cascade_cfg(), LABELS)
    predict, seen = fake_predictors(torch.zeros(8, 8, 8, dtype=torch.bool))
    result = predict_cascade(torch.randn(1, 1, 8, 8, 8), [1.0, 1.0, 1.0], cascade, predict)
    assert "lesion" not in seen
    assert not torch.any(result.labels)


def test_threshold_decides_the_stage_foreground():
    cascade = build_cascade(cascade_cfg(s0={"threshold": 0.7}), LABELS)
    probability = torch.linspace(0, 1, 11).reshape(11, 1, 1).expand(11, 4, 4)

    def predict(stage, inputs):
        if stage.name == "organ":
            return torch.stack([1 - probability, probability])[None]
        return torch.cat(
            [torch.ones(1, 1, *inputs.shape[2:]), torch.zeros(1, 1, *inputs.shape[2:])], 1
        )

    result = predict_cascade(torch.zeros(1, 1, 11, 4, 4), [1.0] * 3, cascade, predict)
    assert (result.labels[0, :, 0, 0] == 1).tolist() == [False] * 7 + [True] * 4


@pytest.mark.parametrize("largest_component", [True, False])
def test_largest_component_drops_a_stray_organ_blob_and_its_lesions(largest_component):
    stages = cascade_cfg(
        s0={"largest_component": largest_component},
        s1={"min_component_mm3": 0},  # keep the stray blob's lesion (18 mm^3) when kept
    )
    cascade = build_cascade(stages, LABELS)
    organ = torch.zeros(20, 16, 8, dtype=torch.bool)
    organ[2:10, 3:11, 1:7] = True  # the organ
    organ[15:18, 12:15, 3:5] = True  # a stray false positive far from it
    stray = torch.zeros_like(organ)
    stray[15:18, 12:15, 3:5] = True
    predict, _ = fake_predictors(organ)
    result = predict_cascade(torch.randn(1, 1, 20, 16, 8), [1.0] * 3, cascade, predict)
    kept = organ & ~stray if largest_component else organ
    assert torch.equal(result.stage_labels["organ"][0] > 0, kept)
    assert torch.equal(result.labels[0] == 2, kept)  # lesions only in what is kept


def test_components_under_the_minimum_size_in_mm3_are_dropped():
    lesion = torch.zeros(20, 16, 8, dtype=torch.bool)
    lesion[2:6, 2:6, 2:4] = True  # 32 voxels
    lesion[12, 12, 5] = True  # a one-voxel speck

    def predict(stage, inputs):
        fg = (torch.ones if stage.name == "organ" else lesion.expand)(inputs.shape[2:]).float()
        return torch.stack([1 - fg, fg])[None]

    image = torch.zeros(1, 1, 20, 16, 8)
    # 0.5 x 0.5 x 2 mm voxels: the speck is 0.5 mm^3, the lesion 16 mm^3
    for size, kept in ((0.4, lesion), (1.0, lesion & (torch.arange(20) < 10)[:, None, None])):
        cascade = build_cascade(cascade_cfg(s1={"min_component_mm3": size}), LABELS)
        result = predict_cascade(image, [0.5, 0.5, 2.0], cascade, predict)
        assert torch.equal(result.labels[0] == 2, kept), size
    cascade = build_cascade(cascade_cfg(s1={"min_component_mm3": 20}), LABELS)
    assert not (predict_cascade(image, [0.5, 0.5, 2.0], cascade, predict).labels == 2).any()
    with pytest.raises(ConfigError, match="min_component_mm3 must be a number >= 0, got -1"):
        build_cascade(cascade_cfg(s1={"min_component_mm3": -1}), LABELS)


def test_region_boxes_grow_to_the_window_inside_the_volume():
    shape = (40, 30, 12)
    # centred growth, a shift away from the border, and an axis shorter than the window
    box = (slice(10, 14), slice(0, 3), slice(4, 6))
    assert grow_box(box, (8, 10, 16), shape) == (slice(8, 16), slice(0, 10), slice(0, 12))
    assert grow_box(box, (2, 2, 2), shape) == box  # already large enough: unchanged
    cascade = build_cascade(cascade_cfg(), LABELS)
    organ = torch.zeros(40, 30, 12, dtype=torch.bool)
    organ[20:23, 28:30, 5:7] = True
    predict, seen = fake_predictors(organ)
    image = torch.randn(1, 1, *shape)
    result = predict_cascade(
        image, [10.0, 10.0, 10.0], cascade, predict, min_box_sizes={"lesion": (16, 16, 8)}
    )
    assert seen["lesion"].shape == (1, 2, 16, 16, 8)  # the window, not the 5x4x4 box
    assert torch.equal(result.labels[0] == 2, organ)
