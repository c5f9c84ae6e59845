"""Score label-map files against reference files in their own geometry, and write the reports.

Both `python src/eval.py` modes (a checkpoint on a test split, or a folder of predictions
against a folder of labels) and the test report of a training run end here, so their
numbers and files are the same.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg import plots
from medseg.data.alignment import grid_difference, reorient_to_grid
from medseg.data.cases import group_case_files
from medseg.data.image_io import open_as_nifti
from medseg.errors import DataError
from medseg.metrics import METRICS, case_metrics
from medseg.reports import summarize, write_case_csv, write_summary_json
from medseg.utils.failures import case_failure
from medseg.utils.rich_utils import print_summary_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringPair:
    """A case's predicted label map, its reference, and optionally its image (for pictures)."""

    case_id: str
    prediction: Path
    reference: Path
    image: Path | None = None
    # (value, mask file): background voxels of the reference inside the mask get `value`
    label_masks: tuple[tuple[int, Path], ...] = ()


@dataclass
class Evaluation:
    """Per-case rows and the voxel confusion matrix (reference rows, prediction columns) of
    the cases scored, and one line per case that could not be scored."""

    rows: list[dict]
    confusion: np.ndarray
    class_names: list[str]
    failures: list[str] = field(default_factory=list)

    def summary(self, metric: str) -> dict[str, dict]:
        return summarize(self.rows, metric, self.class_names[1:])

    def mean_metrics(self, prefix: str) -> dict[str, float]:
        """``<prefix>/<metric>_<class>`` means and ``<prefix>/dice_mean``, as logged."""
        means = {}
        for metric in METRICS:
            for name, stats in self.summary(metric).items():
                means[f"{prefix}/{metric}_{name}"] = stats["mean"]
        dice = [s["mean"] for s in self.summary("dice").values() if not math.isnan(s["mean"])]
        means[f"{prefix}/dice_mean"] = float(np.mean(dice)) if dice else math.nan
        return means


def class_lut(value_to_class: Mapping[int, int]) -> np.ndarray:
    """Label value -> class index as a lookup array (0 for values not in the map)."""
    lut = np.zeros(max(value_to_class) + 1, dtype=np.int64)
    for value, index in value_to_class.items():
        lut[value] = index
    return lut


