import re

import numpy as np
import pytest
import torch
import torchio as tio

from medseg.data.preprocess import build_preprocessing
from medseg.errors import ConfigError

from .conftest import TINY_PHANTOM, tiny_datamodule


def test_training_batches_follow_the_batch_contract(phantom_root):
    dm = tiny_datamodule(phantom_root)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (2, 1, 32, 32, 16)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (2, 1, 32, 32, 16)
    assert len(batch["case_id"]) == 2 and all(c in dm.split.train for c in batch["case_id"])
    assert batch["location"].shape == (2, 6)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert dm.class_names == ["background", "liver", "lesion"] and dm.in_channels == 1


def test_validation_batches_are_whole_volumes(phantom_root):
    dm = tiny_datamodule(phantom_root)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert [b["case_id"][0] for b in batches] == list(dm.split.val)
    assert batches[0]["image"].shape == (1, 1, *TINY_PHANTOM["shape"])
    assert batches[0]["spacing"][0].tolist() == pytest.approx(TINY_PHANTOM["spacing"])


def test_label_sampler_centres_patches_on_the_requested_label(phantom_root):
    dm = tiny_datamodule(phantom_root, label_probabilities={1: 1.0}, samples_per_volume=4)
    dm.setup("fit")
    torch.manual_seed(0)
    for batch in dm.train_dataloader():
        centre = batch["label"][:, 0, 16, 16, 8]
        assert torch.all(centre == 1)


def test_unknown_label_probability_is_rejected(phantom_root):
    dm = tiny_datamodule(phantom_root, label_probabilities={5: 1.0})
    dm.setup("fit")
    with pytest.raises(ConfigError, match=r"label values \[5\]"):
        dm.train_dataloader()


def test_resampling_changes_the_grid_and_keeps_the_world_extent(phantom_root):
    dm = tiny_datamodule(
        phantom_root, preprocess={"spacing": [5.0, 5.0, 7.5]}, patch_size=(16, 16, 16)
    )
    dm.setup("fit")
    case = dm.cases["val"][0]
    assert case.shape == (24, 24, 16)
    assert case.spacing == pytest.approx((5.0, 5.0, 7.5))


def test_ct_window_and_channelwise_zscore():
    data = torch.stack([torch.linspace(-1000, 1000, 64), torch.linspace(0, 5, 64)]).reshape(
        2, 4, 4, 4
    )
    subject = tio.Subject(image=tio.ScalarImage(tensor=data))
    ct = build_preprocessing(
        canonical=False, intensity={"mode": "ct_window", "window": [-100, 100]}
    )
    windowed = ct(subject)["image"].data[0]
    assert windowed.min() == -1 and windowed.max() == 1
    expected = np.clip(np.linspace(-1000, 1000, 64), -100, 100) / 100
    np.testing.assert_allclose(windowed.flatten().numpy(), expected, atol=1e-6)
    z = build_preprocessing(canonical=False, intensity={"mode": "zscore"})(subject)["image"].data
    torch.testing.assert_close(z.mean((1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std((1, 2, 3), unbiased=False), torch.ones(2), atol=1e-5, rtol=0)
    # Over non-zero voxels only: zeros stay zero, the rest is standardized.
    masked = data.clone()
    masked[:, :2] = 0
    nonzero = build_preprocessing(canonical=False, intensity={"mode": "zscore_nonzero"})(
        tio.Subject(image=tio.ScalarImage(tensor=masked))
    )["image"].data
    assert torch.all(nonzero[:, :2] == 0)
    inside = nonzero[:, 2:].flatten(1)
    torch.testing.assert_close(inside.mean(1), torch.zeros(2), atol=1e-5, rtol=0)


def test_invalid_settings_name_the_key(phantom_root):
    with pytest.raises(ConfigError, match=re.escape("data.patch_size must be 3 positive integer")):
        tiny_datamodule(phantom_root, patch_size=(32, 32))
    with pytest.raises(ConfigError, match=re.escape("data.augmentation must be one of")):
        tiny_datamodule(phantom_root, augmentation="heavy")
    with pytest.raises(ConfigError, match=re.escape("data.preprocess.intensity.mode")):
        tiny_datamodule(phantom_root, preprocess={"intensity": {"mode": "hu"}})
    with pytest.raises(ConfigError, match="only used by mode ct_window"):
        tiny_datamodule(
            phantom_root, preprocess={"intensity": {"mode": "zscore", "window": [0, 1]}}
        )
