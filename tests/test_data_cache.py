"""The preprocessing cache: keyed reuse, patch reads, sampling parity, atomic writes, prepare."""

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchio as tio

from medseg import pipeline
from medseg.data import cache, zarr_store
from medseg.data.cache import cache_location, open_cases, prepare_cache
from medseg.data.cases import discover_cases
from medseg.data.datamodule import SegmentationDataModule
from medseg.data.fingerprint import override_line, suggest
from medseg.data.preprocess import build_preprocessing, preprocess_settings
from medseg.data.subjects import case_to_subject
from medseg.data.zarr_store import RawChunkVolume
from medseg.errors import DataError, ResourceError

from .conftest import TINY_PHANTOM, compose_config, run_script, tiny_datamodule

CT = {"mode": "ct_window", "window": [-160, 240]}


@pytest.fixture
def phantom_copy(phantom_root, tmp_path) -> Path:
    """A private copy of the tiny phantom that a test may modify."""
    return Path(shutil.copytree(phantom_root, tmp_path / "phantom"))


def count_prepared(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = cache.prepare_case

    def counting(case, *args):
        calls.append(case.case_id)
        return real(case, *args)

    monkeypatch.setattr(cache, "prepare_case", counting)
    return calls


def test_cache_is_reused_for_the_same_settings_and_rebuilt_when_they_change(
    phantom_copy, tmp_path, monkeypatch
):
    dataset = discover_cases(phantom_copy)
    settings = preprocess_settings({"intensity": CT})
    prepared = count_prepared(monkeypatch)
    root = prepare_cache(dataset, settings, tmp_path / "cache")
    assert len(prepared) == TINY_PHANTOM["num_cases"]
    assert (root / "fingerprint.json").is_file()

    prepared.clear()
    assert prepare_cache(dataset, settings, tmp_path / "cache") == root
    assert prepared == []

    narrower = preprocess_settings({"intensity": {**CT, "window": [-100, 100]}})
    other = prepare_cache(dataset, narrower, tmp_path / "cache")
    assert other != root and len(prepared) == TINY_PHANTOM["num_cases"]
    first = open_cases(dataset, settings, root, ["phantom_000"])[0].read_volume()[0]
    second = open_cases(dataset, narrower, other, ["phantom_000"])[0].read_volume()[0]
    assert not np.array_equal(first, second)

    # A changed source file makes only its case stale.
    prepared.clear()
    image = phantom_copy / "imagesTr" / "phantom_002.nii.gz"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    prepare_cache(dataset, settings, tmp_path / "cache")
    assert prepared == ["phantom_002"]


def test_a_patch_read_from_the_cache_equals_the_same_region_of_the_preprocessed_volume(
    phantom_root, tmp_path
):
    dataset = discover_cases(phantom_root)
    settings = preprocess_settings({"spacing": [5.0, 5.0, 7.5], "intensity": CT})
    root = prepare_cache(dataset, settings, tmp_path)
    cached = open_cases(dataset, settings, root, ["phantom_001"])[0]
    subject = build_preprocessing(**settings)(case_to_subject(dataset.case("phantom_001")))
    volume = subject["image"].data.numpy()
    label = subject["label"].data.numpy()
    assert cached.shape == (24, 24, 16)
    np.testing.assert_allclose(cached.affine, subject["image"].affine)

    # Read through a memory map of the raw chunk; workers get the path, not the data.
    assert isinstance(cached.image, RawChunkVolume) and len(pickle.dumps(cached.image)) < 1000
    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(cached.image))[:],
        zarr_store.open_group(root)["phantom_001"]["image"][:],
    )
    image_patch, label_patch = cached.read((3, 5, 2), (16, 8, 4))
    np.testing.assert_array_equal(image_patch, volume[:, 3:19, 5:13, 2:6])
    np.testing.assert_array_equal(label_patch, label[:, 3:19, 5:13, 2:6])
    # Outside the volume the image repeats its edge voxels and the label is background.
    image_patch, label_patch = cached.read((-2, 20, 0), (4, 6, 2))
    np.testing.assert_array_equal(image_patch[:, 2:, :4], volume[:, 0:2, 20:24, 0:2])
    np.testing.assert_array_equal(image_patch[:, 0, :4], volume[:, 0, 20:24, 0:2])
    np.testing.assert_array_equal(image_patch[:, 2:, 5], volume[:, 0:2, 23, 0:2])
    assert np.all(label_patch[:, :2] == 0) and np.all(label_patch[:, :, 4:] == 0)


