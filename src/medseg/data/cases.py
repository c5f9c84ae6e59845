"""Case discovery in MSD / nnU-Net raw folders or folder-per-case layouts, and validation.

A case is an id, one or more image channels and an optional label map. Discovery reads
``dataset.json`` when present (MSD's ``training`` list, or nnU-Net v2's ``channel_names``
and ``file_ending`` with an ``imagesTr``/``labelsTr`` scan) and otherwise scans
``imagesTr``/``labelsTr`` alone. A folder-per-case layout (as BraTS ships: one folder per
case holding each modality and the label) is described by file-name patterns instead. An
image channel or label is a file of any format of :mod:`medseg.data.formats` (NIfTI, NRRD,
MetaImage) or a folder holding one DICOM series. Validation opens every file before
training starts and reports every bad case in one error, saying how mismatched grids differ.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.data.alignment import grid_difference
from medseg.data.formats import IMAGE_ENDINGS, image_ending, strip_image_ending
from medseg.data.geometry import warn_implausible_spacing
from medseg.data.image_io import (
    DEFAULT_READING,
    ImageHeader,
    ReadOptions,
    read_header,
    read_image,
)
from medseg.errors import DataError

log = logging.getLogger(__name__)

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One case: its id, image channel files (or one 4D file) and optional label file."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None
    # (value, binary mask file): background voxels of the label inside the mask get `value`
    label_masks: tuple[tuple[int, Path], ...] = ()


@dataclass(frozen=True)
class DatasetInfo:
    """The cases of a dataset with its declared label map and channel names.

    ``storage`` is ``files`` (image files or DICOM folders) or ``zarr`` (a Zarr dataset, see
    :mod:`medseg.data.zarr_store`; then case paths name Zarr arrays). ``reading`` says how
    the files are read (DICOM slice gaps, labels on a flipped grid).
    """

    root: Path
    cases: tuple[Case, ...]
    labels: dict[int, str]  # label value -> class name, background included
    channels: tuple[str, ...]
    storage: str = "files"
    reading: ReadOptions = DEFAULT_READING

    def subset(self, case_ids: Sequence[str]) -> DatasetInfo:
        wanted = set(case_ids)
        cases = tuple(c for c in self.cases if c.case_id in wanted)
        return DatasetInfo(self.root, cases, self.labels, self.channels, self.storage, self.reading)

    def case(self, case_id: str) -> Case:
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise KeyError(case_id)


class CaseValidationError(DataError):
    """Raised with one line per bad case, each naming the file and the problem."""

    def __init__(self, root: Path, problems: Sequence[str], num_cases: int):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {num_cases} case(s) of {root}:\n{lines}")


def discover_cases(
    root: str | Path,
    labels: Mapping | None = None,
    layout: Mapping | None = None,
    reading: ReadOptions = DEFAULT_READING,
) -> DatasetInfo:
    """Find the cases of a dataset folder.

    Args:
        root: MSD-layout folder with ``imagesTr/`` (and usually ``labelsTr/`` and
            ``dataset.json``), or the root of a folder-per-case layout.
        labels: label value -> name; overrides (or replaces a missing) dataset.json map.
        layout: None for MSD; for one folder per case: ``{channels: {name: pattern},
            label: pattern, merge_masks: {value: pattern}}`` with glob patterns matched
            inside each case folder (see :func:`_folder_cases`).
        reading: how the files are read and checked (see :class:`ReadOptions`).
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data.root: dataset folder {root} does not exist")
    if layout is not None:
        cases, channels = _folder_cases(root, layout)
        label_map = parse_labels(labels, root / "dataset.json")
        return DatasetInfo(root, cases, label_map, channels, reading=reading)
    meta_path = root / "dataset.json"
    meta: dict = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise DataError(f"{meta_path}: cannot read dataset.json ({error})") from error
    label_map = parse_labels(labels if labels is not None else meta.get("labels"), meta_path)
    channels = parse_channels(meta)
    if isinstance(meta.get("training"), list):
        cases = _cases_from_training_list(root, meta["training"], meta_path)
    else:
        cases = _scan_cases(root, meta.get("file_ending"))
    if not cases:
        raise DataError(f"{root}: no cases found (expected images in {root / 'imagesTr'})")
    if not channels:
        channels = tuple(f"channel_{i}" for i in range(max(len(c.images) for c in cases)))
    return DatasetInfo(root, tuple(cases), label_map, channels, reading=reading)


