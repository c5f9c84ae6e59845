"""Preprocess a dataset once into a Zarr cache, and open its cases for training.

The cache of a dataset lives in ``<cache_dir>/<dataset folder name>-<key>/`` where the key
hashes the dataset's location, label map, channels and preprocessing settings: changing any
of them prepares a new cache, never reusing a stale one. Inside, each case is a Zarr group
(see :mod:`medseg.data.zarr_store`) that records the size and modification time of its
source files; a case whose files changed is prepared again. Preparing writes each case
atomically, so an interrupted or failed run leaves only complete cases (after a kill, also
hidden staging folders, which the next run removes). Processes preparing one cache take
turns, so parallel sweep jobs never prepare a case twice.

Cases of image files and DICOM folders are read whole, preprocessed with TorchIO
(non-finite voxels, orientation, crop to the non-zero region, resampling, intensity
normalization) and stored. Zarr datasets are read in place: the cache holds only what sampling
needs (label locations, intensity statistics); their non-finite voxels are checked slab by slab
while the statistics are gathered, and replaced on every read
(``data.preprocess.nonfinite=replace``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torchio as tio
import zarr

from medseg.data.cascade import prior_key
from medseg.data.cases import Case, CaseValidationError, DatasetInfo, validate_cases
from medseg.data.fingerprint import dataset_fingerprint
from medseg.data.geometry import ResampleLimit
from medseg.data.image_io import ReadOptions
from medseg.data.nonfinite import NonFinitePolicy
from medseg.data.prepared import PreparedCase
from medseg.data.preprocess import (
    NONZERO_BOX,
    IntensityNormalization,
    MergeLabelMasks,
    ScreenNonFinite,
    build_preprocessing,
)
from medseg.data.scan import LabelIndex, case_rng, foreground_intensities, scan_label, slabs
from medseg.data.subjects import case_to_subject, reorient_labels
from medseg.data.zarr_store import (
    open_group,
    open_volume,
    read_index,
    validate_zarr_cases,
    write_group_atomically,
    write_index,
    write_volume,
    zarr_case_arrays,
)
from medseg.errors import ConfigError, DataError
from medseg.utils.failures import case_failure
from medseg.utils.io import atomic_write_text, remove_leftovers
from medseg.utils.locks import exclusive_lock

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FINGERPRINT_FILE = "fingerprint.json"


@dataclass
class CaseRecord:
    """What preparing one case produces (stored in the cache, or kept in memory).

    ``image`` and ``label`` are None for Zarr datasets, which are read in place.
    """

    image: np.ndarray | None
    label: np.ndarray | None
    affine: np.ndarray
    index: LabelIndex | None
    intensities: np.ndarray
    meta: dict = field(default_factory=dict)


def cache_location(cache_dir: str | Path, dataset: DatasetInfo, settings: Mapping) -> Path:
    """``<cache_dir>/<dataset name>-<12 hex digits of the key>``."""
    identity = {
        "format": FORMAT_VERSION,
        "root": str(dataset.root),
        "labels": {str(k): v for k, v in dataset.labels.items()},
        "channels": list(dataset.channels),
        "preprocess": dict(settings),
        "reading": dataset.reading.identity(),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser().resolve() / f"{dataset.root.name}-{key}"


def case_files(case: Case) -> list[Path]:
    """Every file (or DICOM/Zarr folder) a case is read from: images, label, merged masks."""
    label = [case.label] if case.label is not None else []
    return [*case.images, *label, *(path for _, path in case.label_masks)]


def source_signature(case: Case) -> list[list]:
    """(path, size, modification time) of every file the case is read from, and the label
    value each merged mask contributes."""
    masks = [[value, str(path)] for value, path in case.label_masks]
    return file_signature(case_files(case)) + masks


def file_signature(paths: Sequence[Path]) -> list[list]:
    """(path, size, modification time) of the files, and of every file in a folder."""
    entries = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            try:
                stat = file.stat()
            except OSError:
                entries.append([str(file), -1, -1])
            else:
                entries.append([str(file), stat.st_size, stat.st_mtime_ns])
    return entries


def check_zarr_settings(settings: Mapping) -> None:
    """Zarr datasets are read in place, on their stored grid: only intensity applies."""
    for key in ("canonical", "crop_nonzero", "spacing"):
        if settings[key]:
            raise ConfigError(
                f"data.preprocess.{key}={settings[key]!r}: Zarr datasets are read in place on "
                f"their stored grid; set data.preprocess.{key} to false/null (data=zarr does)"
            )


def prepare_case(
    case: Case, dataset: DatasetInfo, settings: Mapping, limit: ResampleLimit | None = None
) -> CaseRecord:
    """Preprocess one case (files) or scan it in place (Zarr); ``limit`` bounds resampling
    (None: the default of ``data.max_resample_growth``).

    Raises:
        DataError: naming the file and the problem (unreadable, non-finite voxels, an axis
            too thin to resample, a resampling that would grow it past ``limit``).
    """
    if dataset.storage == "zarr":
        return _scan_zarr_case(case, dataset, settings)
    return _preprocess_file_case(case, dataset, settings, limit)


def _load(image: tio.Image, case: Case) -> None:
    try:
        image.load()
    except DataError as error:  # the reader's own message names the file
        raise DataError(f"{case.case_id}: {error}") from error
    except Exception as error:  # truncated gzip, bad header, ...
        raise DataError(
            f"{case.case_id}: {image.path}: cannot be read ({type(error).__name__}: {error})"
        ) from error


def _load_subject(
    case: Case, reading: ReadOptions, label_maps: Mapping[str, Path] | None = None
) -> tio.Subject:
    """The case's files read whole, label maps on a flipped image grid reoriented onto it
    when `reading` says so."""
    subject = case_to_subject(case, label_maps, reading)
    for image in subject.get_images(intensity_only=False):
        _load(image, case)
    if reading.reorient_labels:
        reorient_labels(subject)
    return subject


def _preprocess_file_case(
    case: Case, dataset: DatasetInfo, settings: Mapping, limit: ResampleLimit | None
) -> CaseRecord:
    subject = _load_subject(case, dataset.reading)
    source_affine = subject["image"].affine.copy()
    source_shape = list(subject.spatial_shape)
    # Merged masks first, so the fingerprint's foreground includes them; non-finite voxels
    # before the fingerprint samples intensities (build_preprocessing screens them again,
    # finding none).
    subject = MergeLabelMasks()(subject)
    subject = ScreenNonFinite(_nonfinite_policy(settings))(subject)
    if settings["canonical"]:
        subject = tio.ToCanonical()(subject)
    oriented = {"shape": list(subject.spatial_shape), "spacing": list(subject.spacing)}
    label = subject["label"].data[0].numpy() if "label" in subject else None
    image = subject["image"].data.numpy()
    intensities = (
        foreground_intensities(image, label, int((label > 0).sum()), case_rng(case.case_id, "fg"))
        if label is not None
        else np.zeros((image.shape[0], 0), np.float32)
    )
    subject = build_preprocessing(**{**settings, "canonical": False}, resample_limit=limit)(subject)
    box = subject.get(NONZERO_BOX)
    image = subject["image"].data.numpy().astype(np.float32)
    label = subject["label"].data[0].numpy() if "label" in subject else None
    index = _scan(label, dataset, case, str(case.label))
    meta = {
        "source": oriented,
        "source_file_shape": source_shape,
        "source_file_affine": np.asarray(source_affine).tolist(),
        "nonzero_box": box,
        "cropped_shape": oriented["shape"] if box is None else _box_shape(box),
        "statistics": None,
    }
    return CaseRecord(image, label, subject["image"].affine, index, intensities, meta)


def prepare_priors(
    case: Case,
    dataset: DatasetInfo,
    settings: Mapping,
    paths: Mapping[str, Path],
    limit: ResampleLimit | None = None,
) -> dict[str, np.ndarray]:
    """Masks of ``paths`` (stage -> file on the case's source grid) preprocessed as the case
    is (the same orientation, crop and resampling), as uint8 arrays on its training grid."""
    priors = {prior_key(stage): path for stage, path in paths.items()}
    subject = _load_subject(case, dataset.reading, priors)
    subject = build_preprocessing(**settings, resample_limit=limit)(subject)
    return {
        stage: (subject[prior_key(stage)].data[0].numpy() > 0).astype(np.uint8) for stage in paths
    }


def _box_shape(box: Sequence[int]) -> list[int]:
    return [int(box[a + 3] - box[a]) for a in range(3)]


def _scan(label, dataset: DatasetInfo, case: Case, source: str) -> LabelIndex | None:
    if label is None:
        return None
    return scan_label(label, dataset.labels, case_rng(case.case_id, "locations"), source)


def _nonfinite_policy(settings: Mapping) -> NonFinitePolicy:
    return NonFinitePolicy.from_config(settings["nonfinite"], settings["nonfinite_value"])


def _zarr_statistics(
    image, normalization: IntensityNormalization, policy: NonFinitePolicy, source: str
) -> np.ndarray | None:
    """One pass over the image's slabs: its non-finite voxels counted (refused or replaced,
    as the policy says) and the statistics the normalization needs gathered."""
    read = (np.asarray(image[:, rows]) for _, rows in slabs(image, 1))
    blocks = policy.screen_blocks(read, source)
    if normalization.needs_statistics:
        return normalization.statistics(blocks, source)
    for _ in blocks:  # the non-finite check reads the whole image either way
        pass
    return None


def _scan_zarr_case(case: Case, dataset: DatasetInfo, settings: Mapping) -> CaseRecord:
    try:
        image, label, affine = zarr_case_arrays(case)
        index = _scan(label, dataset, case, str(case.label))
        normalization = IntensityNormalization.from_config(**settings["intensity"])
        policy = _nonfinite_policy(settings)
        statistics = _zarr_statistics(image, normalization, policy, str(case.images[0]))
        foreground = 0 if index is None else sum(n for v, n in index.counts.items() if v > 0)
        intensities = policy.replace(
            foreground_intensities(image, label, foreground, case_rng(case.case_id, "fg"))
            if label is not None
            else np.zeros((image.shape[0], 0), np.float32)
        )
    except DataError:
        raise
    except Exception as error:  # a missing or corrupt chunk surfaces while reading
        raise DataError(
            f"{case.case_id}: {case.images[0].parent}: cannot be read "
            f"({type(error).__name__}: {error})"
        ) from error
    spacing = np.linalg.norm(affine[:3, :3], axis=0).tolist()
    shape = list(image.shape[1:])
    meta = {
        "source": {"shape": shape, "spacing": spacing},
        "source_file_shape": shape,
        "source_file_affine": affine.tolist(),
        "nonzero_box": None,
        "cropped_shape": shape,
        "statistics": None if statistics is None else statistics.tolist(),
    }
    return CaseRecord(None, None, affine, index, intensities, meta)


def _write_record(path: Path, case: Case, record: CaseRecord, signature: list) -> None:
    def fill(group: zarr.Group) -> None:
        if record.image is not None:
            write_volume(group, record.image, record.label)
        if record.index is not None:
            write_index(group, record.index)
        group.create_array("intensities", data=record.intensities.astype(np.float32))
        group.attrs["spacing"] = [float(s) for s in np.linalg.norm(record.affine[:3, :3], axis=0)]
        group.attrs["affine"] = np.asarray(record.affine).tolist()
        group.attrs["medseg"] = {
            "format": FORMAT_VERSION,
            "case_id": case.case_id,
            "signature": signature,
            "label_counts": None
            if record.index is None
            else {str(v): n for v, n in record.index.counts.items()},
            **record.meta,
        }

    write_group_atomically(path, fill)


def _cached_meta(path: Path) -> dict | None:
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs).get("medseg")
    except Exception:  # missing or unreadable entries are prepared again
        return None


def _is_current(path: Path, signature: list) -> bool:
    meta = _cached_meta(path)
    return (
        meta is not None
        and meta.get("format") == FORMAT_VERSION
        and meta.get("signature") == signature
    )


def prepare_cache(
    dataset: DatasetInfo,
    settings: Mapping,
    cache_dir: str | Path,
    limit: ResampleLimit | None = None,
) -> Path:
    """Prepare every case that is missing or stale; return the cache folder.

    Cases that need preparing are validated first (one error lists every bad case); a case
    that fails while being read, preprocessed (see :func:`prepare_case`; ``limit`` bounds
    resampling) or written, whatever it raises, leaves no entry and is reported with the
    others after the rest are written. Processes preparing the same cache take turns (see
    :mod:`medseg.utils.locks`): the second one waits, then finds the cases current.
    """
    root = cache_location(cache_dir, dataset, settings)
    with exclusive_lock(root):
        _prepare_stale_cases(root, dataset, settings, limit)
    return root


def _prepare_stale_cases(
    root: Path, dataset: DatasetInfo, settings: Mapping, limit: ResampleLimit | None
) -> None:
    """The work of :func:`prepare_cache`, done while holding the cache's lock: what a killed
    run left half-written goes first, then every case that is missing or stale is written."""
    _remove_leftovers(root)
    stale = []
    signatures = {}
    for case in dataset.cases:
        signatures[case.case_id] = source_signature(case)
        if not _is_current(root / case.case_id, signatures[case.case_id]):
            stale.append(case.case_id)
    if not stale and (root / FINGERPRINT_FILE).is_file():
        return
    validate_dataset(dataset.subset(stale), settings)
    _write_root_attrs(root, dataset, settings)
    # Rewritten once every case is current: a run killed in between leaves none, so the
    # next run writes it again instead of keeping one that misses the new cases.
    (root / FINGERPRINT_FILE).unlink(missing_ok=True)
    problems = []
    for number, case_id in enumerate(stale, start=1):
        case = dataset.case(case_id)
        log.info("preparing %s (%d/%d) into %s", case_id, number, len(stale), root)
        try:
            record = prepare_case(case, dataset, settings, limit)
            _write_record(root / case_id, case, record, signatures[case_id])
        except Exception as error:  # whatever one case raises, the others are prepared
            files = ", ".join(str(p) for p in case_files(case))
            problems.append(case_failure(error, f"{case_id}: {files}", "prepared"))
    if problems:
        raise CaseValidationError(dataset.root, problems, len(dataset.cases))
    write_fingerprint(root, dataset)


def _remove_leftovers(root: Path) -> None:
    """Staging folders of cases (in ``root``) and of arrays added to a case later (in its
    group, see ``SegmentationDataModule._cached``) that a killed process left behind."""
    if not root.is_dir():
        return
    cases = [path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")]
    for folder in [root, *cases]:
        for leftover in remove_leftovers(folder):
            log.info("removed %s, left by an interrupted run", leftover)


def validate_dataset(dataset: DatasetInfo, settings: Mapping) -> None:
    """Check the settings apply to the dataset's storage and every case opens and agrees."""
    if dataset.storage == "zarr":
        check_zarr_settings(settings)
    if not dataset.cases:
        return
    if dataset.storage == "zarr":
        validate_zarr_cases(dataset)
    else:
        validate_cases(dataset)


