"""The Zarr layout medseg reads (``data=zarr``) and writes (the preprocessing cache).

A Zarr dataset is a group with one child group per case::

    dataset.zarr/                 attrs: labels {"0": "background", "1": "liver"},
                                         channel_names {"0": "CT"} (optional)
      case_001/                   attrs: spacing [x, y, z] mm, and/or affine (4x4, RAS mm)
        image                     [C, x, y, z] or [x, y, z], any numeric dtype
        label                     [x, y, z] integer (optional)

The attributes mirror dataset.json. The cache written by ``medseg-prepare`` has the same
layout (so it can be opened like any Zarr dataset) and adds per case: ``locations/<value>``
(sampled voxel locations per label value), ``foreground_slices/<axis>``, ``intensities``
(a sample of raw foreground intensities for the dataset fingerprint), ``preselected_<key>``
(patch corners with enough labelled voxels) and a ``medseg`` attribute with provenance.

Every write is atomic: a case group is built in a hidden sibling folder and renamed into
place, so an interrupted write never leaves a half-written case behind.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torchio as tio
import zarr
from zarr.codecs import BytesCodec
from zarr.storage import LocalStore

from medseg.data.cases import Case, CaseValidationError, DatasetInfo, parse_channels, parse_labels
from medseg.data.geometry import check_affine, warn_implausible_spacing
from medseg.data.prepared import ChannelAxis
from medseg.data.scan import LabelIndex
from medseg.data.subjects import case_to_subject, reorient_labels
from medseg.errors import DataError
from medseg.utils.io import hidden_sibling

# Chunks of Zarr datasets that convert_to_zarr writes: 64^3 voxels, so a 64^3 patch touches
# at most 8 and one file per chunk stays few (a 512 x 512 x 300 CT is 320 chunks).
CHUNK = 64


def is_zarr_store(path: Path) -> bool:
    return (path / "zarr.json").is_file() or (path / ".zgroup").is_file()


def is_zarr_array(path: Path) -> bool:
    if (path / ".zarray").is_file():
        return True
    try:
        return json.loads((path / "zarr.json").read_text()).get("node_type") == "array"
    except (OSError, ValueError):
        return False


def read_zarr_array(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A whole array of a Zarr dataset case and the case's affine (from its group)."""
    try:
        data = np.asarray(zarr.open_array(str(path), mode="r")[:])
    except Exception as error:  # zarr raises several types for missing or corrupt data
        raise DataError(f"{path}: cannot be read as a Zarr array ({error})") from error
    return data, case_affine(open_group(path.parent).attrs, path.parent)


def _is_node(path: Path) -> bool:
    """A Zarr group or array (format 3 or 2) on the local file system."""
    return any((path / name).is_file() for name in ("zarr.json", ".zarray", ".zgroup"))


def open_group(path: Path, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode=mode)
    except Exception as error:  # zarr raises several types for missing or corrupt metadata
        raise DataError(f"{path}: cannot be opened as a Zarr group ({error})") from error


def discover_zarr_dataset(root: Path, labels: Mapping | None = None) -> DatasetInfo:
    """The cases of a Zarr dataset: every child group with an ``image`` array."""
    group = open_group(root)
    attrs = dict(group.attrs)
    label_map = parse_labels(labels if labels is not None else attrs.get("labels"), root)
    cases = []
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not _is_node(folder / "image"):
            continue
        label = folder / "label" if _is_node(folder / "label") else None
        cases.append(Case(folder.name, (folder / "image",), label))
    if not cases:
        raise DataError(f"{root}: no case groups with an 'image' array found")
    channels = parse_channels(attrs)
    if not channels:
        first = open_group(root / cases[0].case_id)["image"]
        channels = tuple(f"channel_{i}" for i in range(_channels(first)))
    return DatasetInfo(root, tuple(cases), label_map, channels, storage="zarr")


def _channels(image: zarr.Array) -> int:
    return 1 if image.ndim == 3 else int(image.shape[0])


