"""Pictures are written as valid PNGs of the expected layout."""

import csv

import numpy as np
from PIL import Image

from medseg import plots


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_overlay_shows_three_planes_at_the_structures_centre(tmp_path):
    image = np.random.default_rng(0).normal(size=(20, 16, 8)).astype(np.float32)
    reference = np.zeros((20, 16, 8), dtype=np.uint8)
    reference[12:16, 4:8, 5:7] = 2
    figure = plots.case_overlay(image, reference, reference, (1.0, 1.0, 3.0), title="case")
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == [
        "reference, axial 6",
        "reference, coronal 6",
        "reference, sagittal 14",
        "prediction, axial 6",
        "prediction, coronal 6",
        "prediction, sagittal 14",
    ]
    # The coronal plane is drawn 3x as tall per voxel as wide (3 mm slices, 1 mm pixels).
    assert figure.axes[1].get_aspect() == 3.0
    width, height = png_size(plots.save_figure(figure, tmp_path / "overlay.png"))
    assert (width, height) == (900, 600)


def test_training_curves_average_steps_per_epoch(tmp_path):
    path = tmp_path / "metrics.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", "train/loss", "val/loss", "val/dice_liver"])
        writer.writerows(
            [[0, 1, 2.0, "", ""], [0, 2, 1.0, "", ""], [0, 2, "", 1.2, 0.5], [1, 3, 0.5, "", ""]]
        )
    figure = plots.training_curves(path)
    loss, dice = figure.axes
    train = next(line for line in loss.get_lines() if line.get_label() == "train/loss")
    assert list(train.get_xdata()) == [0, 1] and list(train.get_ydata()) == [1.5, 0.5]
    assert [line.get_label() for line in dice.get_lines()] == ["val/dice_liver"]


def test_confusion_matrix_rows_are_normalized():
    counts = np.array([[90, 10], [5, 15]])
    figure = plots.confusion_matrix(counts, ["background", "liver"])
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert texts == ["0.900\n90", "0.100\n10", "0.250\n5", "0.750\n15"]
