"""Pictures with matplotlib's Agg canvas (no screen, no pyplot state): overlays of image,
reference and prediction in three planes, metric box plots, confusion matrices, training
curves, and GIFs through the slices of a case.

Volumes are taken in RAS voxel order (x: left->right, y: posterior->anterior, z: inferior->
superior) with their spacing, so every plane is drawn with the right aspect ratio.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from medseg.data.image_io import open_as_nifti
from medseg.utils.io import atomic_write_bytes

# Label value v > 0 is drawn in colour (v - 1) % 10 of matplotlib's tab10.
LABEL_COLORS = "tab10"
PLANES = ("axial", "coronal", "sagittal")


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write a figure as PNG, atomically."""
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def figure_rgb(figure: Figure) -> np.ndarray:
    """The rendered figure as uint8 [H, W, 3] (for TensorBoard and GIF frames)."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _plane(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """A 2D slice, transposed so that rows run along the second axis of the plane."""
    if plane == "axial":
        return volume[:, :, index].T
    if plane == "coronal":
        return volume[:, index, :].T
    return volume[index, :, :].T


def _aspect(spacing: Sequence[float], plane: str) -> float:
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[plane]


def _centre(*masks: np.ndarray) -> tuple[int, int, int]:
    """Centre of the foreground of the masks (of the volume when they are empty)."""
    union = np.logical_or.reduce([m > 0 for m in masks])
    points = np.argwhere(union)
    if not len(points):
        return tuple(s // 2 for s in union.shape)
    return tuple(int(v) for v in np.round(points.mean(0)))


def _draw(axis, image: np.ndarray, labels: np.ndarray | None, aspect: float, window) -> None:
    axis.imshow(image, cmap="gray", origin="lower", aspect=aspect, vmin=window[0], vmax=window[1])
    if labels is not None and labels.any():
        colours = np.ma.masked_equal(labels, 0)
        axis.imshow(
            (colours - 1) % 10,
            cmap=LABEL_COLORS,
            vmin=0,
            vmax=9,
            alpha=0.45,
            origin="lower",
            aspect=aspect,
            interpolation="nearest",
        )
    axis.set_axis_off()


def _window(image: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(image, [1, 99])
    return float(low), float(max(high, low + 1e-6))


def case_overlay(
    image: np.ndarray,
    reference: np.ndarray | None,
    prediction: np.ndarray,
    spacing: Sequence[float],
    title: str = "",
    centre: Sequence[int] | None = None,
) -> Figure:
    """Three planes through the structures: the reference on top, the prediction below."""
    centre = centre or _centre(prediction, *([reference] if reference is not None else []))
    rows = (
        [("reference", reference), ("prediction", prediction)]
        if reference is not None
        else [("prediction", prediction)]
    )
    figure = Figure(figsize=(9, 3 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), 3, squeeze=False)
    window = _window(image)
    for row, (name, labels) in enumerate(rows):
        for column, plane in enumerate(PLANES):
            index = centre[{"axial": 2, "coronal": 1, "sagittal": 0}[plane]]
            _draw(
                axes[row, column],
                _plane(image, plane, index),
                _plane(labels, plane, index),
                _aspect(spacing, plane),
                window,
            )
            axes[row, column].set_title(f"{name}, {plane} {index}", fontsize=9)
    if title:
        figure.suptitle(title)
    return figure


def _canonical(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    image = nib.as_closest_canonical(open_as_nifti(path))
    data = np.asanyarray(image.dataobj)
    return (data[..., 0] if data.ndim == 4 else data), tuple(image.header.get_zooms()[:3])


def case_overlay_from_files(image: Path, reference: Path, prediction: Path) -> Figure:
    """:func:`case_overlay` of files (any orientation; the first channel of the image)."""
    pixels, spacing = _canonical(image)
    reference_data, _ = _canonical(reference)
    prediction_data, _ = _canonical(prediction)
    return case_overlay(
        pixels.astype(np.float32), reference_data, prediction_data, spacing, title=prediction.name
    )


def slice_gif(
    image: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: Sequence[float],
    path: str | Path,
    title: str = "",
) -> Path:
    """An animated GIF through the axial slices: reference left, prediction right."""
    window = _window(image)
    aspect = _aspect(spacing, "axial")
    frames = []
    for index in range(image.shape[2]):
        figure = Figure(figsize=(6, 3.2), layout="constrained")
        axes = figure.subplots(1, 2)
        for axis, (name, labels) in zip(
            axes, (("reference", reference), ("prediction", prediction)), strict=True
        ):
            _draw(
                axis, _plane(image, "axial", index), _plane(labels, "axial", index), aspect, window
            )
            axis.set_title(f"{name}, axial {index}", fontsize=9)
        if title:
            figure.suptitle(title, fontsize=10)
        frames.append(Image.fromarray(figure_rgb(figure)))
    buffer = io.BytesIO()
    frames[0].save(
        buffer, format="GIF", save_all=True, append_images=frames[1:], duration=120, loop=0
    )
    return atomic_write_bytes(path, buffer.getvalue())


def metric_boxplots(
    rows: Sequence[dict], metrics: Sequence[str], class_names: Sequence[str]
) -> Figure:
    """One panel per metric, one box per class (undefined values left out)."""
    columns = min(3, len(metrics))
    figure = Figure(
        figsize=(4 * columns, 3.2 * math.ceil(len(metrics) / columns)), layout="constrained"
    )
    axes = np.atleast_1d(figure.subplots(math.ceil(len(metrics) / columns), columns)).ravel()
    for axis, metric in zip(axes, metrics, strict=False):
        values = [
            [row[f"{metric}_{name}"] for row in rows if not math.isnan(row[f"{metric}_{name}"])]
            for name in class_names
        ]
        axis.boxplot(values, tick_labels=list(class_names))
        axis.set_title(metric)
        axis.grid(axis="y", alpha=0.3)
    for axis in axes[len(metrics) :]:
        axis.set_axis_off()
    return figure


def confusion_matrix(
    counts: np.ndarray, class_names: Sequence[str], unit: str = "voxels"
) -> Figure:
    """Confusion matrix of `unit` (voxels, or cases for a classification task), each
    reference row normalized to 1, with the counts."""
    totals = counts.sum(1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    size = 1.2 + 0.9 * len(class_names)
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    axis = figure.subplots()
    shown = axis.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(shown, ax=axis, label=f"fraction of reference {unit}")
    ticks = range(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=45, ha="right")
    axis.set_yticks(ticks, class_names)
    axis.set_xlabel("prediction")
    axis.set_ylabel("reference")
    for (i, j), value in np.ndenumerate(fractions):
        colour = "white" if value > 0.5 else "black"
        axis.text(
            j,
            i,
            f"{value:.3f}\n{counts[i, j]:,}",
            ha="center",
            va="center",
            fontsize=7,
            color=colour,
        )
    return figure


def training_curves(metrics_csv: str | Path) -> Figure:
    """Losses and validation Dice per epoch from a run's ``csv/metrics.csv`` (CSVLogger)."""
    with Path(metrics_csv).open() as handle:
        records = list(csv.DictReader(handle))
    series: dict[str, dict[int, list[float]]] = {}
    for record in records:
        if not record.get("epoch"):
            continue
        epoch = int(float(record["epoch"]))
        for key, value in record.items():
            if key in ("epoch", "step") or value in ("", None):
                continue
            series.setdefault(key, {}).setdefault(epoch, []).append(float(value))
    panels = {
        "loss": sorted(k for k in series if k.endswith("/loss")),
        "validation Dice": sorted(k for k in series if k.startswith("val/dice_")),
    }
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    for axis, (title, keys) in zip(figure.subplots(1, 2), panels.items(), strict=True):
        for key in keys:
            epochs = sorted(series[key])
            axis.plot(epochs, [np.mean(series[key][e]) for e in epochs], marker="o", label=key)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if keys:
            axis.legend(fontsize=8)
    return figure
