import pytest
import torch

from medseg.errors import ConfigError
from medseg.models.blocks import SqueezeExcitation
from medseg.models.unet import ResidualSEUNet


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_output_shapes(dims, deep_supervision):
    torch.manual_seed(0)
    size = (32, 32, 16)[:dims]
    net = ResidualSEUNet(
        2,
        4,
        dims=dims,
        width=4,
        num_stages=4,
        blocks_per_stage=[1, 2, 1, 1],
        deep_supervision=deep_supervision,
    )
    x = torch.randn(2, 2, *size)
    net.train()
    out = net(x)
    if deep_supervision:
        assert isinstance(out, list)
        expected = [(2, 4, *(s // 2**i for s in size)) for i in range(3)]
        assert [tuple(o.shape) for o in out] == expected
    else:
        assert tuple(out.shape) == (2, 4, *size)
    net.eval()
    with torch.no_grad():
        assert tuple(net(x).shape) == (2, 4, *size)


def test_features_follow_width_and_cap():
    net = ResidualSEUNet(
        1, 3, width=32, max_features=320, num_stages=6, blocks_per_stage=[1, 3, 4, 6, 6, 6]
    )
    assert net.features == [32, 64, 128, 256, 320, 320]
    assert [len(stage) for stage in net.encoder] == [1, 3, 4, 6, 6, 6]
    assert net.total_stride == (32, 32, 32)


def test_anisotropic_strides():
    net = ResidualSEUNet(
        1,
        2,
        width=4,
        num_stages=3,
        blocks_per_stage=1,
        strides=[1, [2, 2, 1], 2],
        deep_supervision=False,
    )
    assert net.total_stride == (4, 4, 2)
    assert net(torch.randn(1, 1, 16, 16, 6)).shape == (1, 2, 16, 16, 6)


def test_se_pooling_is_global():
    """The gate depends only on the spatial mean: moving voxels around never changes it."""
    torch.manual_seed(0)
    se = SqueezeExcitation(3, channels=8, ratio=0.5)
    x = torch.randn(1, 8, 6, 5, 4)
    permutation = torch.randperm(6 * 5 * 4)
    shuffled = x.flatten(2)[..., permutation].reshape(x.shape)
    expected = torch.sigmoid(se.expand(torch.relu(se.reduce(x.mean((2, 3, 4), keepdim=True)))))
    torch.testing.assert_close(se(x), x * expected)
    torch.testing.assert_close(se(shuffled), shuffled * expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": "abc"}, "model.width must be a positive integer, got 'abc'"),
        ({"dims": 4}, "model.dims must be one of"),
        ({"blocks_per_stage": [1, 2]}, "model.blocks_per_stage needs 3 entries"),
        ({"strides": [1, 2, [2, 2]]}, "model.strides entries"),
    ],
)
def test_invalid_settings_name_the_config_key(kwargs, message):
    settings = {"width": 4, "num_stages": 3, "blocks_per_stage": 1, **kwargs}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ResidualSEUNet(1, 2, **settings)


def test_input_not_divisible_by_total_stride():
    net = ResidualSEUNet(1, 2, width=4, num_stages=3, blocks_per_stage=1)
    with pytest.raises(
        ConfigError, match=r"not a multiple of the network's total stride \(4, 4, 4\)"
    ):
        net(torch.randn(1, 1, 16, 16, 10))
    with pytest.raises(ConfigError, match="1-voxel bottleneck"):
        net.check_input_size((4, 4, 4))


def test_dropout_is_off_by_default_and_samples_in_training_mode():
    torch.manual_seed(0)
    plain = ResidualSEUNet(1, 2, width=4, num_stages=2, blocks_per_stage=1)
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    net = ResidualSEUNet(1, 2, width=4, num_stages=2, blocks_per_stage=1, dropout=0.3)
    assert plain.state_dict().keys() == net.state_dict().keys()  # old checkpoints still load
    x = torch.randn(1, 1, 16, 16, 8)
    net.eval()
    torch.testing.assert_close(net(x), net(x))
    net.train()
    assert not torch.allclose(net(x)[0], net(x)[0])
    with pytest.raises(ConfigError, match=r"model.dropout must be a number in \[0, 1\), got 1"):
        ResidualSEUNet(1, 2, dropout=1)


@pytest.mark.parametrize("dims", [2, 3])
def test_decoder_free_network_and_decoder_features(dims):
    size = (32, 32, 16)[:dims]
    encoder_only = ResidualSEUNet(
        1, 0, dims=dims, width=4, num_stages=3, blocks_per_stage=1, decoder=False
    )
    assert len(encoder_only.decoder) == 0 and len(encoder_only.seg_heads) == 0
    features = encoder_only.encode(torch.randn(2, 1, *size))
    assert [f.shape[1] for f in features] == [4, 8, 16]
    net = ResidualSEUNet(1, 3, dims=dims, width=4, num_stages=3, blocks_per_stage=1)
    decoded = net.decode_features(net.encode(torch.randn(2, 1, *size)))
    assert [tuple(f.shape[:2]) for f in decoded] == [(2, 4), (2, 8)]
    assert net.decoder_features == [4, 8]
    with pytest.raises(ConfigError, match="needs its decoder"):
        ResidualSEUNet(1, 3, width=4, num_stages=3, blocks_per_stage=1, decoder=False)