def datamodule(root, **kwargs) -> SegmentationDataModule:
    settings = {
        "preprocess": {"intensity": CT},
        "patch_size": (24, 24, 8),
        "samples_per_volume": 6,
        "queue_length": 8,
        "label_probabilities": {0: 0.2, 1: 0.3, 2: 0.5},
        "augmentation": "default",
    }
    dm = tiny_datamodule(root, **(settings | kwargs))
    dm.setup("fit")
    return dm


def epoch_patches(dm: SegmentationDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(7)
    batches = list(dm.train_dataloader())
    return torch.cat([b["location"] for b in batches]), torch.cat([b["image"] for b in batches])


def test_training_on_the_cache_and_on_the_raw_files_draws_the_same_patches(phantom_root, tmp_path):
    cached = datamodule(phantom_root, cache_dir=tmp_path, augmentation="default")
    raw = datamodule(phantom_root, cache_dir=None, augmentation="default")
    assert cached.cache_root is not None and raw.cache_root is None
    cached_locations, cached_images = epoch_patches(cached)
    raw_locations, raw_images = epoch_patches(raw)
    assert len(cached_locations) == len(cached.split.train) * 6
    torch.testing.assert_close(cached_locations, raw_locations, rtol=0, atol=0)
    torch.testing.assert_close(cached_images, raw_images)


def test_patch_centres_are_distributed_as_torchio_label_sampler_draws_them(phantom_root):
    probabilities = {0: 0.2, 1: 0.3, 2: 0.5}
    dm = datamodule(phantom_root, augmentation="none", label_probabilities=probabilities)
    case = next(c for c in dm.cases["train"] if c.index.counts.get(2, 0) > 50)
    patch = np.array(dm.volume_patch)
    rng = np.random.default_rng(0)
    locator = dm.train_dataset().locator
    ours = np.array([locator.corner(case, rng) for _ in range(3000)]) + patch // 2

    image, label = case.read_volume()
    subject = tio.Subject(
        image=tio.ScalarImage(tensor=torch.from_numpy(image)),
        label=tio.LabelMap(tensor=torch.from_numpy(label.astype(np.int64))),
    )
    torch.manual_seed(0)
    sampler = tio.LabelSampler(patch, "label", probabilities)
    theirs = np.array([p[tio.LOCATION][:3].numpy() for p in sampler(subject, 3000)]) + patch // 2

    volume = label[0]
    for value in probabilities:
        ours_share = np.mean(volume[tuple(ours.T)] == value)
        theirs_share = np.mean(volume[tuple(theirs.T)] == value)
        assert ours_share == pytest.approx(theirs_share, abs=0.04), value
    np.testing.assert_allclose(ours.mean(0), theirs.mean(0), atol=1.0)
    np.testing.assert_allclose(ours.std(0), theirs.std(0), rtol=0.1)


def test_a_truncated_file_is_named_and_leaves_no_cache_entry(phantom_copy, tmp_path):
    dataset = discover_cases(phantom_copy)
    settings = preprocess_settings({"intensity": CT})
    image = phantom_copy / "imagesTr" / "phantom_003.nii.gz"
    intact = image.read_bytes()
    image.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(DataError, match=r"phantom_003: .*phantom_003\.nii\.gz: cannot be read"):
        prepare_cache(dataset, settings, tmp_path)
    root = cache_location(tmp_path, dataset, settings)
    entries = sorted(p.name for p in root.iterdir())
    expected = [f"phantom_{i:03d}" for i in range(TINY_PHANTOM["num_cases"]) if i != 3]
    assert entries == [*expected, "zarr.json"]  # no partial case, no staging folder

    image.write_bytes(intact)
    prepare_cache(dataset, settings, tmp_path)
    assert (root / "phantom_003" / "image" / "zarr.json").is_file()
    assert (root / "fingerprint.json").is_file()


def test_a_write_that_fails_midway_leaves_nothing_behind(phantom_root, tmp_path, monkeypatch):
    dataset = discover_cases(phantom_root)

    def broken(group, index):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "write_index", broken)
    # a full disk stops the run at the first case (it would fail every other case too)
    with pytest.raises(ResourceError, match=r"phantom_000: .* ran out of disk space"):
        prepare_cache(dataset, preprocess_settings({"intensity": CT}), tmp_path)
    root = next(tmp_path.iterdir())
    assert sorted(p.name for p in root.iterdir()) == ["zarr.json"]


