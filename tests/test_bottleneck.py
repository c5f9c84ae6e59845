"""The window/bottleneck arithmetic: what is refused, what is warned about, what is suggested."""

import re
from dataclasses import replace

import pytest

from medseg.errors import ConfigError
from medseg.models.bottleneck import WindowKeys, check_window, feature_sizes, total_stride
from medseg.module import build_module

from .conftest import compose_config, tiny_data_overrides

FIVE_STAGES = [[1, 1, 1]] + [[2, 2, 2]] * 4  # model.strides=null with model.num_stages=5
KEYS = WindowKeys("segmentation", "data.patch_size", (1, 1, 1), "model", explicit_strides=False)


def test_feature_sizes_follow_anisotropic_strides():
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert total_stride(strides) == (4, 8, 4)
    assert feature_sizes([16, 64, 32], strides) == [
        (16, 64, 32),
        (16, 32, 16),
        (8, 16, 8),
        (4, 8, 8),
    ]
    assert check_window([16, 64, 32], strides, KEYS, bf16_on_cpu=True) is None


def test_the_issue_patch_is_refused_in_bf16_on_the_cpu_with_what_would_work():
    with pytest.raises(ConfigError) as error:
        check_window([32, 32, 16], FIVE_STAGES, KEYS, bf16_on_cpu=True)
    message = str(error.value)
    assert message.startswith(
        "stage 'segmentation': data.patch_size=[32, 32, 16] with model.num_stages=5 and "
        "model.strides=null (total stride [16, 16, 16]) gives a bottleneck of [2, 2, 1] voxels "
        "and feature maps 2 voxels deep along the first axis "
        "([[32, 32, 16], [16, 16, 8], [8, 8, 4], [4, 4, 2], [2, 2, 1]])"
    )
    assert message.endswith(
        "use data.patch_size=[48, 32, 16] or model.num_stages=4 (bottleneck [4, 4, 2]), or "
        "trainer.precision=32-true"
    )
    # Both suggestions train (below nnU-Net's rule: with a warning).
    assert "bottleneck of [3, 2, 1]" in check_window([48, 32, 16], FIVE_STAGES, KEYS, True)
    assert "bottleneck of [4, 4, 2]" in check_window([32, 32, 16], FIVE_STAGES[:4], KEYS, True)


def test_below_nnunets_rule_is_a_warning_naming_the_keys():
    # In 32-bit precision the issue's patch trains: a warning, not an error.
    warning = check_window([32, 32, 16], FIVE_STAGES, KEYS)
    assert "gives a bottleneck of [2, 2, 1] voxels, below nnU-Net's 4 per axis" in warning
    assert warning.endswith(
        "data.patch_size=[64, 64, 64] or model.num_stages=3 (bottleneck [8, 8, 4]) would keep it"
    )
    # The defaults (data=phantom, model=resse_unet_tiny) train well: a warning only.
    default = check_window([64, 64, 32], FIVE_STAGES, KEYS, bf16_on_cpu=True)
    assert "bottleneck of [4, 4, 2] voxels" in default
    assert check_window([64, 64, 64], FIVE_STAGES, KEYS, bf16_on_cpu=True) is None


@pytest.mark.parametrize(
    ("window", "strides", "message"),
    [
        (
            [40, 32, 16],
            FIVE_STAGES,
            "not a multiple of the total stride; use data.patch_size=[48, 32, 16]",
        ),
        ([16, 16, 16], FIVE_STAGES, "leaves a 1-voxel bottleneck"),
        ([16, 16, 16], FIVE_STAGES, "data.patch_size=[64, 64, 64] or model.num_stages=3"),
        ([8, 16, 16], [[1, 1, 1], [2, 4, 4], [4, 4, 4]], "(total stride [8, 16, 16])"),
    ],
)
def test_windows_that_cannot_work_are_refused(window, strides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_window(window, strides, KEYS)


def test_messages_use_the_keys_units_and_explicit_strides():
    keys = WindowKeys("organ", "data.patch_size", (2, 2, 1), "stage.stages[0].network", True)
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]  # total stride [8, 8, 4]
    with pytest.raises(ConfigError) as error:
        check_window([16, 16, 8], strides, keys, bf16_on_cpu=True)  # data patch [32, 32, 8]
    message = str(error.value)
    assert "data.patch_size=[32, 32, 8] with stage.stages[0].network.num_stages=4 and " in message
    assert "stage.stages[0].network.strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]" in message
    assert (
        "use data.patch_size=[48, 32, 8] or stage.stages[0].network.num_stages=3 and its "
        in message
    )
    assert "first 3 stage.stages[0].network.strides (bottleneck [4, 4, 2])" in message


def test_2d_windows_are_not_refused_for_bf16():
    strides = [[1, 1]] + [[2, 2]] * 4
    warning = check_window([32, 32], strides, replace(KEYS, scale=(1, 1)), bf16_on_cpu=True)
    assert "bottleneck of [2, 2] voxels" in warning


def test_the_module_names_the_keys_of_each_stage(tmp_path, phantom_root):
    # organ: data.patch_size / downsample [2, 2, 1]; lesion: its own patch_size
    overrides = [*tiny_data_overrides(tmp_path, phantom_root), "stage=binary_first"]
    cfg = compose_config("train", [*overrides, "stage.stages.1.patch_size=[32,32,32]"])
    labels = {0: "background", 1: "liver", 2: "lesion"}
    module = build_module(cfg.model, cfg.stage, cfg.loss, 1, labels, [128, 128, 32])
    organ, lesion = module.check_windows()
    assert organ.startswith("stage 'organ': data.patch_size=[128, 128, 32] with model.num_stages")
    assert "bottleneck of [4, 4, 2] voxels" in organ
    assert "data.patch_size=[128, 128, 64] or model.num_stages=4" in organ
    assert lesion.startswith("stage 'lesion': stage.stages[1].patch_size=[32, 32, 32] with ")
    with pytest.raises(ConfigError, match=r"^stage 'lesion': stage.stages\[1\].patch_size="):
        module.check_windows(bf16_on_cpu=True)
