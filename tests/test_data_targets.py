"""Task targets: the phantom's targets file, reading and checking a targets table, training
statistics, distance maps, and targets in the batch under the task's name."""

import csv
import re

import numpy as np
import pytest
import torch

from medseg.data.datamodule import SegmentationDataModule
from medseg.data.phantom import case_name, case_seed, generate_case, lesion_class
from medseg.data.targets import (
    TargetsError,
    case_targets,
    read_target_table,
    signed_distance_mm,
    target_statistics,
)
from medseg.errors import ConfigError, DataError
from medseg.stages import build_cascade
from medseg.tasks import parse_task

from .conftest import TINY_PHANTOM, tiny_datamodule
from .test_tasks import LABELS, LESION_COUNT

VOLUME = {"name": "volume", "type": "regression", "column": "liver_volume_ml"}


def tasks(*entries):
    return [parse_task(e, "t", LABELS) for e in entries]


def write_table(path, rows: list[list[str]], delimiter: str = "\t"):
    path.write_text("\n".join(delimiter.join(r) for r in rows) + "\n")
    return path


def test_phantom_writes_its_case_targets(phantom_root):
    with (phantom_root / "targets.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [r["case_id"] for r in rows] == [case_name(i) for i in range(TINY_PHANTOM["num_cases"])]
    for index in (0, 5):
        case = generate_case(
            case_seed(TINY_PHANTOM["seed"], index), TINY_PHANTOM["shape"], TINY_PHANTOM["spacing"]
        )
        assert int(rows[index]["num_lesions"]) == case.num_lesions
        assert rows[index]["lesion_class"] == lesion_class(case.num_lesions)
        assert float(rows[index]["liver_volume_ml"]) == pytest.approx(
            case.liver_volume_ml, abs=1e-3
        )
    assert [lesion_class(n) for n in range(5)] == ["none", "one", "several", "several", "several"]


def test_targets_are_read_from_tsv_and_csv(tmp_path):
    rows = [
        ["case_id", "lesion_class", "liver_volume_ml"],
        ["a", "one", "81.5"],
        ["b", "none", "70"],
    ]
    for suffix, delimiter in ((".tsv", "\t"), (".csv", ",")):
        table = read_target_table(write_table(tmp_path / f"t{suffix}", rows, delimiter))
        values = case_targets(table, tasks(LESION_COUNT, VOLUME), ["a", "b"])
        assert values == {
            "a": {"lesion_count": 1, "volume": 81.5},
            "b": {"lesion_count": 0, "volume": 70.0},
        }


def test_every_bad_case_is_named_in_one_error(tmp_path):
    rows = [
        ["participant_id", "lesion_class", "liver_volume_ml"],
        ["a", "one", "81.5"],
        ["b", "many", "70"],
        ["c", "none", "n/a"],
        ["d", "several", "big"],
    ]
    table = read_target_table(write_table(tmp_path / "p.tsv", rows), "participant_id")
    with pytest.raises(TargetsError) as error:
        case_targets(table, tasks(LESION_COUNT, VOLUME), ["a", "b", "c", "d", "e", "f"])
    message = str(error.value)
    assert message.startswith(f"data.targets: 4 problem(s) in {tmp_path / 'p.tsv'}:")
    assert "2 case(s) have no row ('participant_id' column): ['e', 'f']" in message
    assert (
        "b: lesion_class 'many' is not one of the classes of task 'lesion_count' "
        "['none', 'one', 'several']" in message
    )
    assert "c: liver_volume_ml 'n/a' is missing" in message
    assert "d: liver_volume_ml 'big' is not a number" in message


@pytest.mark.parametrize(
    ("rows", "id_column", "message"),
    [
        ([["id", "x"], ["a", "1"]], "case_id", "has no id column 'case_id' (columns: ['id', 'x'])"),
        ([["case_id", "x"], ["a", "1"], ["a", "2"]], "case_id", "several rows for cases ['a']"),
    ],
)
def test_table_errors(tmp_path, rows, id_column, message):
    with pytest.raises(DataError, match=re.escape(message)):
        read_target_table(write_table(tmp_path / "t.tsv", rows), id_column)


def test_missing_column_and_unknown_format(tmp_path):
    table = read_target_table(write_table(tmp_path / "t.tsv", [["case_id", "x"], ["a", "1"]]))
    with pytest.raises(TargetsError, match=re.escape("reads column 'lesion_class', which")):
        case_targets(table, tasks(LESION_COUNT), ["a"])
    with pytest.raises(DataError, match=r"must be a \.tsv or \.csv file"):
        read_target_table(tmp_path / "t.xlsx")
    with pytest.raises(DataError, match="does not exist"):
        read_target_table(tmp_path / "missing.tsv")


def test_training_statistics():
    targets = [{"c": 0, "v": 1.0}, {"c": 2, "v": 3.0}, {"c": 2, "v": 5.0}]
    c = parse_task({**LESION_COUNT, "name": "c"}, "t", LABELS)
    v = parse_task({**VOLUME, "name": "v"}, "t", LABELS)
    assert target_statistics([c, v], targets) == {
        "c": {"counts": [1, 0, 2]},
        "v": {"mean": 3.0, "std": pytest.approx(np.std([1.0, 3.0, 5.0]))},
    }


def test_signed_distance_is_negative_inside_in_mm():
    mask = np.zeros((9, 1, 1), dtype=bool)
    mask[3:6] = True
    distance = signed_distance_mm(mask, (2.0, 1.0, 1.0))[:, 0, 0]
    assert distance.tolist() == [6.0, 4.0, 2.0, -2.0, -4.0, -2.0, 2.0, 4.0, 6.0]
    assert np.all(np.isinf(signed_distance_mm(np.zeros((3, 3, 3), bool), (1, 1, 1))))


def multitask_datamodule(root, **kwargs) -> SegmentationDataModule:
    targets = {"path": str(root / "targets.tsv"), "id_column": "case_id"}
    return tiny_datamodule(root, **{"targets": targets, **kwargs})


def multitask_cascade():
    distance = {
        "name": "distance",
        "type": "voxel_regression",
        "distance_to": [1, 2],
        "clip_mm": 10,
    }
    stage = {"name": "seg", "classes": None, "tasks": [LESION_COUNT, VOLUME, distance]}
    return build_cascade({"stages": [stage]}, LABELS)


def test_batches_carry_every_task_target_under_its_name(phantom_root):
    dm = multitask_datamodule(phantom_root)
    dm.attach_cascade(multitask_cascade())
    dm.setup("fit")
    with (phantom_root / "targets.tsv").open() as handle:
        table = {r["case_id"]: r for r in csv.DictReader(handle, delimiter="\t")}
    batch = next(iter(dm.train_dataloader()))
    assert batch["lesion_count"].dtype == torch.int64 and batch["lesion_count"].shape == (2,)
    assert batch["volume"].dtype == torch.float32
    for case_id, count, volume in zip(
        batch["case_id"], batch["lesion_count"], batch["volume"], strict=True
    ):
        assert ["none", "one", "several"][count] == table[case_id]["lesion_class"]
        assert float(volume) == pytest.approx(float(table[case_id]["liver_volume_ml"]))
    # The distance map follows the patch's label: <= 0 inside the liver, > 0 outside.
    distance, inside = batch["distance"], batch["label"] > 0
    assert distance.shape == batch["label"].shape and distance.dtype == torch.float32
    assert torch.all(distance[inside] <= 0) and torch.all(distance[~inside] > 0)
    assert distance.min() >= -1 and distance.max() <= 1
    volume = next(iter(dm.val_dataloader()))
    assert volume["distance"].shape == volume["label"].shape
    assert volume["lesion_count"].shape == (1,)
    stats = dm.target_statistics()
    assert sum(stats["lesion_count"]["counts"]) == len(dm.split.train)


def test_targets_are_checked_when_the_cascade_is_attached(phantom_root, tmp_path):
    table = tmp_path / "targets.tsv"
    lines = (phantom_root / "targets.tsv").read_text().splitlines()
    table.write_text("\n".join([lines[0], *lines[2:]]).replace("several", "many") + "\n")
    dm = multitask_datamodule(phantom_root, targets={"path": str(table)})
    with pytest.raises(TargetsError) as error:
        dm.attach_cascade(multitask_cascade())
    assert "1 case(s) have no row ('case_id' column): ['phantom_000']" in str(error.value)
    assert "lesion_class 'many' is not one of the classes" in str(error.value)
    with pytest.raises(ConfigError, match=re.escape("data.targets is not set")):
        multitask_datamodule(phantom_root, targets=None).attach_cascade(multitask_cascade())
