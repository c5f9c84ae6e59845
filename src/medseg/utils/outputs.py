"""Every folder a run writes to is checked before any work starts, so a read-only folder or a
path through a file is one clear error instead of a traceback after the first case."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from medseg.errors import ConfigError
from medseg.utils.rich_utils import print_error


def check_writable_folder(key: str, path: str | Path) -> None:
    """Raise ConfigError naming `key` and `path` unless files can be created in `path` (an
    existing folder, or one that can be created).

    Checked without creating anything: the nearest existing folder on the path must be a
    folder the process may write to (``os.access``, which also sees read-only file systems).
    """
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}: {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {path} cannot be written: {existing} is not writable")


def check_output_folders(cfg: DictConfig, keys: Sequence[str]) -> None:
    """:func:`check_writable_folder` for the folders the config keys name (null: unused)."""
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is not None:
            check_writable_folder(key, str(value))


class RunFolderCheck(Callback):
    """Hydra callback: check the run (or sweep) folder before Hydra creates it and opens its
    log file there, which would otherwise fail with a traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_or_exit(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_or_exit(config, "hydra.sweep.dir")


def _check_or_exit(config: DictConfig, key: str) -> None:
    try:
        check_output_folders(config, [key])
    except ConfigError as error:
        print_error(f"{error} (the run folder: set paths.log_dir or {key})")
        sys.exit(1)  # Hydra would print a traceback for an exception
