"""Stage specifications of a segmentation cascade, their validation and their schedule.

A cascade is an ordered list of stages. Each stage predicts some classes (a map from class
name to source label values), may see earlier stages' masks as extra input channels, may
work only inside the bounding box of an earlier stage's mask (plus a margin in mm), and
trains during a span of epochs (the curriculum). A single-stage "cascade" is plain
multi-class segmentation.

Classes of a later stage must lie inside its region stage's classes (tumour inside liver):
that nesting is what lets the composed label map put every voxel in exactly one class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from medseg.errors import ConfigError
from medseg.tasks import TaskSpec, parse_task


@dataclass(frozen=True)
class Region:
    """Work inside the bounding box of `stage`'s mask, grown by `margin_mm` on every side."""

    stage: str
    margin_mm: float = 10.0


@dataclass(frozen=True)
class StageSpec:
    name: str
    classes: dict[str, list[int]]  # output class name -> source label values, in output order
    input_masks: tuple[str, ...] = ()
    region: Region | None = None
    threshold: float | None = None  # None: argmax; else foreground if 1 - p(background) >= it
    # keep only the largest connected component of the foreground (an organ that occurs once)
    largest_component: bool = False
    # drop foreground components smaller than this (mm^3; 0: keep all), e.g. specks of a few
    # voxels in a lesion stage
    min_component_mm3: float = 0.0
    loss_weight: float = 1.0
    epochs: int | None = None  # epochs this stage trains before the next starts; None: to the end
    network: dict = field(default_factory=dict)  # overrides of the `model` network settings
    # integer factors per axis: the stage works on the data grid average-pooled by them (a
    # coarser resolution; see medseg.models.resolution); None: the data grid
    downsample: tuple[int, ...] | None = None
    # the network's input in its own voxels (training patch centre and sliding window);
    # None: data.patch_size / downsample
    patch_size: tuple[int, ...] | None = None
    optim: dict = field(default_factory=dict)  # overrides of model.optimizer / model.scheduler
    tasks: tuple[TaskSpec, ...] = ()  # more heads on this stage's network (see medseg.tasks)

    @property
    def dense_tasks(self) -> list[TaskSpec]:
        return [t for t in self.tasks if not t.is_case_level]

    @property
    def case_tasks(self) -> list[TaskSpec]:
        return [t for t in self.tasks if t.is_case_level]

    @property
    def needs_decoder(self) -> bool:
        """Whether the network needs its decoder (for segmentation or dense tasks)."""
        return bool(self.classes or self.dense_tasks)

    @property
    def values(self) -> set[int]:
        """Every source label value this stage predicts as foreground."""
        return {v for values in self.classes.values() for v in values}

    @property
    def num_outputs(self) -> int:
        """Segmentation outputs, background included (1 for a stage without classes)."""
        return 1 + len(self.classes)

    def as_dict(self) -> dict:
        """Plain containers only, for checkpoint hyperparameters."""
        return {
            "name": self.name,
            "classes": {k: list(v) for k, v in self.classes.items()},
            "input_masks": list(self.input_masks),
            "region": None
            if self.region is None
            else {"stage": self.region.stage, "margin_mm": self.region.margin_mm},
            "threshold": self.threshold,
            "largest_component": self.largest_component,
            "min_component_mm3": self.min_component_mm3,
            "loss_weight": self.loss_weight,
            "epochs": self.epochs,
            "network": dict(self.network),
            "downsample": None if self.downsample is None else list(self.downsample),
            "patch_size": None if self.patch_size is None else list(self.patch_size),
            "optim": dict(self.optim),
            "tasks": [t.as_dict() for t in self.tasks],
        }


@dataclass(frozen=True)
class Finetune:
    """Fine-tuning from a checkpoint: which stages train, and progressive unfreezing.

    With ``unfreeze_every`` set, only the last trainable stage trains at first, and every
    ``unfreeze_every`` epochs the stage before it joins (last stage first).
    """

    ckpt_path: str | None = None
    stages: tuple[str, ...] | None = None  # None: all stages
    unfreeze_every: int | None = None


