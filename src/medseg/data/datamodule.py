"""LightningDataModule: discovery, validation, splits, the preprocessing cache, patch queue."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torchio as tio
from torch.utils.data import DataLoader

from medseg.data.augment import build_augmentation
from medseg.data.cache import (
    file_signature,
    open_cases,
    prepare_cache,
    prepare_priors,
    validate_dataset,
)
from medseg.data.cascade import PerturbedStageMasks, check_mask_source, prediction_mask_paths
from medseg.data.cases import DatasetInfo, discover_cases
from medseg.data.geometry import DEFAULT_MAX_RESAMPLE_GROWTH, ResampleLimit
from medseg.data.image_io import ReadOptions
from medseg.data.patches import (
    SAMPLERS,
    PatchDataset,
    PatchLocator,
    ReadyPatchSampler,
    RegionFilter,
    VolumeDataset,
)
from medseg.data.phantom import write_phantom_dataset
from medseg.data.prepared import PreparedCase
from medseg.data.preprocess import preprocess_settings
from medseg.data.preselect import labelled_corners
from medseg.data.slices import check_slice_axis, patch_collate, volume_patch_size
from medseg.data.splits import Split, split_cases
from medseg.data.subjects import collate_subjects
from medseg.data.targets import (
    SignedDistanceMaps,
    case_targets,
    read_target_table,
    target_key,
    target_statistics,
)
from medseg.data.zarr_store import (
    discover_zarr_dataset,
    is_zarr_store,
    open_array,
    open_volume,
    write_array_atomically,
)
from medseg.errors import ConfigError
from medseg.models.resolution import stage_grid
from medseg.stages import Cascade
from medseg.utils.config import positive_ints
from medseg.utils.locks import exclusive_lock

log = logging.getLogger(__name__)

# The splits each Lightning stage reads.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


class SegmentationDataModule(L.LightningDataModule):
    """Training patches from a TorchIO queue; whole volumes for validation and test.

    Args:
        root: dataset folder in MSD layout (imagesTr/, labelsTr/, dataset.json), the root
            of a folder-per-case layout, or a Zarr dataset (see :mod:`medseg.data.zarr_store`).
        labels: label value -> class name; None reads dataset.json (or the Zarr attributes).
        layout: None for MSD; a folder-per-case layout (see :func:`discover_cases`).
        phantom: parameters of :func:`write_phantom_dataset`; when given, the synthetic
            phantom is generated at ``root`` (once, cached) before anything else.
        preprocess: see :func:`medseg.data.preprocess.build_preprocessing`.
        cache_dir: where preprocessed cases are stored (prepared on first use, or by
            ``medseg-prepare``; see :mod:`medseg.data.cache`); None preprocesses every case
            in memory at each start.
        patch_size: training patch and sliding-window size in voxels: (x, y, z), or the two
            in-plane sizes in 2D mode.
        slice_axis: None for 3D; 0, 1 or 2 trains on slices along that axis (2D mode).
        skip_empty_slices: 2D mode: train only on slices that hold foreground.
        batch_size: patches per training step.
        samples_per_volume: patches drawn from each training case per epoch.
        queue_length: patches held by the queue.
        num_workers: processes reading and augmenting patches for the queue.
        sampler: ``label`` (patch centres per label value), ``uniform``, or ``labelled``
            (patches whose labelled fraction is at least ``min_label_fraction``).
        label_probabilities: label value -> probability of a patch centre on it (label
            sampler); None gives every declared label the same chance.
        min_label_fraction: minimum fraction of labelled voxels (label > 0) of a patch
            (``labelled`` sampler).
        augmentation: preset name (see :mod:`medseg.data.augment`).
        test_fraction, num_folds, fold, split_seed: see :func:`split_cases`.
        targets: ``{path, id_column}`` of a CSV/TSV file with case-level targets (one row
            per case), read when a stage has classification or regression tasks.
        max_resample_growth: a case whose resampling to ``preprocess.spacing`` would multiply
            its voxels by more than this is refused (a wrong spacing in its header).
        reorient_labels: a label (or merged mask) stored on its image's grid with flipped or
            permuted axes is reoriented onto the image grid (else validation reports it).
        dicom: ``{nonuniform_slices: error | resample}``: DICOM series whose slices are not
            evenly spaced are refused, or resampled onto an even grid.
    """

    def __init__(
        self,
        root: str | Path,
        labels: Mapping[int, str] | None = None,
        layout: Mapping | None = None,
        phantom: Mapping | None = None,
        preprocess: Mapping | None = None,
        cache_dir: str | Path | None = None,
        patch_size: Sequence[int] = (64, 64, 32),
        slice_axis: int | None = None,
        skip_empty_slices: bool = False,
        batch_size: int = 2,
        samples_per_volume: int = 8,
        queue_length: int = 48,
        num_workers: int = 1,
        sampler: str = "label",
        label_probabilities: Mapping[int, float] | None = None,
        min_label_fraction: float = 0.1,
        augmentation: str = "default",
        test_fraction: float = 0.2,
        num_folds: int = 5,
        fold: int = 0,
        split_seed: int = 0,
        targets: Mapping | None = None,
        max_resample_growth: float = DEFAULT_MAX_RESAMPLE_GROWTH,
        reorient_labels: bool = False,
        dicom: Mapping | None = None,
    ):
        super().__init__()
        self.root = Path(root).expanduser()
        self.labels = dict(labels) if labels is not None else None
        self.layout = layout
        self.phantom = dict(phantom) if phantom is not None else None
        self.preprocess = dict(preprocess or {})
        self.reading = ReadOptions(
            nonuniform_slices=dict(dicom or {}).get("nonuniform_slices", "error"),
            reorient_labels=bool(reorient_labels),
        )
        self.settings = preprocess_settings(self.preprocess)
        self.resample_limit = ResampleLimit.from_config(
            max_resample_growth, "data.max_resample_growth"
        )
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.slice_axis = check_slice_axis(slice_axis)
        dims = 3 if slice_axis is None else 2
        self.patch_size = positive_ints("data.patch_size", patch_size, length=dims)
        self.volume_patch = volume_patch_size(self.patch_size, self.slice_axis)
        if skip_empty_slices and slice_axis is None:
            raise ConfigError("data.skip_empty_slices needs 2D mode (data.slice_axis)")
        self.skip_empty_slices = bool(skip_empty_slices)
        for key, value in {
            "data.batch_size": batch_size,
            "data.samples_per_volume": samples_per_volume,
            "data.queue_length": queue_length,
        }.items():
            positive_ints(key, [value])
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
        if sampler not in SAMPLERS:
            raise ConfigError(f"data.sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        if not isinstance(min_label_fraction, int | float) or not 0 <= min_label_fraction <= 1:
            raise ConfigError(
                f"data.min_label_fraction must be in [0, 1], got {min_label_fraction!r}"
            )
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
        self.min_label_fraction = float(min_label_fraction)
        self.augmentation = build_augmentation(augmentation, self.slice_axis)
        self.split_args = dict(
            test_fraction=test_fraction, num_folds=num_folds, fold=fold, seed=split_seed
        )
        self.targets = dict(targets) if targets else None
        if self.targets is not None and not self.targets.get("path"):
            raise ConfigError(
                "data.targets.path must name a .tsv or .csv file (or data.targets=null)"
            )
        self.cache_root: Path | None = None
        self.cases: dict[str, list[PreparedCase]] = {}
        self._checked = False
        self.cascade: Cascade | None = None
        self.training_masks: dict = {"source": "perturbed"}
        self.case_targets: dict[str, dict[str, int | float]] = {}
        self._regions: dict[tuple[str, float], RegionFilter] = {}

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
        if self.cases:
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

    def _write_phantom(self) -> None:
        if self.phantom is not None:
            write_phantom_dataset(self.root, **self.phantom)

    def prepare_data(self) -> None:
        """Generate the phantom (if configured) and prepare the cache (if ``cache_dir``)."""
        self._write_phantom()
        if self.cache_dir is not None:
            self.cache_root = prepare_cache(
                self.dataset, self.settings, self.cache_dir, self.resample_limit
            )

    @cached_property
    def dataset(self) -> DatasetInfo:
        """The discovered cases (generates the phantom first when configured)."""
        self._write_phantom()
        root = self.root.resolve()
        if is_zarr_store(root):
            return discover_zarr_dataset(root, self.labels)
        return discover_cases(root, self.labels, self.layout, self.reading)

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
        """Open the cases of the splits ``stage`` needs (all for None)."""
        if not self._checked:
            if self.cache_dir is not None:
                # Quick when prepare_data ran: every case is found current.
                self.prepare_data()
            else:
                validate_dataset(self.dataset, self.settings)
            self._checked = True
            split = self.split
            log.info(
                "%s: %d train, %d val, %d test cases%s",
                self.dataset.root,
                len(split.train),
                len(split.val),
                len(split.test),
                f"; cache {self.cache_root}" if self.cache_root else "",
            )
        for name in STAGE_SPLITS.get(stage, ("train", "val", "test")):
            if name in self.cases:
                continue
            ids = self.shares[name]
            self.cases[name] = open_cases(
                self.dataset, self.settings, self.cache_root, ids, self.resample_limit
            )
            for case in self.cases[name]:
                targets = self.case_targets.get(case.case_id, {})
                case.values = {target_key(task): value for task, value in targets.items()}
            if name == "train":
                self._add_training_extras(self.cases[name])

    @cached_property
    def shares(self) -> dict[str, list[str]]:
        """The case ids of each split this process reads (its share under DDP)."""
        rank, world_size = self._rank_and_world_size()
        shares = {}
        for name in ("train", "val", "test"):
            ids = list(getattr(self.split, name))
            if world_size > 1:
                ids = rank_share(name, ids, rank, world_size)
                log.info("rank %d of %d: %s cases %s", rank, world_size, name, ids)
            shares[name] = ids
        return shares

    def _add_training_extras(self, cases: list[PreparedCase]) -> None:
        """Pre-selected patches (sampler ``labelled``) and earlier-stage predictions (cascade
        with ``training_masks.source=predictions``), stored in the cache when there is one."""
        predicted = self._predicted_mask_paths([c.case_id for c in cases])
        for case in cases:
            if self.sampler == "labelled":
                case.preselected = self._preselected(case)
            if case.case_id in predicted:
                case.priors = self._priors(case, predicted[case.case_id])

    def _cached(self, case: PreparedCase, name: str, compute, volume: bool = False):
        """An array of the case's cache group (computed and stored once), or computed."""
        if self.cache_root is None:
            return compute()
        path = self.cache_root / case.case_id / name
        if not (path / "zarr.json").is_file():
            with exclusive_lock(self.cache_root):  # the lock prepare_cache holds
                if not (path / "zarr.json").is_file():
                    write_array_atomically(path, compute(), volume=volume)
        array = open_array(path)
        return open_volume(array) if volume else array

    def _preselected(self, case: PreparedCase) -> np.ndarray:
        """Corners of patches with enough labelled voxels (per patch size and fraction)."""
        size = "x".join(map(str, self.volume_patch))
        name = f"preselected_{size}_{self.min_label_fraction:g}"

        def compute() -> np.ndarray:
            return labelled_corners(case.label, self.volume_patch, self.min_label_fraction)

        return np.asarray(self._cached(case, name, compute)[:])

    def _predicted_mask_paths(self, case_ids: Sequence[str]) -> dict[str, dict[str, Path]]:
        """Earlier-stage prediction files per training case (source: predictions)."""
        if self.cascade is None or self.training_masks["source"] != "predictions":
            return {}
        if not self.training_masks.get("dir"):
            raise ConfigError("stage.training_masks.dir is required with source=predictions")
        if self.dataset.storage == "zarr":
            raise ConfigError(
                "stage.training_masks.source=predictions reads prediction files on the "
                "source grid; it is not available for Zarr datasets"
            )
        return prediction_mask_paths(
            self.training_masks["dir"], self.cascade.mask_producers, case_ids
        )

    def _priors(self, case: PreparedCase, paths: Mapping[str, Path]) -> dict:
        """The prediction masks preprocessed like the case; stored under a name keyed by the
        files' signature, so new predictions are prepared again."""
        signature = json.dumps(file_signature(list(paths.values())))
        key = hashlib.sha256(signature.encode()).hexdigest()[:12]
        names = {stage: f"prior_{stage}_{key}" for stage in paths}
        stored = self.cache_root is not None and all(
            (self.cache_root / case.case_id / name / "zarr.json").is_file()
            for name in names.values()
        )
        case_info = self.dataset.case(case.case_id)
        arrays = (
            {}
            if stored
            else prepare_priors(case_info, self.dataset, self.settings, paths, self.resample_limit)
        )
        return {
            stage: self._cached(case, name, lambda stage=stage: arrays[stage], volume=True)
            for stage, name in names.items()
        }

    def _stage_masks_transform(self) -> tio.Transform | None:
        if self.cascade is None or self.training_masks["source"] != "perturbed":
            return None
        producers = self.cascade.mask_producers
        if not producers:
            return None
        options = {k: v for k, v in self.training_masks.items() if k != "source"}
        values = {name: sorted(self.cascade.stage(name).values) for name in producers}
        return PerturbedStageMasks(values, copy=False, **options)

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _region(self, epoch: int) -> RegionFilter | None:
        """The region the current stage's patch centres stay in (kept across epochs, since
        finding each case's region reads its label once)."""
        region = self.cascade.sampling_stage(epoch).region if self.cascade else None
        if region is None:
            return None
        key = (region.stage, region.margin_mm)
        if key not in self._regions:
            values = sorted(self.cascade.stage(region.stage).values)
            self._regions[key] = RegionFilter(region.stage, values, region.margin_mm)
            self._regions[key].prepare(self.cases["train"])
        return self._regions[key]

    def _distance_maps(self) -> tio.Transform | None:
        """Voxel-regression targets, computed from each (augmented) label after every
        intensity transform."""
        tasks = self.cascade.tasks if self.cascade else []
        tasks = [t for t in tasks if t.type == "voxel_regression"]
        if not tasks:
            return None
        return SignedDistanceMaps({t.name: (t.distance_to, t.clip_mm) for t in tasks})

    def _locator(self, epoch: int) -> PatchLocator:
        probabilities = self.label_probabilities or {v: 1.0 for v in self.dataset.labels}
        unknown = sorted(set(probabilities) - set(self.dataset.labels))
        if unknown:
            raise ConfigError(
                f"data.label_probabilities names label values {unknown} that the dataset "
                f"does not declare (declared: {sorted(self.dataset.labels)})"
            )
        return PatchLocator(
            self.volume_patch,
            self.sampler,
            probabilities,
            self.slice_axis,
            self.skip_empty_slices,
            region=self._region(epoch),
            focus_size=self._focus(epoch),
        )

    def _focus(self, epoch: int) -> tuple[int, ...]:
        """The part of each patch the current stage sees (its centre, see
        medseg.models.resolution): sampled locations are centred in it."""
        if self.cascade is None:
            return self.volume_patch
        stage = self.cascade.sampling_stage(epoch)
        grid = stage_grid(stage.name, stage.downsample, stage.patch_size, self.patch_size)
        return volume_patch_size(grid.extent, self.slice_axis)

    def train_dataset(self, epoch: int = 0) -> PatchDataset:
        transforms = [
            self.augmentation.transforms,
            self._stage_masks_transform(),
            self._distance_maps(),
        ]
        transforms = [t for t in transforms if t is not None]
        return PatchDataset(
            self.cases["train"],
            self._locator(epoch),
            self.volume_patch,
            self.augmentation.spatial,
            tio.Compose(transforms, copy=False) if transforms else None,
            self.samples_per_volume,
        )

    def train_dataloader(self) -> DataLoader:
        # Rebuilt every epoch (trainer.reload_dataloaders_every_n_epochs=1), so patches follow
        # the cascade's stage schedule.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        queue = tio.Queue(
            self.train_dataset(epoch),
            max_length=self.queue_length,
            samples_per_volume=1,  # each item of the dataset is one patch
            sampler=ReadyPatchSampler(self.volume_patch),
            num_workers=self.num_workers,
            shuffle_subjects=True,
            shuffle_patches=True,
            # Load volumes on the first patch request, not now: its random draws (subject
            # order, worker seeds) then follow the per-epoch reseed (training_guards.EpochSeed).
            start_background=False,
        )
        # The queue's own workers read patches; batches come out of it in this process. A
        # private generator: Lightning creates this loader's iterator before the epoch's
        # reseed on a fresh or resumed run and after it otherwise, so it must not draw from
        # the global generator.
        return DataLoader(
            queue,
            batch_size=self.batch_size,
            collate_fn=patch_collate(self.slice_axis),
            generator=torch.Generator(),
        )

    def _volume_loader(self, name: str) -> DataLoader:
        return DataLoader(
            VolumeDataset(self.cases[name], self._distance_maps()),
            batch_size=1,
            # Cached cases are read from disk by workers; in-memory ones are already here.
            num_workers=self.num_workers if self.cache_root is not None else 0,
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
