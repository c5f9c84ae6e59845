"""Per-case metric tables (CSV), summaries (JSON) and their console rendering."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.utils.io import atomic_write_text


def write_case_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """One row per case, one column per metric (written atomically)."""
    if not rows:
        raise ValueError("no per-case results to write")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def summarize(rows: Sequence[dict], metric: str, class_names: Sequence[str]) -> dict[str, dict]:
    """Mean, std, median, min, max and count (NaN excluded) of `metric` per class."""
    summary = {}
    for name in class_names:
        values = np.array([row[f"{metric}_{name}"] for row in rows], dtype=float)
        valid = values[~np.isnan(values)]
        stats = {"n": int(valid.size)}
        for stat, fn in (
            ("mean", np.mean),
            ("std", np.std),
            ("median", np.median),
            ("min", np.min),
            ("max", np.max),
        ):
            stats[stat] = float(fn(valid)) if valid.size else math.nan
        summary[name] = stats
    return summary


def write_summary_json(summary: dict, path: str | Path) -> Path:
    # NaN is not JSON: write null for classes without a defined value.
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, float) and math.isnan(value):
            return None
        return value

    return atomic_write_text(path, json.dumps(clean(summary), indent=2) + "\n")
