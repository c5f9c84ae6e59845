"""Tasks a stage's network learns besides (or instead of) its own segmentation.

A stage of a cascade segments its ``classes``; its ``tasks`` add heads to the same network:

- ``segmentation``: another label map (the dataset's labels regrouped by ``classes``), its own
  1x1-convolution head on the decoder's full-resolution features;
- ``voxel_regression``: a dense map, the signed distance (mm) to the boundary of label values
  ``distance_to``, clipped to +-``clip_mm`` (negative inside);
- ``classification``: a class per case, from a column of the targets table (``data.targets``),
  predicted by a multi-scale attention head over the last encoder stages;
- ``regression``: a number per case (e.g. age or an organ volume), from the same table.

Every task has a loss weight that may follow a schedule over epochs, an optional learning rate
for its head, and metrics logged as ``<split>/<task>/<metric>[_<class>]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from medseg.errors import ConfigError

TASK_TYPES = ("segmentation", "voxel_regression", "classification", "regression")
DENSE_TYPES = ("segmentation", "voxel_regression")
CASE_TYPES = ("classification", "regression")
CLASS_WEIGHT_MODES = ("none", "inverse_frequency", "inverse_sqrt_frequency")
# Batch keys that a task name would shadow.
RESERVED_NAMES = ("image", "label", "case_id", "spacing", "location", "priors")

# Config keys each task type accepts (besides name and type).
_COMMON_KEYS = ("weight", "loss", "head", "lr")
_TYPE_KEYS = {
    "segmentation": ("classes",),
    "voxel_regression": ("distance_to", "clip_mm"),
    "classification": ("classes", "column", "class_weights"),
    "regression": ("column",),
}
# The loss of each type unless the task's `loss` names another (a `_target_` config).
DEFAULT_LOSSES = {
    "voxel_regression": {"_target_": "torch.nn.SmoothL1Loss"},
    "classification": {"_target_": "torch.nn.CrossEntropyLoss"},
    "regression": {"_target_": "torch.nn.SmoothL1Loss"},
}


@dataclass(frozen=True)
class WeightSchedule:
    """A loss weight per epoch: piecewise linear through (epoch, weight) points, constant
    before the first and after the last (``{0: 1, 10: 3}`` ramps 1x -> 3x over 10 epochs)."""

    points: tuple[tuple[int, float], ...]

    def at(self, epoch: int) -> float:
        epochs = [e for e, _ in self.points]
        weights = [w for _, w in self.points]
        return float(np.interp(epoch, epochs, weights))

    @property
    def constant(self) -> bool:
        return len({w for _, w in self.points}) == 1

    def as_config(self) -> float | dict[int, float]:
        return self.points[0][1] if self.constant else dict(self.points)

    @classmethod
    def parse(cls, value: object, key: str) -> WeightSchedule:
        """A number (constant) or a mapping epoch -> weight."""
        if isinstance(value, Mapping):
            try:
                points = sorted((int(e), float(w)) for e, w in value.items())
            except (TypeError, ValueError) as error:
                raise ConfigError(f"{key} must map epochs (integers) to weights: {error}") from None
        elif isinstance(value, int | float) and not isinstance(value, bool):
            points = [(0, float(value))]
        else:
            raise ConfigError(f"{key} must be a number or a mapping epoch -> weight, got {value!r}")
        if not points or any(e < 0 or w < 0 or not np.isfinite(w) for e, w in points):
            raise ConfigError(f"{key}: epochs and weights must be >= 0, got {value!r}")
        return cls(tuple(points))


@dataclass(frozen=True)
class TaskSpec:
    name: str
    type: str
    weight: WeightSchedule = WeightSchedule(((0, 1.0),))
    # segmentation: class name -> source label values, in output order (background first, implied)
    label_classes: dict[str, list[int]] = field(default_factory=dict)
    # classification: the class names as they appear in the targets table, in output order
    categories: tuple[str, ...] = ()
    column: str | None = None  # case tasks: column of the targets table
    distance_to: tuple[int, ...] = ()  # voxel_regression: label values of the structure
    clip_mm: float = 20.0  # voxel_regression: distances are clipped to +-clip_mm
    class_weights: str | tuple[float, ...] = "inverse_frequency"  # classification
    loss: dict | None = None  # `_target_` config of the loss; None: the type's default
    head: dict = field(default_factory=dict)  # keyword arguments of the head
    lr: float | None = None  # learning rate of the head; None: the stage's

    @property
    def is_case_level(self) -> bool:
        return self.type in CASE_TYPES

    @property
    def class_names(self) -> list[str]:
        """Output class names (segmentation: background first)."""
        if self.type == "segmentation":
            return ["background", *self.label_classes]
        return list(self.categories)

    @property
    def num_outputs(self) -> int:
        if self.type in ("segmentation", "classification"):
            return len(self.class_names)
        return 1

    def as_dict(self) -> dict:
        """Plain containers in config form, for checkpoint hyperparameters."""
        entry: dict = {"name": self.name, "type": self.type, "weight": self.weight.as_config()}
        if self.type == "segmentation":
            entry["classes"] = {k: list(v) for k, v in self.label_classes.items()}
        if self.type == "classification":
            entry["classes"] = list(self.categories)
            entry["class_weights"] = (
                self.class_weights
                if isinstance(self.class_weights, str)
                else list(self.class_weights)
            )
        if self.is_case_level:
            entry["column"] = self.column
        if self.type == "voxel_regression":
            entry["distance_to"] = list(self.distance_to)
            entry["clip_mm"] = self.clip_mm
        return entry | {"loss": self.loss, "head": dict(self.head), "lr": self.lr}


def parse_task(entry: Mapping, key: str, dataset_labels: Mapping[int, str]) -> TaskSpec:
    """A validated TaskSpec from one entry of a stage's ``tasks`` list (``key`` names it)."""
    entry = dict(entry)
    name = entry.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"{key}: every task needs a name that is an identifier, got {name!r}")
    key = f"{key} ({name})"
    if name in RESERVED_NAMES:
        raise ConfigError(f"{key}: the task name {name!r} is reserved ({list(RESERVED_NAMES)})")
    kind = entry.get("type")
    if kind not in TASK_TYPES:
        raise ConfigError(f"{key}: type must be one of {list(TASK_TYPES)}, got {kind!r}")
    allowed = {"name", "type", *_COMMON_KEYS, *_TYPE_KEYS[kind]}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(
            f"{key}: unknown keys {unknown} for a {kind} task; allowed: {sorted(allowed)}"
        )
    lr = entry.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0):
        raise ConfigError(f"{key}: lr must be a positive number or null, got {lr!r}")
    loss = entry.get("loss")
    if loss is not None and (not isinstance(loss, Mapping) or "_target_" not in loss):
        raise ConfigError(f"{key}: loss must be a config with a _target_, got {loss!r}")
    head = entry.get("head") or {}
    if not isinstance(head, Mapping):
        raise ConfigError(f"{key}: head must be a mapping of head settings, got {head!r}")
    spec = {
        "name": name,
        "type": kind,
        "weight": WeightSchedule.parse(entry.get("weight", 1.0), f"{key}: weight"),
        "loss": dict(loss) if loss is not None else None,
        "head": dict(head),
        "lr": float(lr) if lr is not None else None,
    }
    if kind == "segmentation":
        spec["label_classes"] = _label_classes(entry.get("classes"), key, dataset_labels)
    elif kind == "voxel_regression":
        spec["distance_to"] = tuple(
            _foreground_values(entry.get("distance_to"), key, dataset_labels)
        )
        spec["clip_mm"] = _positive(entry.get("clip_mm", 20.0), f"{key}: clip_mm")
    else:
        column = entry.get("column", name)
        if not isinstance(column, str) or not column:
            raise ConfigError(f"{key}: column must name a column of data.targets, got {column!r}")
        spec["column"] = column
    if kind == "classification":
        spec["categories"] = _categories(entry.get("classes"), key)
        spec["class_weights"] = _class_weight_setting(
            entry.get("class_weights", "inverse_frequency"), len(spec["categories"]), key
        )
    return TaskSpec(**spec)


