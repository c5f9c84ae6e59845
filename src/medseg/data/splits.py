"""Deterministic train / validation / test splits with k-fold cross-validation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medseg.errors import ConfigError


@dataclass(frozen=True)
class Split:
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def split_cases(
    case_ids: Sequence[str],
    test_fraction: float = 0.2,
    num_folds: int = 5,
    fold: int = 0,
    seed: int = 0,
) -> Split:
    """Hold out a test set, then pick fold `fold` of a k-fold split of the rest for validation.

    The test set does not depend on the fold, so every fold is evaluated on the same held-out
    cases. The result depends only on the set of ids and the seed, not on their order.
    """
    if not 0 <= test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be in [0, 1), got {test_fraction}")
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ConfigError(f"data.num_folds must be an integer >= 2, got {num_folds!r}")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < num_folds:
        raise ConfigError(f"data.fold must be an integer in [0, {num_folds}), got {fold!r}")
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ConfigError("case ids are not unique")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    num_test = round(len(ids) * test_fraction)
    if test_fraction > 0:
        num_test = max(num_test, 1)
    test, rest = order[:num_test], order[num_test:]
    if len(rest) < num_folds:
        raise ConfigError(
            f"data.num_folds={num_folds} needs at least {num_folds} cases outside the test "
            f"set, but only {len(rest)} of {len(ids)} remain; lower data.num_folds or "
            "data.test_fraction"
        )
    folds = np.array_split(np.array(rest, dtype=object), num_folds)
    val = [str(c) for c in folds[fold]]
    train = [c for c in rest if c not in set(val)]
    return Split(tuple(sorted(train)), tuple(sorted(val)), tuple(sorted(test)))
