"""Atomic file writing: a reader never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import nibabel as nib


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(handle)`` on a temporary file in the same folder, then rename it over `path`.

    The rename is atomic on POSIX file systems: if writing fails (a full disk, a crash, a
    kill), `path` keeps its previous content and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes atomically, as :func:`atomic_write`."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text (UTF-8) atomically, as :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode())


def atomic_save_nifti(image: nib.Nifti1Image, path: str | Path) -> Path:
    """Save a NIfTI image to a temporary file in the same folder, then rename it over `path`.

    The temporary name keeps the `.nii`/`.nii.gz` ending so nibabel picks the same format.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ending = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{ending}")
    try:
        nib.save(image, tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
