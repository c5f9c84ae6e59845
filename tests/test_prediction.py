"""Prediction in the input's own geometry, folders with bad files, TTA, ensembles, MC dropout."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medseg.data.phantom import generate_case
from medseg.errors import ConfigError, DataError
from medseg.inference import predict_cascade_averaged
from medseg.models.unet import ResidualSEUNet
from medseg.module import SegmentationModule
from medseg.prediction import (
    Predictor,
    find_input_cases,
    predict_cases,
    resample_to_grid,
    write_prediction,
)

LABELS = {0: "background", 1: "liver", 2: "lesion"}
SPACING = (1.0, 1.0, 2.0)


def make_module(
    preprocess: dict | None = None, window=(16, 16, 8), dropout: float = 0.0, in_channels: int = 1
) -> SegmentationModule:
    torch.manual_seed(0)
    return SegmentationModule(
        network={"width": 4, "num_stages": 2, "blocks_per_stage": 1, "dropout": dropout},
        in_channels=in_channels,
        stages=[{"name": "segmentation", "classes": {"liver": [1], "lesion": [2]}}],
        dataset_labels=LABELS,
        loss={"_target_": "medseg.losses.DiceCELoss"},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01},
        inference={"window": list(window)},
        preprocess=preprocess or {"canonical": True, "intensity": {"mode": "none"}},
    ).eval()


class OneLevelNet(nn.Module):
    """A hand-made stand-in for a stage's ResidualSEUNet: `forward` gives the logits, and the
    encode / decode / segment interface the module calls passes the input through to it."""

    def check_input_size(self, size) -> None:
        pass

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]

    def decode_features(self, skips: list[torch.Tensor], all_levels: bool = True) -> list:
        return skips

    def segment(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self(features[0])]


class NearestLabel(OneLevelNet):
    """Voxel-wise logits whose argmax is the label value nearest to the intensity."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv3d(1, num_classes, 1)
        with torch.no_grad():
            k = torch.arange(num_classes, dtype=torch.float32)
            self.conv.weight.copy_(4 * k.view(-1, 1, 1, 1, 1))  # sharp: near one-hot
            self.conv.bias.copy_(-2 * k**2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def oracle_module(preprocess: dict | None = None) -> SegmentationModule:
    """A module that 'segments' an image whose intensities are the label values."""
    module = make_module(preprocess)
    module.nets["segmentation"] = NearestLabel()
    return module


def flip_affine(affine: np.ndarray, shape, axes) -> np.ndarray:
    """Affine of the array flipped along `axes` that keeps every voxel's world position."""
    flip = np.eye(4)
    for axis in axes:
        flip[axis, axis] = -1
        flip[axis, 3] = shape[axis] - 1
    return affine @ flip


def rotation_z(degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return rotation


@pytest.fixture(scope="module")
def phantom_label() -> tuple[np.ndarray, np.ndarray]:
    case = generate_case(3, shape=(48, 48, 16), spacing=(2.5, 2.5, 7.5))
    return case.label, case.affine


def save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(affine, np.argwhere(mask).mean(0))


@pytest.mark.parametrize(
    ("name", "transform"),
    [
        (
            "lps",
            lambda label, affine: (label[::-1, ::-1], flip_affine(affine, label.shape, [0, 1])),
        ),
        ("oblique", lambda label, affine: (label, rotation_z(30) @ affine)),
        ("permuted", lambda label, affine: (label.transpose(2, 0, 1), affine[:, [2, 0, 1, 3]])),
    ],
)
def test_prediction_keeps_the_input_geometry_exactly(phantom_label, tmp_path, name, transform):
    """Reorientation to RAS is undone exactly: the prediction equals the label voxel for voxel."""
    label, affine = transform(*phantom_label)
    label = np.ascontiguousarray(label)
    image = save(label.astype(np.float32), affine, tmp_path / f"{name}.nii.gz")
    (case,) = find_input_cases(image)
    written = write_prediction(Predictor([oracle_module()]).predict(case), tmp_path / "out")
    output = nib.load(written)
    assert output.shape == label.shape
    np.testing.assert_array_equal(output.affine, nib.load(image).affine)
    assert output.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(output.dataobj), label)


def test_resampled_prediction_lands_on_the_labels_world_coordinates(phantom_label, tmp_path):
    """LPS input at 2.5 x 2.5 x 7.5 mm, network grid 2 x 2 x 3 mm: back on the input grid."""
    label, affine = phantom_label
    lps_label = np.ascontiguousarray(label[::-1, ::-1])
    lps_affine = flip_affine(affine, label.shape, [0, 1])
    image = save(lps_label.astype(np.float32), lps_affine, tmp_path / "case.nii.gz")
    preprocess = {"canonical": True, "spacing": [2.0, 2.0, 3.0], "intensity": {"mode": "none"}}
    predictor = Predictor([oracle_module(preprocess)])
    written = write_prediction(predictor.predict(find_input_cases(image)[0]), tmp_path)
    predicted = np.asanyarray(nib.load(written).dataobj)
    assert predicted.shape == label.shape
    for value in (1, 2):
        reference, mask = lps_label == value, predicted == value
        dice = 2 * (reference & mask).sum() / (reference.sum() + mask.sum())
        assert dice > 0.9
        shift = world_centroid(mask, lps_affine) - world_centroid(reference, lps_affine)
        assert np.all(np.abs(shift) < np.array([2.5, 2.5, 7.5]) / 2)


def test_resample_to_grid_replicates_the_border():
    volume = torch.arange(8, dtype=torch.float32).reshape(1, 2, 2, 2)
    # target grid shifted by half a voxel beyond the source on every axis
    target = np.eye(4)
    target[:3, 3] = -0.5
    out = resample_to_grid(volume, np.eye(4), target, (3, 3, 3))
    assert out[0, 0, 0, 0] == 0 and out[0, 2, 2, 2] == 7
    assert out.min() >= 0 and out.max() <= 7


def test_folder_with_a_bad_file_predicts_the_rest(phantom_label, tmp_path):
    label, affine = phantom_label
    folder = tmp_path / "in"
    folder.mkdir()
    save(label.astype(np.float32), affine, folder / "good_a.nii.gz")
    save(label.astype(np.float32), affine, folder / "good_b.nii")
    (folder / "broken.nii.gz").write_text("not an image")
    two_channels = np.stack([label, label], -1).astype(np.float32)
    save(two_channels, affine, folder / "two_channels.nii.gz")
    (folder / "notes.txt").write_text("ignored")
    cases = find_input_cases(folder)
    assert [c.case_id for c in cases] == ["broken", "good_a", "good_b", "two_channels"]
    run = predict_cases(Predictor([oracle_module()]), cases, tmp_path / "out", progress=False)
    assert sorted(run.written) == ["good_a", "good_b"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "good_a.nii.gz",
        "good_b.nii.gz",
    ]
    assert len(run.failures) == 2
    assert f"{folder / 'broken.nii.gz'}: cannot be read as an image" in run.failures[0]
    assert run.failures[1] == (
        f"{folder / 'two_channels.nii.gz'}: has 2 channel(s), the model expects 1"
    )


def test_channel_files_of_a_case_are_grouped(tmp_path):
    for name in ("b_0001.nii.gz", "b_0000.nii.gz", "a.nii.gz", ".hidden.nii.gz"):
        (tmp_path / name).touch()
    cases = find_input_cases(tmp_path)
    assert [(c.case_id, [p.name for p in c.images]) for c in cases] == [
        ("a", ["a.nii.gz"]),
        ("b", ["b_0000.nii.gz", "b_0001.nii.gz"]),
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"input: no images in .*NRRD"):
        find_input_cases(tmp_path / "empty")
    with pytest.raises(DataError, match=r"input: .*missing does not exist"):
        find_input_cases(tmp_path / "missing")


def test_probability_maps_are_written_with_the_input_affine(phantom_label, tmp_path):
    label, affine = phantom_label
    image = save(label.astype(np.float32), affine, tmp_path / "case.nii.gz")
    prediction = Predictor([oracle_module()]).predict(find_input_cases(image)[0])
    write_prediction(prediction, tmp_path / "out", save_probabilities=True)
    probabilities = nib.load(tmp_path / "out" / "probabilities" / "case.nii.gz")
    assert probabilities.shape == (*label.shape, 3)
    np.testing.assert_array_equal(probabilities.affine, affine)
    data = probabilities.get_fdata()
    np.testing.assert_allclose(data.sum(-1), 1, atol=1e-5)
    np.testing.assert_array_equal(data.argmax(-1), label)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


class MirrorSymmetricNet(OneLevelNet):
    """A 3x3x3 convolution whose kernels are symmetric under every flip: flips commute with it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, padding=1, padding_mode="replicate")
        with torch.no_grad():
            weight = self.conv.weight
            for dims in ([2], [3], [4]):
                weight = (weight + weight.flip(dims)) / 2
            self.conv.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.tanh(x))


def predict_probabilities(modules, image, spacing, **kwargs) -> torch.Tensor:
    return predict_cascade_averaged(modules, image, spacing, **kwargs).probabilities


def test_mirroring_equals_the_plain_prediction_for_a_symmetric_network_and_input():
    module = make_module(window=(16, 16, 8))
    module.nets["segmentation"] = MirrorSymmetricNet()
    torch.manual_seed(1)
    image = torch.randn(1, 1, 21, 18, 11)
    for axis in (2, 3, 4):
        image = (image + image.flip(axis)) / 2
    plain = predict_probabilities([module], image, SPACING)
    mirrored = predict_probabilities([module], image, SPACING, mirror_axes=[0, 1, 2])
    torch.testing.assert_close(mirrored, plain, atol=1e-6, rtol=0)


def test_mirroring_averages_the_flipped_predictions():
    module = make_module(window=(8, 8, 4))
    image = torch.randn(1, 1, 16, 16, 8)
    with torch.inference_mode():
        plain = module.predict_volume(image, SPACING).probabilities
        flipped = module.predict_volume(image.flip(2), SPACING).probabilities.flip(2)
    mirrored = predict_probabilities([module], image, SPACING, mirror_axes=[0])
    torch.testing.assert_close(mirrored, (plain + flipped) / 2)
    with pytest.raises(ConfigError, match="mirror_axes must be spatial axes"):
        predict_probabilities([module], image, SPACING, mirror_axes=[3])


def test_ensemble_averages_the_members_probabilities():
    first, second = make_module(), make_module()
    torch.manual_seed(5)
    second.nets["segmentation"] = ResidualSEUNet(1, 3, width=4, num_stages=2, blocks_per_stage=1)
    second.eval()
    image = torch.randn(1, 1, 16, 16, 8)
    with torch.inference_mode():
        expected = (
            first.predict_volume(image, SPACING).probabilities
            + second.predict_volume(image, SPACING).probabilities
        ) / 2
    torch.testing.assert_close(predict_probabilities([first, second], image, SPACING), expected)


def test_ensemble_members_must_agree():
    other = make_module(preprocess={"canonical": False, "intensity": {"mode": "none"}})
    with pytest.raises(ConfigError, match="checkpoint 1 differs from checkpoint 0 in preprocess"):
        Predictor([make_module(), other])


def test_an_older_ensemble_member_without_newer_preprocess_settings_fits():
    current = {"canonical": True, "intensity": {"mode": "none"}, "nonfinite": "error"}
    older = make_module(preprocess={"canonical": True, "intensity": {"mode": "none"}})
    assert len(Predictor([make_module(preprocess=current), older]).modules) == 2


def test_mc_dropout_writes_an_entropy_map(phantom_label, tmp_path):
    label, affine = phantom_label
    image = save(label.astype(np.float32), affine, tmp_path / "case.nii.gz")
    (case,) = find_input_cases(image)
    with pytest.raises(ConfigError, match="needs a network trained with dropout"):
        Predictor([make_module()], mc_dropout_samples=2).predict(case)
    module = make_module(window=(48, 48, 16), dropout=0.5)
    prediction = Predictor([module], mc_dropout_samples=4).predict(case)
    assert not any(m.training for m in module.modules())
    write_prediction(prediction, tmp_path / "out")
    entropy = nib.load(tmp_path / "out" / "entropy" / "case.nii.gz")
    np.testing.assert_array_equal(entropy.affine, affine)
    values = entropy.get_fdata()
    assert values.shape == label.shape
    assert values.min() >= 0 and values.max() <= np.log(3) + 1e-6
    # Sampling makes the passes disagree: the predictive entropy is not that of one pass.
    plain = Predictor([module]).predict(case).probabilities
    plain_entropy = -(plain * np.log(np.clip(plain, 1e-12, None))).sum(-1)
    assert np.abs(values - plain_entropy).max() > 1e-3
