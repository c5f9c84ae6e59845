"""An inter-process lock around work that several processes of one project folder share.

Parallel sweep jobs on one machine (or several users of one shared folder) generate the
phantom and prepare the cache of the same dataset: the lock makes the first one do the work
while the others wait, then find it done. ``fcntl.flock`` is released by the kernel when its
process ends, so a killed process never leaves a lock held. POSIX only, as the rest of the
toolchain (NCCL, SLURM).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)


def lock_path(path: Path) -> Path:
    """The lock file guarding ``path``: ``.<name>.lock`` beside it (outside it, so it never
    shows up in the folder it guards, which may not exist yet)."""
    return path.with_name(f".{path.name}.lock")


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold the lock guarding ``path`` (see :func:`lock_path`), waiting for any other
    process that holds it. The lock file is removed on release, so none is left lying
    around (one left by a killed process is taken over)."""
    lock = lock_path(Path(path))
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = _acquire(lock, path)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held: see _acquire
        handle.close()


def _acquire(lock: Path, path: Path) -> TextIO:
    """Lock the file ``lock``, retrying when the holder we waited for removed it on release
    (another process may then have created and locked a new one)."""
    while True:
        handle = lock.open("a")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process working on %s", path)
                fcntl.flock(handle, fcntl.LOCK_EX)
        except BaseException:
            handle.close()
            raise
        if _is_current_file(handle, lock):
            return handle
        handle.close()


def _is_current_file(handle: TextIO, lock: Path) -> bool:
    try:
        current = lock.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)