def _label_classes(classes: object, key: str, labels: Mapping[int, str]) -> dict[str, list[int]]:
    if not isinstance(classes, Mapping) or not classes:
        raise ConfigError(f"{key}: classes must map class names to label values, got {classes!r}")
    parsed = {}
    for name, values in classes.items():
        parsed[str(name)] = _foreground_values(values, f"{key}: class {name!r}", labels)
    return parsed


def _foreground_values(values: object, key: str, labels: Mapping[int, str]) -> list[int]:
    values = [values] if isinstance(values, int) else values
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        raise ConfigError(f"{key}: expected label values, got {values!r}")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v not in labels]
    if bad or 0 in values:
        raise ConfigError(
            f"{key}: label values {bad or [0]} are not foreground labels of the dataset "
            f"(declared: {dict(labels)})"
        )
    return sorted(set(values))


def _categories(classes: object, key: str) -> tuple[str, ...]:
    if not isinstance(classes, Sequence) or isinstance(classes, str) or len(classes) < 2:
        raise ConfigError(
            f"{key}: classes must list at least two class values of the targets column, "
            f"got {classes!r}"
        )
    names = tuple(str(c) for c in classes)
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}: classes {list(names)} are not unique")
    return names


def _class_weight_setting(value: object, num_classes: int, key: str) -> str | tuple[float, ...]:
    if isinstance(value, str):
        if value not in CLASS_WEIGHT_MODES:
            raise ConfigError(
                f"{key}: class_weights must be one of {list(CLASS_WEIGHT_MODES)} or a list of "
                f"{num_classes} weights, got {value!r}"
            )
        return value
    if not isinstance(value, Sequence) or len(value) != num_classes:
        raise ConfigError(f"{key}: class_weights needs {num_classes} weights, got {value!r}")
    return tuple(_positive(w, f"{key}: class_weights") for w in value)


def _positive(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{key} must be a positive number, got {value!r}")
    return float(value)


def class_weights(counts: Sequence[int], mode: str | Sequence[float]) -> list[float]:
    """Loss weight of each class from its count of training cases.

    ``inverse_frequency`` gives class c the weight N / (K * n_c) (N cases, K classes present),
    so every class contributes equally and a training case weighs 1 on average;
    ``inverse_sqrt_frequency`` is proportional to n_c ** -0.5, scaled the same way; ``none``
    weighs every class 1; a list is used as given. A class without training cases never
    meets the loss: it gets weight 0.
    """
    if not isinstance(mode, str):
        return [float(w) for w in mode]
    counts_arr = np.asarray(counts, dtype=np.float64)
    if mode == "none":
        return [1.0] * len(counts_arr)
    present = counts_arr > 0
    power = 1.0 if mode == "inverse_frequency" else 0.5
    raw = np.zeros_like(counts_arr)
    raw[present] = counts_arr[present] ** -power
    # Scale so that the weighted number of cases equals the number of cases.
    raw *= counts_arr.sum() / (raw * counts_arr).sum()
    return raw.tolist()