def _write_root_attrs(root: Path, dataset: DatasetInfo, settings: Mapping) -> None:
    if (root / "zarr.json").is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(root), mode="a")
    group.attrs.update(
        {
            "labels": {str(k): v for k, v in dataset.labels.items()},
            "channel_names": {str(i): c for i, c in enumerate(dataset.channels)},
            "medseg": {
                "format": FORMAT_VERSION,
                "source": str(dataset.root),
                "storage": dataset.storage,
                "preprocess": dict(settings),
            },
        }
    )


def write_fingerprint(root: Path, dataset: DatasetInfo) -> dict:
    """Pool the cached cases' records into ``fingerprint.json`` and return it."""
    metas, intensities = [], []
    for case in dataset.cases:
        group = open_group(root / case.case_id)
        metas.append(dict(group.attrs)["medseg"])
        intensities.append(np.asarray(group["intensities"][:]))
    fingerprint = dataset_fingerprint(metas, intensities, dataset.channels)
    atomic_write_text(root / FINGERPRINT_FILE, json.dumps(fingerprint, indent=2) + "\n")
    return fingerprint


def open_cases(
    dataset: DatasetInfo,
    settings: Mapping,
    root: Path | None,
    case_ids: Sequence[str],
    limit: ResampleLimit | None = None,
) -> list[PreparedCase]:
    """The prepared cases: from the cache at ``root``, or prepared in memory when None
    (``limit`` bounds resampling)."""
    cases = []
    for case_id in case_ids:
        case = dataset.case(case_id)
        if root is None:
            cases.append(_in_memory(case, dataset, settings, limit))
        else:
            cases.append(_from_cache(root / case_id, case, dataset, settings))
    return cases