class Cascade:
    """Validated stages plus the schedule that says which stages train at which epoch."""

    def __init__(
        self,
        stages: Sequence[StageSpec],
        dataset_labels: Mapping[int, str],
        freeze_earlier: bool = True,
        finetune: Finetune | None = None,
    ):
        self.stages = tuple(stages)
        self.freeze_earlier = freeze_earlier
        self.finetune = finetune or Finetune()
        self.dataset_labels = dict(dataset_labels)
        # Smoke runs (fast_dev_run) train every stage at once so every code path runs.
        self.train_all_stages = False
        _validate(self.stages, self.dataset_labels, self.finetune, freeze_earlier)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage(self, name: str) -> StageSpec:
        return self.stages[self.names.index(name)]

    @property
    def class_names(self) -> list[str]:
        """Classes of the composed label map: background, then every stage's classes in order."""
        return ["background", *(c for s in self.stages for c in s.classes)]

    @property
    def segments(self) -> bool:
        """Whether the cascade segments anything (not only tasks without a label map)."""
        return len(self.class_names) > 1

    @property
    def tasks(self) -> list[TaskSpec]:
        return [t for s in self.stages for t in s.tasks]

    @property
    def case_tasks(self) -> list[TaskSpec]:
        return [t for s in self.stages for t in s.case_tasks]

    def composed_values(self) -> dict[int, int]:
        """Source label value -> composed class index (the last stage claiming it wins)."""
        lookup = {v: 0 for v in self.dataset_labels}
        index = 1
        for stage in self.stages:
            for values in stage.classes.values():
                for v in values:
                    lookup[v] = index
                index += 1
        return lookup

    def stage_values(self, stage: StageSpec) -> dict[int, int]:
        """Source label value -> this stage's output index (0 is its background)."""
        lookup = {v: 0 for v in self.dataset_labels}
        for index, values in enumerate(stage.classes.values(), start=1):
            for v in values:
                lookup[v] = index
        return lookup

    @property
    def mask_producers(self) -> list[str]:
        """Stages whose masks later stages use (as input channels or as a region)."""
        used = {m for s in self.stages for m in s.input_masks}
        used |= {s.region.stage for s in self.stages if s.region is not None}
        return [n for n in self.names if n in used]

    def start_epoch(self, name: str) -> int:
        start = 0
        for stage in self.stages:
            if stage.name == name:
                return start
            start += stage.epochs or 0
        raise KeyError(name)

    def trainable(self, epoch: int) -> list[str]:
        """Names of the stages whose weights train during `epoch`, in cascade order."""
        if self.train_all_stages:
            return self.names
        if self.finetune.ckpt_path is not None:
            names = [
                n for n in self.names if self.finetune.stages is None or n in self.finetune.stages
            ]
            if self.finetune.unfreeze_every:
                count = 1 + epoch // self.finetune.unfreeze_every
                names = names[::-1][:count][::-1]
            return names
        started = [s for s in self.stages if self.start_epoch(s.name) <= epoch]
        if not self.freeze_earlier:
            return [s.name for s in started]
        return [started[-1].name]

    def training_epochs(self, name: str, max_epochs: int) -> int:
        """How many of the run's epochs stage `name` trains in (its schedule's length)."""
        return sum(name in self.trainable(epoch) for epoch in range(max_epochs))

    def sampling_stage(self, epoch: int) -> StageSpec:
        """The stage whose needs decide where training patches come from: the newest trainable."""
        return self.stage(self.trainable(epoch)[-1])

    def check_epochs(self, max_epochs: int | None) -> None:
        """Every stage must get at least one epoch within trainer.max_epochs."""
        if self.train_all_stages or self.finetune.ckpt_path is not None:
            return
        if max_epochs is None or max_epochs < 0:
            return
        last = self.stages[-1]
        if self.start_epoch(last.name) >= max_epochs:
            raise ConfigError(
                f"stage {last.name!r} starts at epoch {self.start_epoch(last.name)} but "
                f"trainer.max_epochs={max_epochs}: raise trainer.max_epochs or lower the "
                "earlier stages' epochs"
            )


