"""LightningDataModule over an MSD-layout folder: discovery, validation, splits, patch queue."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

import lightning as L
import torch
import torchio as tio
from torch.utils.data import DataLoader

from medseg.data.augment import build_augmentation
from medseg.data.cascade import (
    PerturbedStageMasks,
    RegionLabelSampler,
    check_mask_source,
    prediction_mask_paths,
    prior_key,
)
from medseg.data.cases import DatasetInfo, discover_cases, validate_cases
from medseg.data.phantom import write_phantom_dataset
from medseg.data.preprocess import build_preprocessing
from medseg.data.splits import Split, split_cases
from medseg.data.subjects import case_to_subject, collate_subjects
from medseg.data.targets import (
    SignedDistanceMaps,
    case_targets,
    read_target_table,
    target_key,
    target_statistics,
)
from medseg.errors import ConfigError
from medseg.stages import Cascade

log = logging.getLogger(__name__)

SAMPLERS = ("label", "uniform")


class SegmentationDataModule(L.LightningDataModule):
    """Training patches from a TorchIO queue; whole volumes for validation and test.

    Args:
        root: dataset folder in MSD layout (imagesTr/, labelsTr/, dataset.json), or the root
            of a folder-per-case layout.
        labels: label value -> class name; None reads dataset.json.
        layout: None for MSD; a folder-per-case layout (see :func:`discover_cases`).
        phantom: parameters of :func:`write_phantom_dataset`; when given, the synthetic
            phantom is generated at ``root`` (once, cached) before anything else.
        preprocess: keyword arguments of :func:`build_preprocessing` except ``min_shape``.
        patch_size: training patch and sliding-window size (x, y, z) in voxels.
        batch_size: patches per training step.
        samples_per_volume: patches drawn from a volume each time it is loaded.
        queue_length: patches held by the queue.
        num_workers: processes loading and augmenting volumes for the queue.
        sampler: ``label`` (class-balanced centres) or ``uniform``.
        label_probabilities: label value -> probability of a patch centre on it (label
            sampler); None gives every declared label the same chance.
        augmentation: preset name (see :mod:`medseg.data.augment`).
        test_fraction, num_folds, fold, split_seed: see :func:`split_cases`.
        preload: preprocess every case once in setup and keep it in memory; otherwise
            preprocess each time a volume is read.
        targets: ``{path, id_column}`` of a CSV/TSV file with case-level targets (one row
            per case), read when a stage has classification or regression tasks.
    """

    def __init__(
        self,
        root: str | Path,
        labels: Mapping[int, str] | None = None,
        layout: Mapping | None = None,
        phantom: Mapping | None = None,
        preprocess: Mapping | None = None,
        patch_size: Sequence[int] = (64, 64, 32),
        batch_size: int = 2,
        samples_per_volume: int = 8,
        queue_length: int = 48,
        num_workers: int = 1,
        sampler: str = "label",
        label_probabilities: Mapping[int, float] | None = None,
        augmentation: str = "default",
        test_fraction: float = 0.2,
        num_folds: int = 5,
        fold: int = 0,
        split_seed: int = 0,
        preload: bool = True,
        targets: Mapping | None = None,
    ):
        super().__init__()
        self.root = Path(root).expanduser()
        self.labels = dict(labels) if labels is not None else None
        self.layout = layout
        self.phantom = dict(phantom) if phantom is not None else None
        self.preprocess = dict(preprocess or {})
        self.patch_size = _positive_ints("data.patch_size", patch_size, length=3)
        for key, value in {
            "data.batch_size": batch_size,
            "data.samples_per_volume": samples_per_volume,
            "data.queue_length": queue_length,
        }.items():
            _positive_ints(key, [value])
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
        if sampler not in SAMPLERS:
            raise ConfigError(f"data.sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        self.batch_size = batch_size
        self.samples_per_volume = samples_per_volume
        self.queue_length = queue_length
        self.num_workers = num_workers
        self.sampler = sampler
        self.label_probabilities = (
            {int(k): float(v) for k, v in label_probabilities.items()}
            if label_probabilities is not None
            else None
        )
        self.augmentation = build_augmentation(augmentation)
        self.split_args = dict(
            test_fraction=test_fraction, num_folds=num_folds, fold=fold, seed=split_seed
        )
        self.preload = preload
        self.preprocessing = build_preprocessing(**self.preprocess, min_shape=self.patch_size)
        self.subjects: dict[str, list[tio.Subject]] = {}
        self.targets = dict(targets) if targets else None
        if self.targets is not None and not self.targets.get("path"):
            raise ConfigError(
                "data.targets.path must name a .tsv or .csv file (or data.targets=null)"
            )
        self.cascade: Cascade | None = None
        self.training_masks: dict = {"source": "perturbed"}
        self.case_targets: dict[str, dict[str, int | float]] = {}

    def attach_cascade(self, cascade: Cascade, training_masks: Mapping | None = None) -> None:
        """Make training data follow a cascade's stage schedule and carry its tasks' targets.

        The targets of case-level tasks are read and checked here, before any training.

        Args:
            cascade: the stages being trained: the patch sampler follows the schedule, and
                later stages get earlier stages' masks (``priors`` in the batch); every task
                gets its targets in the batch under its name.
            training_masks: how later stages see earlier stages' masks during training:
                ``{source: perturbed, ...}`` (keyword arguments of PerturbedStageMasks) or
                ``{source: predictions, dir: <folder of <stage>/<case_id>.nii.gz>}``.
        """
        masks = dict(training_masks or {"source": "perturbed"})
        check_mask_source(masks.get("source"))
        if self.subjects:
            raise RuntimeError("attach_cascade must be called before setup()")
        self.cascade = cascade
        self.training_masks = masks
        self.case_targets = self._read_case_targets(cascade)

    def _read_case_targets(self, cascade: Cascade) -> dict[str, dict[str, int | float]]:
        tasks = cascade.case_tasks
        if not tasks:
            return {}
        if self.targets is None:
            raise ConfigError(
                f"tasks {[t.name for t in tasks]} read case-level targets, but data.targets "
                "is not set: give data.targets.path (a .tsv or .csv file, one row per case)"
            )
        table = read_target_table(self.targets["path"], self.targets.get("id_column", "case_id"))
        return case_targets(table, tasks, [c.case_id for c in self.dataset.cases])

    def target_statistics(self) -> dict[str, dict]:
        """Per case-level task, the statistics of the training split's targets: class
        ``counts`` (classification) or ``mean`` and ``std`` (regression)."""
        tasks = self.cascade.case_tasks if self.cascade else []
        return target_statistics(tasks, (self.case_targets[c] for c in self.split.train))

    def prepare_data(self) -> None:
        if self.phantom is not None:
            write_phantom_dataset(self.root, **self.phantom)

    @cached_property
    def dataset(self) -> DatasetInfo:
        """The discovered cases (generates the phantom first when configured)."""
        self.prepare_data()
        return discover_cases(self.root, self.labels, self.layout)

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.labels.values())

    @property
    def in_channels(self) -> int:
        return len(self.dataset.channels)

    @cached_property
    def split(self) -> Split:
        return split_cases([c.case_id for c in self.dataset.cases], **self.split_args)

    def setup(self, stage: str | None = None) -> None:
        if self.subjects:
            return
        validate_cases(self.dataset)
        split = self.split
        log.info(
            "%s: %d train, %d val, %d test cases",
            self.dataset.root,
            len(split.train),
            len(split.val),
            len(split.test),
        )
        predicted = self._predicted_mask_paths(split.train)
        rank, world_size = self._rank_and_world_size()
        for name, ids in (("train", split.train), ("val", split.val), ("test", split.test)):
            if world_size > 1:
                ids = rank_share(name, ids, rank, world_size)
                log.info("rank %d of %d: %s cases %s", rank, world_size, name, ids)
            subjects = [
                case_to_subject(
                    self.dataset.case(i),
                    predicted.get(i) if name == "train" else None,
                    {target_key(task): v for task, v in self.case_targets.get(i, {}).items()},
                )
                for i in ids
            ]
            if self.preload:
                subjects = [self.preprocessing(s) for s in subjects]
            self.subjects[name] = subjects

    def _predicted_mask_paths(self, case_ids) -> dict[str, dict[str, Path]]:
        """Earlier-stage prediction files per training case (source: predictions)."""
        if self.cascade is None or self.training_masks["source"] != "predictions":
            return {}
        if not self.training_masks.get("dir"):
            raise ConfigError("stage.training_masks.dir is required with source=predictions")
        paths = prediction_mask_paths(
            self.training_masks["dir"], self.cascade.mask_producers, case_ids
        )
        return {
            case: {prior_key(s): p for s, p in stages.items()} for case, stages in paths.items()
        }

    def _stage_masks_transform(self) -> tio.Transform | None:
        if self.cascade is None or self.training_masks["source"] != "perturbed":
            return None
        producers = self.cascade.mask_producers
        if not producers:
            return None
        options = {k: v for k, v in self.training_masks.items() if k != "source"}
        values = {name: sorted(self.cascade.stage(name).values) for name in producers}
        return PerturbedStageMasks(values, **options)

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _distance_maps_transform(self) -> tio.Transform | None:
        tasks = (
            [t for t in self.cascade.tasks if t.type == "voxel_regression"] if self.cascade else []
        )
        if not tasks:
            return None
        return SignedDistanceMaps({t.name: (t.distance_to, t.clip_mm) for t in tasks})

    def _dataset(self, name: str, augment: bool) -> tio.SubjectsDataset:
        transforms = [] if self.preload else [self.preprocessing]
        if augment:
            extra = (self.augmentation, self._stage_masks_transform())
            transforms += [t for t in extra if t is not None]
        # Computed from the (augmented) label, after every intensity transform.
        distance_maps = self._distance_maps_transform()
        if distance_maps is not None:
            transforms.append(distance_maps)
        return tio.SubjectsDataset(
            self.subjects[name], transform=tio.Compose(transforms) if transforms else None
        )

    def _patch_sampler(self, epoch: int) -> tio.data.PatchSampler:
        if self.sampler == "uniform":
            return tio.UniformSampler(self.patch_size)
        probabilities = self.label_probabilities or {v: 1.0 for v in self.dataset.labels}
        unknown = sorted(set(probabilities) - set(self.dataset.labels))
        if unknown:
            raise ConfigError(
                f"data.label_probabilities names label values {unknown} that the dataset "
                f"does not declare (declared: {sorted(self.dataset.labels)})"
            )
        region = self.cascade.sampling_stage(epoch).region if self.cascade else None
        if region is not None:
            return RegionLabelSampler(
                self.patch_size, probabilities, region.stage, region.margin_mm
            )
        return tio.LabelSampler(self.patch_size, "label", probabilities)

    def train_dataloader(self) -> DataLoader:
        # Rebuilt every epoch (trainer.reload_dataloaders_every_n_epochs=1), so patches follow
        # the cascade's stage schedule.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        queue = tio.Queue(
            self._dataset("train", augment=True),
            max_length=self.queue_length,
            samples_per_volume=self.samples_per_volume,
            sampler=self._patch_sampler(epoch),
            num_workers=self.num_workers,
            shuffle_subjects=True,
            shuffle_patches=True,
            # Load volumes on the first patch request, not now: its random draws (subject
            # order, worker seeds) then follow the per-epoch reseed (training_guards.EpochSeed).
            start_background=False,
        )
        # The queue's own workers load volumes; patches come out of it in this process. A
        # private generator: Lightning creates this loader's iterator before the epoch's
        # reseed on a fresh or resumed run and after it otherwise, so it must not draw from
        # the global generator.
        return DataLoader(
            queue,
            batch_size=self.batch_size,
            collate_fn=collate_subjects,
            generator=torch.Generator(),
        )

    def _volume_loader(self, name: str) -> DataLoader:
        return DataLoader(
            self._dataset(name, augment=False),
            batch_size=1,
            num_workers=0 if self.preload else self.num_workers,
            collate_fn=collate_subjects,
        )

    def val_dataloader(self) -> DataLoader:
        return self._volume_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._volume_loader("test")


def rank_share(split: str, ids: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The cases of `split` that process `rank` of `world_size` loads and transforms.

    Every process takes every world_size-th case, so shares are disjoint and only a share is
    ever preprocessed or held in memory per process. Training shares are topped up with
    their own first cases to the size of the largest share: DDP needs the same number of
    steps on every process. Validation and test shares stay exact (every case scored once).
    """
    if len(ids) < world_size:
        raise ConfigError(
            f"the {split} split has {len(ids)} case(s), fewer than the {world_size} DDP "
            "processes (trainer.devices x trainer.num_nodes): every process needs one"
        )
    share = list(ids[rank::world_size])
    if split == "train":
        size = -(-len(ids) // world_size)
        share += share[: size - len(share)]
    return share


def _positive_ints(key: str, values: Sequence[int], length: int | None = None) -> tuple[int, ...]:
    values = tuple(values)
    if (length is not None and len(values) != length) or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values
    ):
        size = f"{length} " if length else ""
        raise ConfigError(f"{key} must be {size}positive integer(s), got {list(values)}")
    return values
