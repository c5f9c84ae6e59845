"""Task specs: parsing with clear errors, loss-weight schedules, class weights, and how tasks
fit into a cascade's stages."""

import re

import pytest

from medseg.errors import ConfigError
from medseg.stages import build_cascade
from medseg.tasks import WeightSchedule, class_weights, parse_task

LABELS = {0: "background", 1: "liver", 2: "lesion"}
LESION_COUNT = {
    "name": "lesion_count",
    "type": "classification",
    "column": "lesion_class",
    "classes": ["none", "one", "several"],
}


def test_tasks_of_every_type_parse():
    seg = parse_task(
        {"name": "organ", "type": "segmentation", "classes": {"liver": [1, 2]}}, "t", LABELS
    )
    assert seg.class_names == ["background", "liver"] and seg.num_outputs == 2
    dist = parse_task(
        {"name": "dist", "type": "voxel_regression", "distance_to": [1, 2], "clip_mm": 10},
        "t",
        LABELS,
    )
    assert dist.distance_to == (1, 2) and dist.clip_mm == 10 and dist.num_outputs == 1
    cls = parse_task({**LESION_COUNT, "lr": 0.1}, "t", LABELS)
    assert cls.is_case_level and cls.categories == ("none", "one", "several") and cls.lr == 0.1
    assert cls.class_weights == "inverse_frequency" and cls.num_outputs == 3
    reg = parse_task({"name": "liver_volume_ml", "type": "regression"}, "t", LABELS)
    assert reg.column == "liver_volume_ml" and reg.num_outputs == 1  # column defaults to the name
    # Round trip through the checkpoint form.
    for spec in (seg, dist, cls, reg):
        assert parse_task(spec.as_dict(), "t", LABELS) == spec


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "x", "type": "ordinal"}, "type must be one of"),
        ({"name": "a-b", "type": "regression"}, "needs a name that is an identifier"),
        ({"name": "label", "type": "regression"}, "the task name 'label' is reserved"),
        ({**LESION_COUNT, "distance_to": [1]}, "unknown keys ['distance_to'] for a classification"),
        ({**LESION_COUNT, "classes": ["one"]}, "classes must list at least two class values"),
        ({**LESION_COUNT, "classes": ["a", "a"]}, "are not unique"),
        ({**LESION_COUNT, "class_weights": "balanced"}, "class_weights must be one of"),
        ({**LESION_COUNT, "class_weights": [1, 2]}, "class_weights needs 3 weights"),
        ({**LESION_COUNT, "weight": "high"}, "weight must be a number or a mapping"),
        ({**LESION_COUNT, "weight": {0: -1}}, "epochs and weights must be >= 0"),
        ({**LESION_COUNT, "lr": 0}, "lr must be a positive number or null"),
        (
            {**LESION_COUNT, "loss": {"label_smoothing": 0.1}},
            "loss must be a config with a _target_",
        ),
        ({"name": "s", "type": "segmentation", "classes": {"x": [3]}}, "label values [3] are not"),
        ({"name": "d", "type": "voxel_regression", "distance_to": [0]}, "label values [0] are not"),
        (
            {"name": "d", "type": "voxel_regression", "distance_to": [1], "clip_mm": 0},
            "clip_mm must be a positive number",
        ),
    ],
)
def test_invalid_tasks_name_the_key_and_problem(entry, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        parse_task(entry, "stage.stages[0].tasks[1]", LABELS)
    assert str(error.value).startswith("stage.stages[0].tasks[1]")


def test_weight_schedule_values_at_given_epochs():
    warm_up = WeightSchedule.parse({0: 1.0, 10: 3.0}, "w")
    assert [warm_up.at(e) for e in (0, 5, 10, 50)] == [1.0, 2.0, 3.0, 3.0]
    assert not warm_up.constant and warm_up.as_config() == {0: 1.0, 10: 3.0}
    # Constant before the first point, piecewise linear through unordered points.
    delayed = WeightSchedule.parse({8: 0.0, 4: 1.0, 2: 0.0}, "w")
    assert [delayed.at(e) for e in (0, 2, 3, 4, 6, 8, 9)] == [0.0, 0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    constant = WeightSchedule.parse(0.5, "w")
    assert constant.constant and constant.at(100) == 0.5 and constant.as_config() == 0.5


def test_class_weights_match_a_hand_computation():
    # 6 cases: 2 none, 1 one, 3 several -> N / (K * n_c) = 6 / (3 * n_c).
    assert class_weights([2, 1, 3], "inverse_frequency") == pytest.approx([1.0, 2.0, 2 / 3])
    # n_c ** -0.5 = [0.7071, 1, 0.5774], scaled so that sum(n_c * w_c) = 6.
    raw = [2**-0.5, 1.0, 3**-0.5]
    scale = 6 / (2 * raw[0] + raw[1] + 3 * raw[2])
    assert class_weights([2, 1, 3], "inverse_sqrt_frequency") == pytest.approx(
        [r * scale for r in raw]
    )
    assert class_weights([2, 1, 3], "none") == [1.0, 1.0, 1.0]
    assert class_weights([2, 1, 3], [0.5, 1.0, 2.0]) == [0.5, 1.0, 2.0]
    # A class without training cases never meets the loss: weight 0, the others as if K = 2.
    assert class_weights([0, 1, 3], "inverse_frequency") == pytest.approx([0.0, 2.0, 2 / 3])


def stage(**entry) -> dict:
    return {"name": "seg", "classes": None, **entry}


def test_a_stage_may_have_only_tasks():
    cascade = build_cascade({"stages": [stage(classes={}, tasks=[LESION_COUNT])]}, LABELS)
    assert not cascade.segments and cascade.class_names == ["background"]
    assert [t.name for t in cascade.case_tasks] == ["lesion_count"]
    assert not cascade.stages[0].needs_decoder


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([stage(classes={})], "classes is empty and the stage has no tasks"),
        (
            [
                stage(classes={}, tasks=[LESION_COUNT], epochs=1),
                {"name": "b", "input_masks": ["seg"]},
            ],
            "uses the mask of stage 'seg', which has no classes",
        ),
        (
            [
                stage(classes={"liver": [1, 2]}, epochs=2),
                {
                    "name": "b",
                    "classes": {"lesion": [2]},
                    "region": {"stage": "seg"},
                    "tasks": [LESION_COUNT],
                },
            ],
            "tasks need a stage that sees the whole volume",
        ),
        ([stage(tasks=[{**LESION_COUNT, "name": "seg"}])], "task name 'seg' is used twice"),
        ([stage(tasks=[LESION_COUNT, LESION_COUNT])], "task name 'lesion_count' is used twice"),
        ([stage(tasks=LESION_COUNT)], "tasks must be a list of tasks"),
    ],
)
def test_tasks_in_a_cascade_are_validated(stages, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_cascade({"stages": stages}, LABELS)
