"""Stage specs of a cascade: validation with clear errors, composition maps and the schedule."""

import re

import pytest

from medseg.errors import ConfigError
from medseg.stages import build_cascade

from .conftest import compose_config

LABELS = {0: "background", 1: "liver", 2: "lesion"}


def cascade_cfg(**changes) -> dict:
    """The binary_first stage config (as shipped), with changes to stage entries by index."""
    cfg = compose_config("train", ["stage=binary_first", "paths.root_dir=.", "paths.output_dir=."])
    stage = {
        "stages": [dict(s) for s in cfg.stage.stages],
        "freeze_earlier": cfg.stage.freeze_earlier,
    }
    for index, entry in changes.items():
        stage["stages"][int(index.removeprefix("s"))].update(entry)
    return stage


def test_binary_first_composes_and_validates():
    cascade = build_cascade(cascade_cfg(), LABELS)
    assert cascade.names == ["organ", "lesion"]
    assert cascade.class_names == ["background", "liver", "lesion"]
    assert cascade.composed_values() == {0: 0, 1: 1, 2: 2}
    assert cascade.stage_values(cascade.stage("organ")) == {0: 0, 1: 1, 2: 1}
    assert cascade.stage_values(cascade.stage("lesion")) == {0: 0, 1: 0, 2: 1}
    assert cascade.mask_producers == ["organ"]


def test_single_stage_predicts_every_dataset_label():
    cfg = compose_config("train", ["paths.root_dir=.", "paths.output_dir=."])
    cascade = build_cascade({"stages": [dict(s) for s in cfg.stage.stages]}, LABELS)
    assert cascade.class_names == ["background", "liver", "lesion"]
    assert cascade.trainable(0) == cascade.trainable(99) == ["segmentation"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"s1": {"classes": {"lesion": [7]}}}, "class 'lesion' refers to label values [7]"),
        ({"s0": {"input_masks": ["lesion"]}}, "refers to the later stage 'lesion'"),
        (
            {"s1": {"region": {"stage": "liver", "margin_mm": 5}}},
            "refers to an unknown stage 'liver'",
        ),
        ({"s1": {"input_masks": ["lesion"]}}, "refers to itself 'lesion'"),
        ({"s0": {"classes": {"liver": [1]}}}, "must lie inside those of its region stage 'organ'"),
        ({"s0": {"epochs": None}}, "epochs is required for every stage but the last"),
        ({"s1": {"classes": {"liver": [2]}}}, "class name 'liver' is used twice"),
        ({"s1": {"thresh": 0.5}}, "unknown keys ['thresh']"),
        ({"s1": {"name": "le.sion"}}, "a stage name must be an identifier"),
        ({"s0": {"largest_component": "yes"}}, "largest_component must be true or false"),
        ({"s0": {"downsample": 2}}, "stage.stages[0].downsample must be a list with one integer"),
    ],
)
def test_invalid_stages_give_a_clear_error(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_cascade(cascade_cfg(**changes), LABELS)


def test_curriculum_freezes_earlier_stages():
    stage = cascade_cfg(s0={"epochs": 3})
    stage["freeze_earlier"] = True
    cascade = build_cascade(stage, LABELS)
    assert [cascade.trainable(e) for e in (0, 2, 3, 10)] == [
        ["organ"],
        ["organ"],
        ["lesion"],
        ["lesion"],
    ]
    assert cascade.sampling_stage(1).name == "organ" and cascade.sampling_stage(3).name == "lesion"
    assert cascade.training_epochs("organ", 10) == 3
    assert cascade.training_epochs("lesion", 10) == 7
    with pytest.raises(ConfigError, match=re.escape("starts at epoch 3 but trainer.max_epochs=3")):
        cascade.check_epochs(3)


def test_stages_may_start_together_only_without_freezing():
    stage = cascade_cfg(s0={"epochs": 0})
    stage["freeze_earlier"] = True
    with pytest.raises(ConfigError, match="0 needs freeze_earlier: false"):
        build_cascade(stage, LABELS)
    stage["freeze_earlier"] = False
    cascade = build_cascade(stage, LABELS)
    assert cascade.trainable(0) == ["organ", "lesion"]
    assert cascade.training_epochs("lesion", 10) == cascade.training_epochs("organ", 10) == 10


def test_curriculum_without_freezing_keeps_training_earlier_stages():
    stage = cascade_cfg(s0={"epochs": 3})
    stage["freeze_earlier"] = False
    cascade = build_cascade(stage, LABELS)
    assert cascade.trainable(2) == ["organ"]
    assert cascade.trainable(3) == ["organ", "lesion"]
    assert cascade.training_epochs("organ", 10) == 10


def test_finetune_selected_stages_and_progressive_unfreezing():
    selected = build_cascade(cascade_cfg(), LABELS, {"ckpt_path": "x.ckpt", "stages": ["lesion"]})
    assert selected.trainable(0) == selected.trainable(5) == ["lesion"]
    everything = build_cascade(cascade_cfg(), LABELS, {"ckpt_path": "x.ckpt", "stages": "all"})
    assert everything.trainable(0) == ["organ", "lesion"]
    progressive = build_cascade(cascade_cfg(), LABELS, {"ckpt_path": "x.ckpt", "unfreeze_every": 2})
    assert [progressive.trainable(e) for e in (0, 1, 2, 7)] == [
        ["lesion"],
        ["lesion"],
        ["organ", "lesion"],
        ["organ", "lesion"],
    ]
    with pytest.raises(ConfigError, match=re.escape("finetune.stages names unknown stages ['x']")):
        build_cascade(cascade_cfg(), LABELS, {"ckpt_path": "x.ckpt", "stages": ["x"]})