def parse_labels(labels: Mapping | None, meta_path: Path) -> dict[int, str]:
    """Accept MSD ({"1": "liver"}) and nnU-Net v2 ({"liver": 1}) label maps.

    ``meta_path`` (dataset.json or a Zarr store) is named in errors."""
    if not labels:
        raise DataError(
            f"no label map: {meta_path} is missing or has no 'labels'; "
            "declare one with data.labels={0: background, 1: ...}"
        )
    parsed: dict[int, str] = {}
    for key, value in labels.items():
        if _is_int(key):
            parsed[int(key)] = str(value)
        elif _is_int(value):
            parsed[int(value)] = str(key)
        else:
            raise DataError(
                f"{meta_path}: label entry {key!r}: {value!r} is not a 'value: name' pair "
                "(region-based label lists are not supported)"
            )
    if 0 not in parsed:
        parsed[0] = "background"
    return dict(sorted(parsed.items()))


def _is_int(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def parse_channels(meta: dict) -> tuple[str, ...]:
    names = meta.get("modality") or meta.get("channel_names") or {}
    return tuple(str(names[k]) for k in sorted(names, key=int)) if names else ()


def _cases_from_training_list(root: Path, entries: list, meta_path: Path) -> list[Case]:
    cases = []
    for entry in entries:
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(f"{meta_path}: training entry {entry!r} has no 'image'")
        listed = (root / entry["image"]).resolve()
        case_id = strip_image_ending(listed.name)
        images = (listed,) if listed.exists() else _channel_files(listed.parent, case_id)
        label = (root / entry["label"]).resolve() if entry.get("label") else None
        # Keep a missing file in the case: validation reports it with the others.
        cases.append(Case(case_id, images or (listed,), label))
    return cases


def _channel_files(folder: Path, case_id: str) -> tuple[Path, ...]:
    """nnU-Net names channels <case>_0000.nii.gz, <case>_0001.nii.gz, ... (any format)"""
    found = []
    for ending in IMAGE_ENDINGS:
        found += folder.glob(f"{glob_escape(case_id)}_[0-9][0-9][0-9][0-9]{ending}")
    return tuple(sorted(found))


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


def _folder_cases(root: Path, layout: Mapping) -> tuple[tuple[Case, ...], tuple[str, ...]]:
    """Cases of a folder-per-case layout: every folder under `root` (at any depth) holding a
    file that matches the first channel's pattern is a case, named after the folder."""
    channels = dict(layout.get("channels") or {})
    if not channels:
        raise DataError("data.layout.channels must name at least one image channel pattern")
    first = next(iter(channels.values()))
    folders = sorted({p.parent for p in root.rglob(first) if p.is_file()})
    if not folders:
        raise DataError(f"{root}: no case folder holds a file matching {first!r}")
    names = [f.name for f in folders]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{root}: case folder names are not unique: {duplicates}")
    cases = []
    for folder in folders:
        images = tuple(_match(folder, pattern) for pattern in channels.values())
        label = _match(folder, layout["label"]) if layout.get("label") else None
        masks = tuple(
            (int(value), _match(folder, pattern))
            for value, pattern in (layout.get("merge_masks") or {}).items()
        )
        cases.append(Case(folder.name, images, label, masks))
    return tuple(cases), tuple(str(name) for name in channels)


def _match(folder: Path, pattern: str) -> Path:
    """The one file in `folder` matching `pattern`; a missing one is kept as a path for
    validation to report with the other problems."""
    found = sorted(folder.glob(pattern))
    return found[0] if len(found) == 1 else folder / pattern


def group_case_files(
    paths: Iterable[Path], endings: Sequence[str] = IMAGE_ENDINGS
) -> dict[str, list[Path]]:
    """Image files by case id, sorted: nnU-Net's ``<case>_NNNN`` files are the channels of
    ``<case>``; any other name is a case of its own; a folder is a DICOM series. Hidden files
    and other endings are left out (see :func:`skipped_files`).
    """
    by_case: dict[str, list[Path]] = {}
    for path in sorted(paths):
        if path.name.startswith("."):
            continue
        if path.is_dir():  # a DICOM series
            stem = path.name
        else:
            ending = next((e for e in endings if path.name.endswith(e)), None)
            if ending is None:
                continue
            stem = path.name[: -len(ending)]
        match = _CHANNEL_SUFFIX.match(stem)
        by_case.setdefault(match["case"] if match else stem, []).append(path)
    return dict(sorted(by_case.items()))


def skipped_files(paths: Iterable[Path], endings: Sequence[str] = IMAGE_ENDINGS) -> list[str]:
    """Names of the files :func:`group_case_files` leaves out for their ending."""
    return sorted(
        p.name
        for p in paths
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(tuple(endings))
    )


def _scan_cases(root: Path, file_ending: str | None) -> list[Case]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DataError(f"{root}: no imagesTr/ folder and no dataset.json training list")
    endings = (file_ending,) if file_ending else IMAGE_ENDINGS
    entries = list(images_dir.iterdir())
    skipped = skipped_files(entries, endings)
    if skipped:
        log.warning(
            "%s: skipping %d file(s) that are not images (%s): %s",
            images_dir,
            len(skipped),
            " ".join(endings),
            skipped,
        )
    return [
        Case(case_id, tuple(images), _label_file(labels_dir, case_id, endings))
        for case_id, images in group_case_files(entries, endings).items()
    ]


def _label_file(folder: Path, case_id: str, endings: Sequence[str]) -> Path | None:
    """The case's label in `folder`; a file of the case's name in an unreadable format is
    kept for validation to report."""
    found = [folder / f"{case_id}{e}" for e in endings if (folder / f"{case_id}{e}").exists()]
    if not found:
        found = [
            p
            for p in sorted(folder.glob(f"{glob_escape(case_id)}.*"))
            if strip_image_ending(p.name) == case_id or image_ending(p.name) is None
        ]
    return found[0] if found else None


def validate_cases(dataset: DatasetInfo, require_labels: bool = True) -> None:
    """Open every file; check grids, channels and label values agree.

    Raises:
        CaseValidationError: listing every problem found, one line each.
    """
    problems: list[str] = []
    num_channels = len(dataset.channels)
    for case in dataset.cases:
        problems += _case_problems(case, dataset, num_channels, require_labels)
    if problems:
        raise CaseValidationError(dataset.root, problems, len(dataset.cases))


def _case_problems(
    case: Case, dataset: DatasetInfo, num_channels: int, require_labels: bool
) -> list[str]:
    problems: list[str] = []
    headers = []
    for path in case.images:
        try:
            headers.append((path, read_header(path, dataset.reading)))
        except DataError as error:
            problems.append(f"{case.case_id}: {error}")
    if problems:
        return problems
    reference_path, reference = headers[0]
    spatial = reference.shape[:3]
    warn_implausible_spacing(str(reference_path), reference.affine, spatial)
    channels = 0
    for path, image in headers:
        channels += image.shape[3] if len(image.shape) == 4 else 1
        difference = grid_difference(image.shape, image.affine, spatial, reference.affine)
        if len(image.shape) not in (3, 4):
            problems.append(
                f"{case.case_id}: {path}: expected a 3D or 4D image, got shape {image.shape}"
            )
        elif difference is not None:
            problems.append(
                f"{case.case_id}: {path}: grid differs from {reference_path.name}: {difference}"
            )
    if num_channels and channels != num_channels and not problems:
        problems.append(
            f"{case.case_id}: {reference_path}: has {channels} channel(s), the dataset declares "
            f"{num_channels}"
        )
    if case.label is None:
        if require_labels:
            problems.append(f"{case.case_id}: no label file found for {reference_path}")
        return problems
    label_problem = _label_map_problem(
        case, case.label, "label", dataset, reference_path, reference
    )
    if label_problem:
        return [*problems, label_problem]
    problems += _label_value_problems(case, dataset)
    for value, path in case.label_masks:
        problems += _label_mask_problems(case, value, path, dataset, reference_path, reference)
    return problems


def _label_map_problem(
    case: Case,
    path: Path,
    what: str,
    dataset: DatasetInfo,
    reference_path: Path,
    reference: ImageHeader,
) -> str | None:
    """Why a label map (or merged mask) cannot be used with the image, or None.

    A label map on the image's grid with flipped or permuted axes is accepted when
    ``reading.reorient_labels`` is on (it is reoriented when read), else its line says so.
    """
    try:
        header = read_header(path, dataset.reading)
    except DataError as error:
        return f"{case.case_id}: {error}"
    if (len(header.shape) == 4 and header.shape[3] != 1) or len(header.shape) not in (3, 4):
        return f"{case.case_id}: {path}: a {what} must be one 3D volume, got shape {header.shape}"
    difference = grid_difference(header.shape, header.affine, reference.shape, reference.affine)
    if difference is None or (difference.same_world_grid and dataset.reading.reorient_labels):
        return None
    line = f"{case.case_id}: {path}: {what} grid differs from the image ({reference_path.name}): "
    if difference.same_world_grid:
        return (
            f"{line}{difference}: set {dataset.reading.reorient_key}=true to reorient the "
            f"{what} onto the image grid"
        )
    return f"{line}{difference}"


def _label_mask_problems(
    case: Case,
    value: int,
    path: Path,
    dataset: DatasetInfo,
    reference_path: Path,
    reference: ImageHeader,
) -> list[str]:
    if value not in dataset.labels:
        return [
            f"{case.case_id}: {path}: merges value {value}, which the label map does not declare"
        ]
    problem = _label_map_problem(case, path, "mask", dataset, reference_path, reference)
    if problem:
        return [problem]
    values, error = _label_values(path, dataset)
    if error:
        return [f"{case.case_id}: {error}"]
    if not set(values.tolist()) <= {0, 1}:
        return [f"{case.case_id}: {path}: a merged mask must be binary, has values {values[:10]}"]
    return []


def _label_values(path: Path, dataset: DatasetInfo) -> tuple[np.ndarray, str | None]:
    """The distinct values of a label file, read to its end (a truncated file is an error)."""
    try:
        data, _ = read_image(path, dataset.reading)
        return np.unique(np.asanyarray(data)), None
    except DataError as error:
        return np.array([]), str(error)
    except Exception as error:  # truncated gzip streams fail only when the data is read
        return np.array([]), f"{path}: data cannot be read ({type(error).__name__}: {error})"


def _label_value_problems(case: Case, dataset: DatasetInfo) -> list[str]:
    values, error = _label_values(case.label, dataset)
    if error:
        return [f"{case.case_id}: {error}"]
    if not np.all(np.equal(np.mod(values, 1), 0)):
        return [f"{case.case_id}: {case.label}: label map has non-integer values"]
    unknown = sorted(set(values.astype(np.int64).tolist()) - set(dataset.labels))
    if unknown:
        declared = ", ".join(f"{k}: {v}" for k, v in dataset.labels.items())
        return [
            f"{case.case_id}: {case.label}: label values {unknown} are not in the declared "
            f"label map {{{declared}}}"
        ]
    return []