def zarr_case_arrays(case: Case) -> tuple[Any, Any | None, np.ndarray]:
    """Image as [C, x, y, z], label [x, y, z] (or None) and affine of a Zarr dataset case.

    Raises:
        DataError: naming the array or group and the problem.
    """
    group_path = case.images[0].parent
    group = open_group(group_path)
    image = group["image"]
    if image.ndim not in (3, 4):
        raise DataError(f"{case.images[0]}: expected [C, x, y, z] or [x, y, z], got {image.shape}")
    image = ChannelAxis(image) if image.ndim == 3 else image
    label = None
    if case.label is not None:
        label = group["label"]
        if label.ndim == 4 and label.shape[0] == 1:
            label = _Squeezed(label)
        if tuple(label.shape) != tuple(image.shape[1:]):
            raise DataError(
                f"{case.label}: label shape {tuple(label.shape)} differs from the image shape "
                f"{tuple(image.shape[1:])}"
            )
        if not np.issubdtype(label.dtype, np.number):
            raise DataError(f"{case.label}: label dtype {label.dtype} is not numeric")
    return image, label, case_affine(group.attrs, group_path)


def case_affine(attrs: Mapping, source: Path) -> np.ndarray:
    """The case's affine from ``affine`` (4x4), else ``spacing`` (diagonal, origin 0)."""
    if "affine" in attrs:
        return check_affine(attrs["affine"], f"{source} (attribute 'affine')")
    spacing = attrs.get("spacing")
    if (
        not isinstance(spacing, list | tuple)
        or len(spacing) != 3
        or not all(isinstance(s, int | float) and s > 0 for s in spacing)
    ):
        raise DataError(
            f"{source}: needs an attribute 'spacing' (3 positive numbers, mm) or 'affine' "
            f"(4x4), got spacing={spacing!r}"
        )
    return np.diag([*map(float, spacing), 1.0])


class _Squeezed:
    """A [1, x, y, z] label seen as [x, y, z]."""

    def __init__(self, array: Any):
        self.array = array
        self.dtype = array.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self.array.chunks[1:])

    def __getitem__(self, key: tuple) -> np.ndarray:
        return np.asarray(self.array[(0, *key)])


def validate_zarr_cases(dataset: DatasetInfo, require_labels: bool = True) -> None:
    """Open every case's arrays and check shapes, channels and geometry attributes; label
    values are checked when the labels are scanned (:mod:`medseg.data.scan`)."""
    problems = []
    for case in dataset.cases:
        if case.label is None and require_labels:
            problems.append(f"{case.case_id}: {case.images[0].parent}: no 'label' array")
            continue
        try:
            image, _, affine = zarr_case_arrays(case)
        except DataError as error:
            problems.append(f"{case.case_id}: {error}")
            continue
        warn_implausible_spacing(str(case.images[0]), affine, image.shape[1:])
        if image.shape[0] != len(dataset.channels):
            problems.append(
                f"{case.case_id}: {case.images[0]}: has {image.shape[0]} channel(s), the "
                f"dataset declares {len(dataset.channels)}"
            )
    if problems:
        raise CaseValidationError(dataset.root, problems, len(dataset.cases))