def _validate(
    stages: Sequence[StageSpec],
    labels: dict[int, str],
    finetune: Finetune,
    freeze_earlier: bool = True,
) -> None:
    if not stages:
        raise ConfigError("stage.stages is empty: a cascade needs at least one stage")
    seen: list[str] = []
    class_names: set[str] = set()
    for i, stage in enumerate(stages):
        key = f"stage.stages[{i}] ({stage.name})"
        if stage.name in seen:
            raise ConfigError(f"{key}: the stage name {stage.name!r} is used twice")
        if not stage.name.isidentifier():
            raise ConfigError(f"{key}: a stage name must be an identifier (letters, digits, _)")
        if not stage.classes and not stage.tasks:
            raise ConfigError(f"{key}: classes is empty and the stage has no tasks")
        for name, values in stage.classes.items():
            bad = sorted(set(values) - set(labels) | ({0} & set(values)))
            if not values or bad:
                raise ConfigError(
                    f"{key}: class {name!r} refers to label values {bad or values} that are not "
                    f"foreground labels of the dataset (declared: {labels})"
                )
            if name in class_names or name == "background":
                raise ConfigError(f"{key}: class name {name!r} is used twice in the cascade")
            class_names.add(name)
        references = [*stage.input_masks, *([stage.region.stage] if stage.region else [])]
        for ref in references:
            if ref == stage.name or ref not in [s.name for s in stages]:
                kind = "itself" if ref == stage.name else "an unknown stage"
                raise ConfigError(f"{key}: refers to {kind} {ref!r}; known stages: {seen}")
            if ref not in seen:
                raise ConfigError(
                    f"{key}: refers to the later stage {ref!r}; a stage can only use the masks "
                    f"of earlier stages ({seen})"
                )
            if not next(s for s in stages if s.name == ref).classes:
                raise ConfigError(f"{key}: uses the mask of stage {ref!r}, which has no classes")
        if stage.tasks and stage.region is not None:
            raise ConfigError(
                f"{key}: tasks need a stage that sees the whole volume; this stage works in "
                f"the region of {stage.region.stage!r}"
            )
        if stage.region is not None:
            parent = next(s for s in stages if s.name == stage.region.stage)
            if not stage.values <= parent.values:
                raise ConfigError(
                    f"{key}: its label values {sorted(stage.values)} must lie inside those of "
                    f"its region stage {parent.name!r} ({sorted(parent.values)})"
                )
            if stage.region.margin_mm < 0:
                raise ConfigError(f"{key}: region.margin_mm must be >= 0")
        if stage.dense_tasks and stage.downsample and any(f != 1 for f in stage.downsample):
            raise ConfigError(
                f"{key}: dense tasks {[t.name for t in stage.dense_tasks]} predict on the data "
                "grid; a stage with downsample factors > 1 cannot have them"
            )
        if stage.threshold is not None and not 0 < stage.threshold < 1:
            raise ConfigError(f"{key}: threshold must be in (0, 1) or null, got {stage.threshold}")
        if not isinstance(stage.largest_component, bool):
            raise ConfigError(
                f"{key}: largest_component must be true or false, got {stage.largest_component!r}"
            )
        if stage.largest_component and not stage.classes:
            raise ConfigError(f"{key}: largest_component needs a stage with classes")
        size = stage.min_component_mm3
        if isinstance(size, bool) or not isinstance(size, int | float) or size < 0:
            raise ConfigError(f"{key}: min_component_mm3 must be a number >= 0, got {size!r}")
        # epochs 0: the next stage starts at once, which only makes sense if this one keeps
        # training (freeze_earlier: false)
        fewest = 1 if freeze_earlier else 0
        if stage.epochs is not None and (i == len(stages) - 1 or stage.epochs < fewest):
            raise ConfigError(
                f"{key}: epochs must be an integer >= {fewest} for every stage but the last, "
                "which trains until trainer.max_epochs (epochs: null)"
                + ("; 0 needs freeze_earlier: false" if freeze_earlier else "")
            )
        if stage.epochs is None and i < len(stages) - 1:
            raise ConfigError(f"{key}: epochs is required for every stage but the last")
        seen.append(stage.name)
    names = list(seen)
    for task in (t for s in stages for t in s.tasks):
        if task.name in names:
            raise ConfigError(
                f"task name {task.name!r} is used twice (task and stage names must differ: "
                "they name metrics)"
            )
        names.append(task.name)
    unknown = sorted(set(finetune.stages or ()) - set(seen))
    if unknown:
        raise ConfigError(f"finetune.stages names unknown stages {unknown}; known: {seen}")


