"""Atomic file writing: a reader never sees a half-written file."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO


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


def atomic_save_files(saves: Mapping[Path, Callable[[Path], object]]) -> None:
    """Save several files all or none: ``saves`` maps each path to a writer called with a
    temporary path (for writers that open the file themselves: nibabel, SimpleITK).

    Each is saved to a temporary file beside its path (the name keeps the file's ending:
    ``.nii.gz``, ``.nrrd``, ..., so the writer picks the same format); only when every one is
    saved are they renamed into place. If anything fails (a full disk, a crash, a kill), none
    of them remains.
    """
    staged: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for path, save in saves.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            ending = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
            staged.append((path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{ending}"), path))
            save(staged[-1][0])
        for tmp, path in staged:
            tmp.replace(path)
            placed.append(path)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for path in placed:
            path.unlink(missing_ok=True)
        raise


def hidden_sibling(path: Path, kind: str) -> Path:
    """A unique hidden sibling of ``path`` for folder writes made atomic by renames:
    ``.<name>.tmp-<hex>`` (``kind="tmp"``, being built) or ``.<name>.old-<hex>``
    (``kind="old"``, the previous content set aside until the new one is in place)."""
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex}")


def remove_leftovers(folder: Path, name: str | None = None) -> list[Path]:
    """Delete the :func:`hidden_sibling` folders of ``name`` (of every name when None) that a
    killed writer left in ``folder``, and return them.

    Only call this while holding the lock every writer of ``folder`` holds: a running
    writer's staging folder looks the same as a dead one's.
    """
    stem = "*" if name is None else glob.escape(name)
    leftovers = [
        path
        for kind in ("tmp", "old")
        for path in sorted(Path(folder).glob(f".{stem}.{kind}-*"))
        if path.is_dir()
    ]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers
