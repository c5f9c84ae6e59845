"""2D mode: slices sampled from volumes, a 2D network trained on them, predicted back in 3D."""

import re

import numpy as np
import pytest
import torch

from medseg import pipeline
from medseg.data.augment import build_augmentation
from medseg.data.datamodule import SegmentationDataModule
from medseg.data.slices import predict_slices
from medseg.errors import ConfigError
from medseg.inference import sliding_window_inference
from medseg.module import SegmentationModule

from .conftest import (
    TINY_MODEL,
    TINY_PHANTOM,
    compose_config,
    tiny_data_overrides,
    tiny_datamodule,
)


def slice_datamodule(root, **kwargs) -> SegmentationDataModule:
    settings = {
        "slice_axis": 2,
        "patch_size": (32, 32),
        "batch_size": 4,
        "samples_per_volume": 12,
        "queue_length": 16,
        "augmentation": "default",
    }
    dm = tiny_datamodule(root, **(settings | kwargs))
    dm.setup("fit")
    return dm


def test_slices_are_2d_batches_taken_from_non_empty_slices(phantom_root):
    dm = slice_datamodule(phantom_root, skip_empty_slices=True, sampler="uniform")
    labels = {c.case_id: c.read_volume()[1][0] for c in dm.cases["train"]}
    torch.manual_seed(0)
    seen = 0
    for batch in dm.train_dataloader():
        assert batch["image"].shape == (4, 1, 32, 32) and batch["label"].shape == (4, 1, 32, 32)
        for case_id, location in zip(batch["case_id"], batch["location"], strict=True):
            z = int(location[2])
            assert int(location[5]) == z + 1  # one slice thick
            assert labels[case_id][:, :, z].any(), (case_id, z)
            seen += 1
    assert seen == 12 * len(dm.cases["train"])


def test_2d_augmentation_stays_in_the_slice_plane():
    augmentation = build_augmentation("default", slice_axis=2)
    rng = np.random.default_rng(0)
    matrices = [augmentation.spatial.sample(rng, (1.0, 1.0, 3.0)) for _ in range(200)]
    matrices = [m for m in matrices if m is not None]
    assert matrices
    for matrix in matrices:
        np.testing.assert_allclose(matrix[2], [0, 0, 1], atol=1e-12)
        np.testing.assert_allclose(matrix[:, 2], [0, 0, 1], atol=1e-12)
    flips = augmentation.transforms.transforms[-1]
    assert flips.axes == (0, 1)


def test_slice_by_slice_prediction_stacks_each_slice_prediction():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    volume = torch.randn(1, 2, 5, 6, 7)
    with torch.no_grad():
        for axis in range(3):
            predicted = predict_slices(volume, axis, conv)
            assert predicted.shape == (1, 3, 5, 6, 7)
            index = 3
            expected = conv(volume.select(2 + axis, index))
            torch.testing.assert_close(predicted.select(2 + axis, index), expected)


def test_a_2d_network_trains_on_slices_and_predicts_whole_volumes(tmp_path, phantom_root):
    overrides = [
        *tiny_data_overrides(tmp_path, phantom_root),
        *TINY_MODEL,
        "model.dims=2",
        "data.slice_axis=2",
        "data.patch_size=[32,32]",
        "data.skip_empty_slices=true",
        "data.batch_size=4",
        f"paths.output_dir={tmp_path}/run",
    ]
    metrics = pipeline.train(compose_config("train", overrides))
    assert 0 <= metrics["val/dice_liver"] <= 1 and "test/dice_mean" in metrics
    module = SegmentationModule.load_from_checkpoint(
        tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu"
    )
    net = module.nets["segmentation"]
    assert module.hparams.slice_axis == 2 and net.dims == 2
    volume = torch.randn(1, 1, *TINY_PHANTOM["shape"])
    module.eval()
    settings = {k: module.inference[k] for k in ("window", "overlap", "batch_size", "gaussian")}
    with torch.no_grad():
        prediction = module.predict_volume(volume, TINY_PHANTOM["spacing"])
        assert prediction.probabilities.shape == (1, 3, *TINY_PHANTOM["shape"])
        assert prediction.labels.shape == (1, *TINY_PHANTOM["shape"])
        one_slice = sliding_window_inference(volume[..., 5], net, **settings).softmax(1)
    torch.testing.assert_close(prediction.probabilities[..., 5], one_slice)


def test_dims_and_slice_axis_must_agree(tmp_path, phantom_root):
    overrides = [*tiny_data_overrides(tmp_path, phantom_root), f"paths.output_dir={tmp_path}"]
    cfg = compose_config("train", [*overrides, "data.slice_axis=2", "data.patch_size=[32,32]"])
    with pytest.raises(ConfigError, match=re.escape("model.dims=3 does not match the data")):
        pipeline.train(cfg)
    with pytest.raises(ConfigError, match=re.escape("data.patch_size must be 2 positive")):
        slice_datamodule(phantom_root, patch_size=(32, 32, 16))
    with pytest.raises(ConfigError, match=re.escape("data.slice_axis must be null")):
        slice_datamodule(phantom_root, slice_axis=3)
    with pytest.raises(ConfigError, match=re.escape("data.skip_empty_slices needs 2D mode")):
        slice_datamodule(
            phantom_root, slice_axis=None, patch_size=(32, 32, 16), skip_empty_slices=True
        )