def parse_stage(entry: Mapping, index: int, dataset_labels: Mapping[int, str]) -> StageSpec:
    """A StageSpec from one entry of `stage.stages` (classes null: every dataset label)."""
    entry = dict(entry)
    allowed = set(StageSpec.__dataclass_fields__)
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(
            f"stage.stages[{index}]: unknown keys {unknown}; allowed: {sorted(allowed)}"
        )
    if "name" not in entry:
        raise ConfigError(f"stage.stages[{index}]: every stage needs a name")
    classes = entry.get("classes")
    tasks = entry.get("tasks") or []
    if not isinstance(tasks, Sequence) or isinstance(tasks, str):
        raise ConfigError(f"stage.stages[{index}]: tasks must be a list of tasks")
    if classes is None:
        classes = {name: [value] for value, name in dataset_labels.items() if value != 0}
    parsed_classes = {
        str(k): [int(v)] if isinstance(v, int) else [int(x) for x in v] for k, v in classes.items()
    }
    region = entry.get("region")
    return StageSpec(
        name=str(entry["name"]),
        classes=parsed_classes,
        input_masks=tuple(entry.get("input_masks") or ()),
        region=Region(str(region["stage"]), float(region.get("margin_mm", 10.0)))
        if region
        else None,
        threshold=entry.get("threshold"),
        largest_component=entry.get("largest_component", False),
        min_component_mm3=entry.get("min_component_mm3", 0.0),
        loss_weight=float(entry.get("loss_weight", 1.0)),
        epochs=entry.get("epochs"),
        network=dict(entry.get("network") or {}),
        downsample=_int_tuple(entry.get("downsample"), f"stage.stages[{index}].downsample"),
        patch_size=_int_tuple(entry.get("patch_size"), f"stage.stages[{index}].patch_size"),
        optim=dict(entry.get("optim") or {}),
        tasks=tuple(
            parse_task(task, f"stage.stages[{index}].tasks[{i}]", dataset_labels)
            for i, task in enumerate(tasks)
        ),
    )


def _int_tuple(value, key: str) -> tuple | None:
    """A per-axis list setting as a tuple (its values are checked against the data's patch
    by medseg.models.resolution.stage_grid)."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"{key} must be a list with one integer per axis, got {value!r}")
    return tuple(value)


def build_cascade(
    stage_cfg: Mapping, dataset_labels: Mapping[int, str], finetune: Mapping | None = None
) -> Cascade:
    """A validated Cascade from the `stage` config group (plain containers) and `finetune`."""
    entries = stage_cfg.get("stages")
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        raise ConfigError("stage.stages must be a list of stages")
    stages = [parse_stage(e, i, dataset_labels) for i, e in enumerate(entries)]
    finetune = dict(finetune or {})
    names = finetune.get("stages")
    return Cascade(
        stages,
        dataset_labels,
        freeze_earlier=bool(stage_cfg.get("freeze_earlier", True)),
        finetune=Finetune(
            ckpt_path=finetune.get("ckpt_path"),
            stages=None if names in (None, "all") else tuple(names),
            unfreeze_every=finetune.get("unfreeze_every"),
        ),
    )
