import itertools

import pytest
import torch

from medseg.inference import gaussian_importance, sliding_window_inference, window_starts
from medseg.models.unet import ResidualSEUNet


def test_window_covering_the_volume_equals_the_network_output():
    torch.manual_seed(0)
    net = ResidualSEUNet(1, 3, width=4, num_stages=3, blocks_per_stage=1).eval()
    image = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        expected = net(image)
        actual = sliding_window_inference(image, net, window=(16, 16, 8), overlap=0.5)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
def test_pointwise_predictor_is_reproduced_exactly(overlap):
    """A voxel-wise predictor gives the same value in every window: blending must not alter it."""
    conv = torch.nn.Conv3d(2, 3, 1)
    image = torch.randn(1, 2, 21, 17, 9)
    with torch.no_grad():
        expected = conv(image)
        actual = sliding_window_inference(
            image, conv, window=(8, 8, 4), overlap=overlap, batch_size=3
        )
    torch.testing.assert_close(actual, expected)


def test_volume_smaller_than_the_window_is_padded_and_cropped_back():
    conv = torch.nn.Conv3d(1, 2, 1)
    image = torch.randn(1, 1, 5, 12, 3)
    with torch.no_grad():
        out = sliding_window_inference(image, conv, window=(8, 8, 8))
        torch.testing.assert_close(out, conv(image))


def test_window_starts_cover_the_axis_with_the_requested_overlap():
    starts = window_starts(100, 32, 0.5)
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert all(b - a <= 16 for a, b in itertools.pairwise(starts))
    assert window_starts(20, 32, 0.5) == [0]


def test_gaussian_importance_peaks_in_the_centre_and_is_positive():
    weights = gaussian_importance((9, 9, 5))
    assert weights.max() == 1 and weights[4, 4, 2] == 1
    assert weights.min() > 0
    assert weights[0, 0, 0] < weights[2, 2, 1] < weights[4, 4, 2]


@pytest.mark.parametrize("size", [33, 40, 47, 64, 100])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
def test_window_layout_is_mirror_symmetric_and_covers_every_voxel(size, overlap):
    starts = window_starts(size, 16, overlap)
    assert starts == [size - 16 - s for s in reversed(starts)]
    covered = torch.zeros(size, dtype=torch.bool)
    for start in starts:
        covered[start : start + 16] = True
    assert covered.all()


def test_gaussian_importance_has_monais_floor():
    weights = gaussian_importance((64, 64, 64))
    assert weights.min() == pytest.approx(1e-3)
    # The centre (between voxels 31 and 32) is where the weight is largest.
    assert weights[31, 31, 31] == weights[32, 32, 32] == weights.max()