def write_group_atomically(path: Path, fill: Callable[[zarr.Group], None]) -> None:
    """Build a group with ``fill`` in a hidden sibling folder, then rename it to ``path``
    (replacing what was there). On any error nothing is left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = hidden_sibling(path, "tmp")
    try:
        fill(zarr.open_group(str(staging), mode="w"))
        _replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_array_atomically(path: Path, data: np.ndarray, volume: bool = False) -> None:
    """Write one array next to others in a group, atomically; a ``volume`` (read box by
    box) as one raw chunk (see RawChunkVolume)."""
    staging = hidden_sibling(path, "tmp")
    options = raw_volume(data.shape) if volume else {}
    try:
        zarr.create_array(str(staging), data=data, **options)
        _replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def open_array(path: Path) -> zarr.Array:
    try:
        return zarr.open_array(str(path), mode="r")
    except Exception as error:  # zarr raises several types for missing or corrupt arrays
        raise DataError(f"{path}: cannot be read as a Zarr array ({error})") from error


def _replace(staging: Path, path: Path) -> None:
    """Rename ``staging`` to ``path``; an existing ``path`` is moved aside first and deleted
    after, so readers see either the old or the new content, never a mix."""
    aside = None
    if path.exists():
        aside = hidden_sibling(path, "old")
        try:
            path.rename(aside)
        except FileNotFoundError:  # removed concurrently
            aside = None
    try:
        staging.rename(path)
    except OSError:
        if not path.exists():
            raise
        # Another writer installed the same entry between our two renames: keep theirs.
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def write_volume(group: zarr.Group, image: np.ndarray, label: np.ndarray | None) -> None:
    """The cache's arrays: ``image`` [C, x, y, z] float32 and ``label`` [x, y, z] as the
    smallest integer type that holds its values, each one raw chunk (see RawChunkVolume)."""
    group.create_array("image", data=image.astype(np.float32), **raw_volume(image.shape))
    if label is not None:
        label = label.astype(np.uint8 if label.size == 0 or label.max() <= 255 else np.int32)
        group.create_array("label", data=label, **raw_volume(label.shape))


def raw_volume(shape: tuple[int, ...]) -> dict:
    """How the cache stores a volume: one uncompressed chunk, read by memory map."""
    return {"chunks": tuple(max(int(n), 1) for n in shape), "compressors": None}


class RawChunkVolume:
    """An uncompressed single-chunk Zarr array read through a memory map.

    zarr-python reads go through its asyncio event-loop thread: two thread hand-offs per
    read cost 1-5 ms on a busy CPU, more than copying a 64^3 patch. The cache stores each
    volume as one raw chunk (float32 CT or MRI compresses only 1.5-3x), whose file is the
    array in C order, so a patch read is a copy out of the page cache; volumes larger than
    memory work as any memory map does. Pickles as its path (DataLoader workers map it
    again) instead of as the data.
    """

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape = path, np.dtype(dtype), tuple(shape)
        self._map: np.memmap | None = None

    def __getitem__(self, key) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=self.dtype, mode="r", shape=self.shape)
        return self._map[key]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}


def open_volume(array: zarr.Array) -> zarr.Array | RawChunkVolume:
    """A memory map of ``array`` when it is one raw chunk on the local disk, else the array."""
    meta = array.metadata
    raw = (
        meta.zarr_format == 3
        and tuple(meta.chunk_grid.chunk_shape) == tuple(array.shape)
        and len(meta.codecs) == 1
        and isinstance(meta.codecs[0], BytesCodec)
        and (meta.codecs[0].endian is None or meta.codecs[0].endian.value == sys.byteorder)
        and isinstance(array.store, LocalStore)
    )
    if raw:
        key = meta.chunk_key_encoding.encode_chunk_key((0,) * array.ndim)
        path = Path(array.store.root) / array.path / key
        # A chunk equal to the fill value everywhere is not written: zarr reads it.
        if path.is_file():
            return RawChunkVolume(path, array.dtype, array.shape)
    return array


def write_arrays(group: zarr.Group, image: np.ndarray, label: np.ndarray | None) -> None:
    """``image`` and ``label`` in chunks of 64^3 voxels (all channels in each chunk)."""
    chunks = (image.shape[0], *(min(CHUNK, n) for n in image.shape[1:]))
    group.create_array("image", data=image, chunks=chunks)
    if label is not None:
        group.create_array("label", data=label, chunks=chunks[1:])


def write_index(group: zarr.Group, index: LabelIndex) -> None:
    locations = group.create_group("locations")
    for value, where in index.locations.items():
        locations.create_array(str(value), data=where.astype(np.int32))
    slices = group.create_group("foreground_slices")
    for axis, nonempty in enumerate(index.foreground_slices):
        slices.create_array(str(axis), data=nonempty)


def read_index(group: zarr.Group, counts: Mapping[str, int]) -> LabelIndex:
    locations = {int(v): np.asarray(group["locations"][v][:]) for v in counts}
    slices = tuple(np.asarray(group["foreground_slices"][str(a)][:]) for a in range(3))
    return LabelIndex({int(v): int(n) for v, n in counts.items()}, locations, slices)


def convert_to_zarr(dataset: DatasetInfo, out: Path, canonical: bool = True) -> Path:
    """Write a dataset of image files or DICOM folders as a Zarr dataset, one case at a time
    (raw intensities, reoriented to RAS when ``canonical``), read as ``dataset.reading``
    says. Cases already at ``out`` are replaced."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(str(out), mode="a")
    root.attrs.update(
        {
            "labels": {str(k): v for k, v in dataset.labels.items()},
            "channel_names": {str(i): c for i, c in enumerate(dataset.channels)},
        }
    )
    for case in dataset.cases:
        subject = case_to_subject(case, options=dataset.reading)
        subject.load()
        if dataset.reading.reorient_labels:
            reorient_labels(subject)
        if canonical:
            subject = tio.ToCanonical()(subject)
        label = subject["label"].data[0].numpy() if "label" in subject else None
        image = subject["image"].data.numpy()
        affine = subject["image"].affine

        def fill(group: zarr.Group, image=image, label=label, affine=affine) -> None:
            write_arrays(group, image, label)
            group.attrs["affine"] = np.asarray(affine).tolist()

        write_group_atomically(out / case.case_id, fill)
    return out
