"""Task heads: shapes in 2D and 3D, attention over encoder scales, settings errors."""

import pytest
import torch

from medseg.errors import ConfigError
from medseg.models.heads import MultiScaleAttentionHead, TaskHeads
from medseg.models.unet import ResidualSEUNet
from medseg.tasks import parse_task

LABELS = {0: "background", 1: "liver", 2: "lesion"}
TASKS = [
    {"name": "organ", "type": "segmentation", "classes": {"liver": [1, 2], "lesion": [2]}},
    {"name": "distance", "type": "voxel_regression", "distance_to": [1, 2]},
    {
        "name": "count",
        "type": "classification",
        "classes": ["a", "b", "c", "d"],
        "head": {"hidden": 8},
    },
    {"name": "volume", "type": "regression", "head": {"scales": 2}},
]


@pytest.mark.parametrize("dims", [2, 3])
def test_heads_output_shapes(dims):
    torch.manual_seed(0)
    size = (32, 32, 16)[:dims]
    net = ResidualSEUNet(2, 3, dims=dims, width=4, num_stages=4, blocks_per_stage=1)
    tasks = [parse_task(t, "t", LABELS) for t in TASKS]
    heads = TaskHeads(tasks, dims, net.features, net.decoder_features[0])
    encoder = net.encode(torch.randn(2, 2, *size))
    outputs = heads(encoder, net.decode_features(encoder, all_levels=False)[0])
    assert tuple(outputs["organ"].shape) == (2, 3, *size)  # background + 2 classes
    assert tuple(outputs["distance"].shape) == (2, 1, *size)
    assert tuple(outputs["count"].shape) == (2, 4)
    assert tuple(outputs["volume"].shape) == (2, 1)
    assert heads.heads["count"].num_scales == 3 and heads.heads["volume"].num_scales == 2


@pytest.mark.parametrize("dims", [2, 3])
def test_attention_weighs_the_pooled_scales(dims):
    torch.manual_seed(0)
    head = MultiScaleAttentionHead([4, 8, 16], num_outputs=3, hidden=8, dropout=0.0)
    spatial = [(16, 16, 8), (8, 8, 4), (4, 4, 2)]
    features = [torch.randn(5, c, *s[:dims]) for c, s in zip([4, 8, 16], spatial, strict=True)]
    pooled, weights = head.attend(features)
    assert pooled.shape == (5, 8) and weights.shape == (5, 3)
    torch.testing.assert_close(weights.sum(1), torch.ones(5))
    assert not torch.allclose(weights[0], weights[1])  # attention depends on the case
    # The output is the attention-weighted sum of the scales' features.
    scales = torch.stack([head.scale_features(i, f) for i, f in enumerate(features)], 1)
    torch.testing.assert_close(pooled, (weights[..., None] * scales).sum(1))
    # A scale's features depend on its voxels as a set: shuffling voxels changes nothing.
    shuffled = features[0].flatten(2)[..., torch.randperm(16 * 16 * 8 if dims == 3 else 256)]
    torch.testing.assert_close(
        head.scale_features(0, shuffled.reshape(features[0].shape)), scales[:, 0]
    )
    torch.testing.assert_close(head(features), head.output(pooled))


def test_head_settings_are_checked():
    net = ResidualSEUNet(1, 3, width=4, num_stages=3, blocks_per_stage=1)
    for head, message in [
        ({"scales": 4}, r"head.scales must be an integer in \[1, 3\]"),
        ({"width": 3}, r"unknown head settings \['width'\]"),
        ({"hidden": 0}, "head.hidden must be a positive integer"),
    ]:
        task = parse_task({"name": "v", "type": "regression", "head": head}, "t", LABELS)
        with pytest.raises(ConfigError, match=message):
            TaskHeads([task], 3, net.features, net.decoder_features[0])


def test_case_heads_compute_in_float32_under_mixed_precision():
    torch.manual_seed(0)
    head = MultiScaleAttentionHead([4, 8], num_outputs=2, hidden=8, dropout=0.0)
    features = [torch.randn(2, 4, 8, 8, 4), torch.randn(2, 8, 4, 4, 2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head([f.bfloat16() for f in features])
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, head([f.bfloat16().float() for f in features]))