def _in_memory(
    case: Case, dataset: DatasetInfo, settings: Mapping, limit: ResampleLimit | None
) -> PreparedCase:
    record = prepare_case(case, dataset, settings, limit)
    if dataset.storage == "zarr":
        return _zarr_case(case, settings, record.index, record.meta["statistics"])
    return PreparedCase(case.case_id, record.image, record.label, record.affine, record.index)


def _from_cache(path: Path, case: Case, dataset: DatasetInfo, settings: Mapping) -> PreparedCase:
    group = open_group(path)
    meta = dict(group.attrs)["medseg"]
    counts = meta["label_counts"]
    index = None if counts is None else read_index(group, counts)
    if dataset.storage == "zarr":
        return _zarr_case(case, settings, index, meta["statistics"])
    label = group.get("label")
    return PreparedCase(
        case.case_id,
        open_volume(group["image"]),
        None if label is None else open_volume(label),
        np.asarray(group.attrs["affine"]),
        index,
    )


def _zarr_case(case: Case, settings: Mapping, index: LabelIndex | None, statistics) -> PreparedCase:
    image, label, affine = zarr_case_arrays(case)
    normalization = IntensityNormalization.from_config(**settings["intensity"])
    policy = _nonfinite_policy(settings)
    return PreparedCase(
        case.case_id,
        image,
        label,
        affine,
        index,
        normalization=normalization if normalization.mode != "none" else None,
        statistics=None if statistics is None else np.asarray(statistics),
        nonfinite=policy if policy.mode == "replace" else None,
    )


def cache_size_bytes(root: Path) -> int:
    return sum(
        (Path(folder) / name).stat().st_size for folder, _, names in os.walk(root) for name in names
    )