def test_fingerprint_and_suggested_overrides(phantom_root, tmp_path):
    dataset = discover_cases(phantom_root)
    root = prepare_cache(dataset, preprocess_settings({"intensity": CT}), tmp_path)
    fingerprint = json.loads((root / "fingerprint.json").read_text())
    assert fingerprint["num_cases"] == TINY_PHANTOM["num_cases"]
    assert fingerprint["spacing"]["median"] == pytest.approx(TINY_PHANTOM["spacing"])
    assert fingerprint["shape"]["median"] == TINY_PHANTOM["shape"]
    ct = fingerprint["foreground_intensities"]["CT"]
    # Liver (~60 HU) and hypodense lesions make up the foreground.
    assert -50 < ct["percentile_00_5"] < ct["median"] < ct["percentile_99_5"] < 150

    suggested = suggest(fingerprint, (16, 16, 16), max_patch_voxels=32**3)
    # 7.5 mm is 3x coarser than 2.5 mm but not more: the median spacing is kept.
    assert suggested["spacing"] == pytest.approx(TINY_PHANTOM["spacing"])
    # The median volume (48 x 48 x 16 voxels, 120 mm along every axis) exceeds the budget:
    # the first of the equally long axes shrinks by one stride.
    assert suggested["patch_size"] == [32, 48, 16]
    assert suggested["intensity"]["mode"] == "ct_window"
    line = override_line(suggested, {"mode": "zscore"})
    assert line.startswith("data.preprocess.spacing=[2.5,2.5,7.5] data.patch_size=[32,48,16] ")
    assert "data.preprocess.intensity.mode=ct_window ++data.preprocess.intensity.window=[" in line
    zscore = {**suggested, "intensity": {"mode": "zscore"}}
    assert override_line(zscore, CT).endswith(
        "intensity.mode=zscore ~data.preprocess.intensity.window"
    )


def test_prepare_command_prepares_the_cache_and_prints_overrides(tmp_path, phantom_root, capsys):
    cfg = compose_config(
        "prepare",
        [
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path}/run",
            f"data.root={phantom_root}",
            "data.phantom=null",
            "data.preprocess.spacing=null",
        ],
    )
    metrics = pipeline.prepare(cfg)
    assert metrics["num_cases"] == TINY_PHANTOM["num_cases"]
    caches = list((tmp_path / "data" / "cache").iterdir())
    assert len(caches) == 1 and caches[0].name.startswith("phantom-")
    assert (caches[0] / "phantom_007" / "image" / "zarr.json").is_file()
    printed = capsys.readouterr().out
    assert "data.preprocess.spacing=[2.5,2.5,7.5] data.patch_size=[" in printed


def test_prepare_without_a_cache_dir_is_a_clear_error(tmp_path):
    result = run_script("scripts/prepare.py", f"paths.root_dir={tmp_path}", "data.cache_dir=null")
    assert result.returncode == 1
    assert "data.cache_dir is null" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_cache_groups_are_a_zarr_dataset_with_geometry(phantom_root, tmp_path):
    dataset = discover_cases(phantom_root)
    settings = preprocess_settings({"intensity": CT})
    root = prepare_cache(dataset, settings, tmp_path)
    as_dataset = zarr_store.discover_zarr_dataset(root)
    assert as_dataset.labels == dataset.labels and as_dataset.channels == ("CT",)
    assert [c.case_id for c in as_dataset.cases] == [c.case_id for c in dataset.cases]
    group = zarr_store.open_group(root / "phantom_000")
    meta = group.attrs["medseg"]
    assert group.attrs["spacing"] == pytest.approx(TINY_PHANTOM["spacing"])
    assert meta["source"]["shape"] == TINY_PHANTOM["shape"]
    assert len(meta["signature"]) == 2 and meta["signature"][0][0].endswith("phantom_000.nii.gz")
    assert sum(meta["label_counts"].values()) == np.prod(TINY_PHANTOM["shape"])
