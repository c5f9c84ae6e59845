"""Targets of a stage's tasks: case-level values from a table, signed distance maps.

Case-level targets (a class, a number) come from a CSV or TSV file with one row per case,
joined on a case id column, like a BIDS ``participants.tsv``. The table is checked against
every case and every case-level task before training: one error lists every missing case,
missing value, unknown class and non-numeric value.

Voxel targets are computed from the label map after augmentation, so they follow every
spatial transform exactly and no intensity transform touches them.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchio as tio
from scipy import ndimage

from medseg.errors import DataError
from medseg.tasks import TaskSpec

# Subject fields holding task targets; collation puts them in the batch under the task name.
TARGET_PREFIX = "target_"
DELIMITERS = {".tsv": "\t", ".csv": ","}


def target_key(task: str) -> str:
    return f"{TARGET_PREFIX}{task}"


@dataclass(frozen=True)
class TargetTable:
    """The rows of a targets file by case id (values as text)."""

    path: Path
    id_column: str
    columns: tuple[str, ...]
    rows: dict[str, dict[str, str]]


class TargetsError(DataError):
    """Raised with one line per problem, each naming the case, the column and the value."""

    def __init__(self, path: Path, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"data.targets: {len(problems)} problem(s) in {path}:\n{lines}")


def read_target_table(path: str | Path, id_column: str = "case_id") -> TargetTable:
    """Read a CSV (``.csv``) or TSV (``.tsv``) file with a header row and one row per case."""
    path = Path(path).expanduser()
    delimiter = DELIMITERS.get(path.suffix.lower())
    if delimiter is None:
        raise DataError(f"data.targets.path: {path} must be a .tsv or .csv file")
    if not path.is_file():
        raise DataError(f"data.targets.path: {path} does not exist")
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = tuple(reader.fieldnames or ())
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"data.targets.path: cannot read {path} ({error})") from error
    if id_column not in columns:
        raise DataError(
            f"data.targets: {path} has no id column {id_column!r} (columns: {list(columns)}); "
            "set data.targets.id_column"
        )
    rows: dict[str, dict[str, str]] = {}
    duplicates = set()
    for record in records:
        case_id = (record.get(id_column) or "").strip()
        if case_id in rows:
            duplicates.add(case_id)
        rows[case_id] = {k: (v or "").strip() for k, v in record.items() if k is not None}
    if duplicates:
        raise DataError(f"data.targets: {path} has several rows for cases {sorted(duplicates)}")
    return TargetTable(path, id_column, columns, rows)


def case_targets(
    table: TargetTable, tasks: Sequence[TaskSpec], case_ids: Iterable[str]
) -> dict[str, dict[str, int | float]]:
    """Each case's target per case-level task: a class index or a number.

    Raises:
        TargetsError: listing every missing column, missing case, missing or unknown value.
    """
    case_ids = sorted(case_ids)
    problems = [
        f"task {t.name!r} reads column {t.column!r}, which the file lacks "
        f"(columns: {list(table.columns)})"
        for t in tasks
        if t.column not in table.columns
    ]
    if problems:
        raise TargetsError(table.path, problems)
    missing = [c for c in case_ids if c not in table.rows]
    if missing:
        problems.append(
            f"{len(missing)} case(s) have no row ({table.id_column!r} column): {missing}"
        )
    targets: dict[str, dict[str, int | float]] = {}
    for case_id in case_ids:
        if case_id not in table.rows:
            continue
        targets[case_id] = {}
        for task in tasks:
            text = table.rows[case_id][task.column]
            value, problem = _parse_value(task, text)
            if problem:
                problems.append(f"{case_id}: {task.column} {text!r} {problem}")
            else:
                targets[case_id][task.name] = value
    if problems:
        raise TargetsError(table.path, problems)
    return targets


def _parse_value(task: TaskSpec, text: str) -> tuple[int | float, str | None]:
    if not text or text.lower() in ("n/a", "na", "nan"):
        return 0, f"is missing (task {task.name!r} needs a value for every case)"
    if task.type == "classification":
        if text not in task.categories:
            return 0, f"is not one of the classes of task {task.name!r} {list(task.categories)}"
        return task.categories.index(text), None
    try:
        value = float(text)
    except ValueError:
        return 0, f"is not a number (task {task.name!r} is a regression)"
    if not math.isfinite(value):
        return 0, f"is not a finite number (task {task.name!r})"
    return value, None


def target_statistics(
    tasks: Sequence[TaskSpec], targets: Iterable[Mapping[str, int | float]]
) -> dict[str, dict[str, list[int] | float]]:
    """Statistics of the targets of a set of cases (the training split), per task:
    ``counts`` per class for classification, ``mean`` and ``std`` for regression."""
    targets = list(targets)
    statistics: dict[str, dict] = {}
    for task in tasks:
        values = np.array([t[task.name] for t in targets], dtype=np.float64)
        if task.type == "classification":
            counts = np.bincount(values.astype(np.int64), minlength=len(task.categories))
            statistics[task.name] = {"counts": counts.tolist()}
        else:
            std = float(values.std()) if values.size > 1 else 0.0
            statistics[task.name] = {"mean": float(values.mean()), "std": std}
    return statistics


def signed_distance_mm(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) of every voxel to the mask's boundary: negative inside, positive outside.

    Without any mask voxel every distance is +inf (clipped by the caller).
    """
    if not mask.any():
        return np.full(mask.shape, np.inf, dtype=np.float32)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    return (outside - inside).astype(np.float32)


class SignedDistanceMaps(tio.Transform):
    """Add a ``target_<task>`` image per voxel-regression task: the signed distance (mm) to
    the structure of its label values, clipped to +-clip_mm and divided by clip_mm (so
    targets lie in [-1, 1])."""

    def __init__(self, maps: Mapping[str, tuple[Sequence[int], float]], **kwargs):
        """``maps``: task name -> (label values, clip_mm)."""
        super().__init__(**kwargs)
        self.maps = {name: (list(values), float(clip)) for name, (values, clip) in maps.items()}
        self.args_names = ["maps"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        label = subject["label"]
        data = label.data[0].numpy()
        for name, (values, clip_mm) in self.maps.items():
            distance = signed_distance_mm(np.isin(data, values), label.spacing)
            normalized = np.clip(distance, -clip_mm, clip_mm) / clip_mm
            subject.add_image(
                tio.ScalarImage(tensor=torch.from_numpy(normalized)[None], affine=label.affine),
                target_key(name),
            )
        return subject
