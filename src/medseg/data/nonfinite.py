"""The policy for non-finite image voxels (NaN, +Inf, -Inf), decided once and applied alike in
data preparation (NIfTI/DICOM volumes, Zarr datasets read slab by slab) and in prediction.

A NaN voxel spreads: resampling smears it over its neighbours, a z-score over the image
turns every voxel into NaN, and a network fed NaN predicts background everywhere. So
non-finite voxels are either refused (``error``, the default: the file is named with how
many it holds) or replaced by a stated value (``replace``) before anything else reads them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from medseg.errors import ConfigError, DataError

NONFINITE_MODES = ("error", "replace")


def nonfinite_counts(data: np.ndarray) -> np.ndarray:
    """[NaN, +Inf, -Inf] voxel counts of an array (int64 [3]; zeros for integer arrays)."""
    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.floating) or np.isfinite(data).all():
        return np.zeros(3, dtype=np.int64)
    return np.array(
        [np.isnan(data).sum(), np.isposinf(data).sum(), np.isneginf(data).sum()], dtype=np.int64
    )


@dataclass(frozen=True)
class NonFinitePolicy:
    """``error``: refuse an image holding non-finite voxels; ``replace``: set them to ``value``.

    ``key`` is where users set the policy (``data.preprocess`` for training,
    ``prediction`` for predict and eval), named in every message.
    """

    mode: str = "error"
    value: float | None = None
    key: str = "data.preprocess"

    @classmethod
    def from_config(
        cls, mode: str = "error", value: float | None = None, key: str = "data.preprocess"
    ) -> NonFinitePolicy:
        if mode not in NONFINITE_MODES:
            raise ConfigError(
                f"{key}.nonfinite must be one of {list(NONFINITE_MODES)}, got {mode!r}"
            )
        if mode == "error":
            if value is not None:
                raise ConfigError(
                    f"{key}.nonfinite_value={value!r} is only used with {key}.nonfinite=replace"
                )
            return cls(mode, None, key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise ConfigError(
                f"{key}.nonfinite=replace needs {key}.nonfinite_value: the finite number that "
                f"replaces NaN/Inf voxels (e.g. -1024 for CT), got {value!r}"
            )
        return cls(mode, float(value), key)

    def replace(self, data: np.ndarray) -> np.ndarray:
        """``data`` with its non-finite voxels set to the value (replace mode); else as it is."""
        if self.mode != "replace" or not np.issubdtype(data.dtype, np.floating):
            return data
        finite = np.isfinite(data)
        return data if finite.all() else np.where(finite, data, data.dtype.type(self.value))

    def check(self, counts: np.ndarray, source: str) -> None:
        """Raise a DataError naming ``source`` when it holds non-finite voxels (error mode)."""
        if self.mode == "replace" or not counts.any():
            return
        named = zip(counts.tolist(), ("NaN", "+Inf", "-Inf"), strict=True)
        kinds = ", ".join(f"{n} {kind}" for n, kind in named if n)
        raise DataError(
            f"{source}: {int(counts.sum())} non-finite voxel(s) ({kinds}); set "
            f"{self.key}.nonfinite=replace with {self.key}.nonfinite_value=<number> to "
            "replace them"
        )

    def screen_blocks(self, blocks: Iterable[np.ndarray], source: str) -> Iterator[np.ndarray]:
        """Blocks of one image (read slab by slab), replaced; in error mode the DataError comes
        after the last block, so it counts the whole image."""
        counts = np.zeros(3, dtype=np.int64)
        for block in blocks:
            counts += nonfinite_counts(block)
            yield self.replace(block)
        self.check(counts, source)
