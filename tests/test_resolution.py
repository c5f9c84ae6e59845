"""Stages on their own grids: a coarser stage sees the data average-pooled, its outputs land
back on the data grid where they belong; a stage's training input is the patch's centre."""

from __future__ import annotations

import re

import pytest
import torch

from medseg.errors import ConfigError
from medseg.models.resolution import StageGrid, stage_grid
from medseg.module import SegmentationModule

from .test_prediction import LABELS, OneLevelNet


def test_pool_then_unpool_keeps_voxel_centres_aligned():
    # A linear ramp along each axis survives area pooling + linear interpolation exactly
    # (away from the last block, where interpolation holds the edge value), which only
    # happens when the coarse voxel centres sit at the centres of their fine blocks.
    x = torch.arange(16, dtype=torch.float32)
    ramp = (x[:, None, None] + 2 * x[None, :8, None] + 3 * x[None, None, :4])[None, None]
    grid = StageGrid(factors=(2, 2, 1), window=(8, 4, 4))
    pooled = grid.pool(ramp)
    assert pooled.shape == (1, 1, 8, 4, 4)
    assert pooled[0, 0, 3, 1, 2] == pytest.approx(3 * 2 + 0.5 + 2 * (2 + 0.5) + 3 * 2)
    restored = grid.unpool(pooled, ramp.shape[2:])
    assert restored.shape == ramp.shape
    torch.testing.assert_close(restored[..., 1:-1, 1:-1, :], ramp[..., 1:-1, 1:-1, :])


def test_volumes_of_any_size_come_back_to_their_own_shape():
    volume = torch.rand(1, 2, 17, 10, 5)
    grid = StageGrid(factors=(2, 3, 1), window=(8, 3, 5))
    pooled = grid.pool(volume)
    assert pooled.shape == (1, 2, 9, 4, 5)  # padded with edge voxels to 18 x 12 x 5
    assert pooled[0, 1, 8, 3, 0] == pytest.approx(float(volume[0, 1, 16, 9:, 0].mean()))
    assert grid.unpool(pooled, volume.shape[2:]).shape == volume.shape
    same = StageGrid(factors=(1, 1, 1), window=(8, 8, 4))
    assert same.pool(volume) is volume and same.unpool(volume, volume.shape[2:]) is volume


def test_a_stage_trains_on_the_centre_of_the_patch():
    image = torch.arange(2 * 16 * 12 * 8, dtype=torch.float32).reshape(2, 1, 16, 12, 8)
    batch = {
        "image": image,
        "label": image.long(),
        "priors": {"organ": image > 5},
        "count": torch.tensor([1, 2]),
        "case_id": ["a", "b"],
    }
    view = StageGrid(factors=(1, 1, 1), window=(8, 4, 8)).crop_batch(batch)
    centre = (..., slice(4, 12), slice(4, 8), slice(0, 8))
    assert torch.equal(view["image"], image[centre])
    assert torch.equal(view["label"], image[centre].long())
    assert torch.equal(view["priors"]["organ"], image[centre] > 5)
    assert torch.equal(view["count"], batch["count"]) and view["case_id"] == ["a", "b"]


@pytest.mark.parametrize(
    ("downsample", "patch_size", "message"),
    [
        ([2, 2], None, "downsample must be 3 positive integer(s), got [2, 2]"),
        ([2, 0, 1], None, "downsample must be 3 positive integer(s), got [2, 0, 1]"),
        ([3, 3, 1], None, "data.patch_size [32, 32, 16] is not divisible by its downsample"),
        ([2, 2, 1], [32, 32, 16], "covers [64, 64, 16] data voxels, more than data.patch_size"),
        (None, [16, 16], "patch_size must be 3 positive integer(s), got [16, 16]"),
    ],
)
def test_stage_grids_that_do_not_fit_the_data_patch_are_named(downsample, patch_size, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        stage_grid("organ", downsample, patch_size, (32, 32, 16))
    assert "stage 'organ'" in str(error.value)


def test_grids_from_the_stage_settings():
    assert stage_grid("organ", [2, 2, 1], None, (32, 32, 16)) == StageGrid((2, 2, 1), (16, 16, 16))
    assert stage_grid("lesion", None, [16, 16, 8], (32, 32, 16)).extent == (16, 16, 8)


class IntensityThreshold(OneLevelNet):
    """Organ where the image is above 0.5 (sharp logits); records the inputs it sees."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[2:]))
        foreground = 20 * (x[:, :1] - 0.5)
        return torch.cat([-foreground, foreground], dim=1)


def cascade_module() -> SegmentationModule:
    module = SegmentationModule(
        network={"width": 4, "num_stages": 2, "blocks_per_stage": 1},
        in_channels=1,
        stages=[
            {"name": "organ", "classes": {"liver": [1, 2]}, "epochs": 1, "downsample": [2, 2, 1]},
            {
                "name": "lesion",
                "classes": {"lesion": [2]},
                "input_masks": ["organ"],
                "region": {"stage": "organ", "margin_mm": 0},
                "patch_size": [8, 8, 4],
            },
        ],
        dataset_labels=LABELS,
        loss={"_target_": "medseg.losses.DiceCELoss"},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01},
        inference={"window": [16, 16, 8], "overlap": 0.5},
    ).eval()
    module.nets["organ"] = IntensityThreshold()
    module.nets["lesion"] = IntensityThreshold()
    return module


def test_a_downsampled_stage_predicts_on_its_grid_and_lands_on_the_data_grid():
    module = cascade_module()
    assert module.region_box_sizes == {"organ": (16, 16, 8), "lesion": (8, 8, 4)}
    # An organ block with even edges, in a volume that is not a multiple of the factors.
    image = torch.zeros(1, 1, 37, 30, 10)
    image[..., 6:24, 10:20, 2:8] = 1
    with torch.no_grad():
        prediction = module.predict_volume(image, spacing=[1.0, 1.0, 1.0])
    organ = module.nets["organ"]
    assert set(organ.seen) == {(8, 8, 8)}  # 16x16x8 data windows pooled 2x2x1
    assert set(module.nets["lesion"].seen) == {(8, 8, 4)}  # full resolution
    assert prediction.stage_probabilities["organ"].shape == (1, 2, 37, 30, 10)
    assert torch.equal(prediction.stage_labels["organ"][0] > 0, image[0, 0] > 0)


def test_dense_tasks_need_the_data_grid():
    stages = [
        {
            "name": "organ",
            "classes": {"liver": [1, 2]},
            "downsample": [2, 2, 1],
            "tasks": [{"name": "dist", "type": "voxel_regression", "distance_to": [1, 2]}],
        }
    ]
    with pytest.raises(ConfigError, match="a stage with downsample factors > 1 cannot have"):
        SegmentationModule(
            network={"width": 4, "num_stages": 2, "blocks_per_stage": 1},
            in_channels=1,
            stages=stages,
            dataset_labels=LABELS,
            loss={"_target_": "medseg.losses.DiceCELoss"},
            optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01},
            inference={"window": [16, 16, 8]},
        )
