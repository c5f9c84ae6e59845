"""Checkpoints users can trust.

- Written atomically (:class:`AtomicCheckpointIO`): a full disk or a kill while saving never
  corrupts the previous file.
- Self-describing: besides the weights and the module's hyperparameters (label map,
  preprocessing, network), a checkpoint carries the resolved run config (:class:`StoreRunConfig`).
- Loaded by :func:`load_checkpoint` only, with ``torch.load(weights_only=True)``: a checkpoint
  that holds a pickled Python object (which could run code while loading) is refused, and so
  is one whose hyperparameters name an object outside medseg's allowlist (`_target_` strings,
  see :mod:`medseg.trusted`), before anything is built from them.
- Checked against the config it is used with (:func:`check_compatible`): a mismatch names the
  config keys that differ.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from medseg.data.preprocess import preprocess_settings
from medseg.errors import ConfigError, DataError
from medseg.module import TARGET_HPARAMS, SegmentationModule
from medseg.stages import parse_stage
from medseg.trusted import find_untrusted
from medseg.utils.io import atomic_write

log = logging.getLogger(__name__)

# Checkpoint key of the resolved run config.
RUN_CONFIG_KEY = "medseg_config"
# torch.save writes zip archives; files of torch < 1.6 (legacy) are pickles (protocol >= 2).
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"
TAMPERED = "this checkpoint was not written by medseg or has been tampered with"

# Module hyperparameter -> the config key a user sets it with.
HPARAM_CONFIG_KEYS = {
    "network": "model",
    "in_channels": "data (image channels)",
    "stages": "stage.stages",
    "dataset_labels": "data.labels",
    "preprocess": "data.preprocess",
    "loss": "loss",
    "optimizer": "model.optimizer",
    "scheduler": "model.scheduler",
    "inference": "model.inference",
    "gradient_clip": "model.gradient_clip",
    "freeze_earlier": "stage.freeze_earlier",
    "finetune": "finetune",
}
# Hyperparameters that decide what the weights compute and which data they expect: a
# checkpoint that differs in these cannot be resumed or evaluated under the current config.
STRUCTURAL_HPARAMS = ("network", "in_channels", "stages", "dataset_labels", "preprocess")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to a temporary file beside the target, then renames it over the target.

    Lightning's own writer serializes to memory first, but then writes the target in place
    (or moves a file from the system temp folder, a copy across file systems), so running
    out of disk while writing ``last.ckpt`` destroys the previous ``last.ckpt``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options")
        atomic_write(path, lambda handle: torch.save(checkpoint, handle))


class StoreRunConfig(L.Callback):
    """Adds the resolved run config (plain containers) to every checkpoint."""

    def __init__(self, config: Mapping[str, Any]):
        self.config = dict(config)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[RUN_CONFIG_KEY] = self.config


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU with ``weights_only=True``; every medseg caller uses this.

    Raises:
        DataError: the file is missing, not a PyTorch checkpoint, unreadable, holds pickled
            Python objects, or has hyperparameters naming objects medseg does not build.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"ckpt_path: checkpoint {path} does not exist")
    not_torch = _not_a_torch_file(path)
    if not_torch:
        raise DataError(f"{path}: not a PyTorch checkpoint ({not_torch})")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found is None:
            raise DataError(f"{path}: not a readable PyTorch checkpoint: {error}") from None
        raise DataError(
            f"{path}: refused to load: the checkpoint contains a pickled Python object "
            f"({found.group(1)}) that could run code while loading. medseg only loads "
            "checkpoints made of tensors and plain containers (torch.load with "
            f"weights_only=True); {TAMPERED}."
        ) from None
    except Exception as error:  # torch raises OSError, KeyError, RuntimeError... on bad files
        raise DataError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{type(error).__name__}: {error}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise DataError(f"{path}: not a medseg checkpoint (a {type(checkpoint).__name__})")
    missing = {"state_dict", "hyper_parameters"} - set(checkpoint)
    if missing:
        raise DataError(f"{path}: not a medseg checkpoint (no {', '.join(sorted(missing))})")
    if not isinstance(checkpoint["hyper_parameters"], dict):
        raise DataError(f"{path}: not a medseg checkpoint (hyper_parameters is not a mapping)")
    refusal = find_untrusted(checkpoint["hyper_parameters"], TARGET_HPARAMS)
    if refusal is not None:
        raise DataError(
            f"{path}: refused: hyper_parameters.{refusal.key} is {refusal.value!r}, which is "
            f"{refusal.problem}; {TAMPERED}"
        )
    return checkpoint


def _not_a_torch_file(path: Path) -> str | None:
    """What `path` is when it cannot be a ``torch.save`` file (None when it may be one).

    torch has no public test for this; its own (``torch.serialization._is_zipfile``) reads
    the same magic bytes. Without it, ``torch.load`` on a text file fails inside the
    unpickler, which reads like a refused pickled object rather than a wrong file.
    """
    if path.is_dir():
        return "a folder"
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError as error:
        return f"cannot be read: {error.strerror or error}"
    if not head:
        return "an empty file"
    if head.startswith(ZIP_MAGIC) or head[:1] == PICKLE_PROTO:
        return None
    return f"it starts with {head!r}, where torch.save files start a zip archive or a pickle"


def load_module(path: str | Path) -> SegmentationModule:
    """The trained module of a checkpoint file, on the CPU, in eval mode."""
    checkpoint = load_checkpoint(path)
    module = SegmentationModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def check_compatible(
    checkpoint: Mapping[str, Any], current: Mapping[str, Any], path: str | Path
) -> None:
    """Compare a checkpoint's hyperparameters with those the current config gives.

    Only the hyperparameters in `current` are compared. A difference in a structural one
    (network, channels, classes, labels, preprocessing) raises a ConfigError naming every
    differing config key; other differences (loss, optimizer, ...) are logged as warnings.
    """
    saved = dict(checkpoint["hyper_parameters"])
    current = dict(current)
    for hparams in (saved, current):
        if "preprocess" in hparams:
            # Preprocessing settings added since the checkpoint was written take their defaults.
            hparams["preprocess"] = preprocess_settings(hparams["preprocess"])
    if "stages" in saved:
        # Stage settings added since the checkpoint was written take their defaults.
        labels = saved.get("dataset_labels", {})
        saved["stages"] = [
            parse_stage(s, i, labels).as_dict() for i, s in enumerate(saved["stages"])
        ]
    structural, other = [], []
    for name, value in current.items():
        for leaf, theirs, mine in _leaf_differences(saved.get(name), value, ""):
            line = f"{_config_key(name, leaf)}: checkpoint has {theirs!r}, config has {mine!r}"
            (structural if name in STRUCTURAL_HPARAMS else other).append(line)
    if structural:
        raise ConfigError(
            f"checkpoint {path} was trained with a different config:\n  " + "\n  ".join(structural)
        )
    for line in other:
        log.warning("checkpoint and config differ: %s", line)


def _config_key(hparam: str, leaf: str) -> str:
    if (hparam, leaf) == ("inference", "window"):
        return "data.patch_size"
    base = HPARAM_CONFIG_KEYS.get(hparam, hparam)
    return f"{base}.{leaf}" if leaf else base


def _leaf_differences(saved: Any, current: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved, current) for every leaf where two nested containers differ."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        pairs = [(k, saved.get(k), current.get(k)) for k in dict.fromkeys([*saved, *current])]
    elif isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        pairs = list(zip(range(len(saved)), saved, current, strict=True))
    else:
        return [] if saved == current else [(prefix, saved, current)]
    return [
        difference
        for key, theirs, mine in pairs
        for difference in _leaf_differences(theirs, mine, f"{prefix}.{key}" if prefix else str(key))
    ]