def _read_labels(path: Path, what: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    try:
        image = open_as_nifti(path)
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for unreadable files
        raise DataError(
            f"{path}: cannot read the {what} ({type(error).__name__}: {error})"
        ) from error
    return (data[..., 0] if data.ndim == 4 and data.shape[3] == 1 else data), image


def _to_classes(data: np.ndarray, lut: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Label values -> class indices; a label map must hold finite integer values in the map."""
    if data.dtype.kind == "f":
        nonfinite = int(np.count_nonzero(~np.isfinite(data)))
        if nonfinite:
            raise DataError(f"{path}: {what} has {nonfinite} non-finite voxels (NaN/Inf)")
    values = np.unique(data)
    fractional = values[values != np.round(values)]
    if fractional.size:
        raise DataError(
            f"{path}: {what} has non-integer values (e.g. {fractional[0]:g}); "
            "a label map must hold integer label values"
        )
    unknown = [v for v in values.tolist() if not 0 <= v < len(lut)]
    if unknown:
        raise DataError(
            f"{path}: {what} has label values {unknown[:10]} outside the label map "
            f"(0..{len(lut) - 1})"
        )
    return lut[data.astype(np.int64)]


def score_pairs(
    pairs: Sequence[ScoringPair],
    class_names: Sequence[str],
    value_to_class: Mapping[int, int],
    tolerance_mm: float = 2.0,
    reorient_labels: bool = False,
) -> Evaluation:
    """Score every pair on the prediction's voxel grid (the reference's), in mm.

    A pair that cannot be scored (a file that cannot be read, NaN or non-integer values,
    values outside the label map, different grids, anything else it raises) is listed in
    the result's ``failures``, one line each, and the others are scored.

    Args:
        pairs: prediction and reference files per case (same shape and affine).
        class_names: names of the classes scored, background first.
        value_to_class: every dataset label value -> its class index.
        tolerance_mm: NSD tolerance.
        reorient_labels: a reference (or merged mask) on the prediction's grid with flipped
            or permuted axes is reoriented onto it (else it is an error saying so).
    """
    lut = class_lut(value_to_class)
    class_names = list(class_names)
    evaluation = Evaluation([], np.zeros((len(class_names),) * 2, dtype=np.int64), class_names)
    for pair in pairs:
        try:
            row, pair_confusion = _score_pair(pair, lut, class_names, tolerance_mm, reorient_labels)
        except Exception as error:
            files = f"{pair.prediction} (reference {pair.reference})"
            evaluation.failures.append(case_failure(error, files, "scored"))
        else:
            evaluation.rows.append(row)
            evaluation.confusion += pair_confusion
    return evaluation


def _score_pair(
    pair: ScoringPair,
    lut: np.ndarray,
    class_names: list[str],
    tolerance_mm: float,
    reorient_labels: bool,
) -> tuple[dict, np.ndarray]:
    """The metrics row of one pair and its voxel confusion matrix."""
    prediction, pred_image = _read_labels(pair.prediction, "prediction")
    grid = (pair.prediction, pred_image)
    reference = _on_grid(pair.reference, "reference", grid, reorient_labels)
    for value, mask_path in pair.label_masks:  # as the training data merges them
        mask = _on_grid(mask_path, "merged mask", grid, reorient_labels)
        reference = np.where((reference == 0) & (mask != 0), value, reference)
    reference = _to_classes(reference, lut, pair.reference, "reference")
    prediction = _to_classes(prediction, lut, pair.prediction, "prediction")
    spacing = nib.affines.voxel_sizes(pred_image.affine)
    row = {"case_id": pair.case_id}
    row |= case_metrics(prediction, reference, class_names, spacing, tolerance_mm)
    size = len(class_names)
    flat = reference.ravel() * size + prediction.ravel()
    return row, np.bincount(flat, minlength=size * size).reshape(size, size)


def _on_grid(
    path: Path, what: str, grid: tuple[Path, nib.Nifti1Image], reorient: bool
) -> np.ndarray:
    """A reference label map's data on the voxel grid of the prediction (file, image).

    Raises:
        DataError: naming both files and how the prediction's grid differs (with the option
            to set when they hold the same voxel centres with flipped or permuted axes).
    """
    data, image = _read_labels(path, what)
    prediction_path, prediction = grid
    shape = prediction.shape[:3]
    difference = grid_difference(shape, prediction.affine, data.shape, image.affine)
    if difference is None:
        return data
    if difference.same_world_grid and reorient:
        return reorient_to_grid(data, image.affine, shape, prediction.affine)
    hint = (
        f": set evaluation.reorient_labels=true to reorient the {what} onto the prediction grid"
        if difference.same_world_grid
        else ""
    )
    raise DataError(
        f"{prediction_path}: prediction grid differs from the {what} {path}: {difference}{hint}"
    )


def pair_folders(
    prediction_dir: str | Path, label_dir: str | Path, image_dir: str | Path | None = None
) -> list[ScoringPair]:
    """Match ``<case>.<ending>`` predictions to labels (and images) by case id (any image
    format of :mod:`medseg.data.formats`).

    Every label needs a prediction; predictions without a label are ignored with a warning.
    """
    prediction_dir, label_dir = Path(prediction_dir), Path(label_dir)
    for key, folder in (("pred_dir", prediction_dir), ("label_dir", label_dir)):
        if not folder.is_dir():
            raise DataError(f"{key}: folder {folder} does not exist")
    predictions = _single_files(prediction_dir)
    references = _single_files(label_dir)
    images = group_case_files(Path(image_dir).iterdir()) if image_dir else {}
    if not references:
        raise DataError(f"label_dir: no label maps in {label_dir} (NIfTI, NRRD, MetaImage)")
    missing = sorted(set(references) - set(predictions))
    if missing:
        raise DataError(
            f"pred_dir: {len(missing)} case(s) of {label_dir} have no prediction in "
            f"{prediction_dir}: {', '.join(missing)}"
        )
    extra = sorted(set(predictions) - set(references))
    if extra:
        log.warning("ignoring %d prediction(s) without a label: %s", len(extra), extra)
    return [
        ScoringPair(case_id, predictions[case_id], reference, images.get(case_id, [None])[0])
        for case_id, reference in references.items()
    ]


def _single_files(folder: Path) -> dict[str, Path]:
    return {case_id: files[0] for case_id, files in group_case_files(folder.iterdir()).items()}


def write_reports(
    evaluation: Evaluation,
    pairs: Sequence[ScoringPair],
    output_dir: str | Path,
    split: str,
    details: Mapping,
    worst_cases: int = 3,
) -> dict[str, float]:
    """CSV, JSON summary, console table and pictures; returns the means as logged metrics.

    Writes ``<split>_metrics.csv`` (one row per scored case), ``<split>_summary.json``
    (statistics per metric and class, the confusion matrix, `details`, and the cases that
    could not be scored as ``failures``), and under ``plots/``:
    metric box plots, the confusion matrix and overlays of the `worst_cases` cases with the
    lowest mean Dice (for cases whose image is known).
    """
    output_dir = Path(output_dir)
    rows = evaluation.rows
    csv_path = write_case_csv(rows, output_dir / f"{split}_metrics.csv")
    metrics = evaluation.mean_metrics(split)
    summary = {
        **details,
        "split": split,
        "num_cases": len(rows),
        "cases": [row["case_id"] for row in rows],
        **{metric: evaluation.summary(metric) for metric in METRICS},
        "dice_mean": metrics[f"{split}/dice_mean"],
        "confusion_matrix": {
            "classes": evaluation.class_names,
            "rows": "reference",
            "columns": "prediction",
            "voxels": evaluation.confusion.tolist(),
        },
        "failures": evaluation.failures,
    }
    json_path = write_summary_json(summary, output_dir / f"{split}_summary.json")
    print_summary_table(
        f"{split}: mean ± std over {len(rows)} cases (distances in mm)",
        {metric: evaluation.summary(metric) for metric in METRICS},
    )
    plot_dir = output_dir / "plots"
    names = evaluation.class_names[1:]
    plots.save_figure(plots.metric_boxplots(rows, METRICS, names), plot_dir / "metrics.png")
    plots.save_figure(
        plots.confusion_matrix(evaluation.confusion, evaluation.class_names),
        plot_dir / "confusion_matrix.png",
    )
    for pair in _worst(evaluation, pairs, worst_cases):
        figure = plots.case_overlay_from_files(pair.image, pair.reference, pair.prediction)
        plots.save_figure(figure, plot_dir / f"worst_{pair.case_id}.png")
    log.info("per-case metrics: %s; summary: %s; pictures: %s", csv_path, json_path, plot_dir)
    return metrics


def _worst(evaluation: Evaluation, pairs: Sequence[ScoringPair], count: int) -> list[ScoringPair]:
    """The `count` pairs with an image and the lowest mean Dice (undefined Dice ranks last)."""
    by_case = {pair.case_id: pair for pair in pairs if pair.image is not None}
    names = evaluation.class_names[1:]

    def mean_dice(row: dict) -> float:
        values = [row[f"dice_{n}"] for n in names if not math.isnan(row[f"dice_{n}"])]
        return float(np.mean(values)) if values else math.inf

    ranked = sorted((r for r in evaluation.rows if r["case_id"] in by_case), key=mean_dice)
    return [by_case[row["case_id"]] for row in ranked[:count]]
