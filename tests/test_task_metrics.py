"""Task metrics: classification scores by hand, never-predicted classes, test summaries with
baselines, confusion-matrix images."""

import math

import numpy as np
import pytest
import torch

from medseg.task_metrics import (
    TaskMetrics,
    case_row,
    classification_scores,
    never_predicted,
    summarize_case_tasks,
)
from medseg.tasks import parse_task

LABELS = {0: "background", 1: "liver", 2: "lesion"}
COUNT = parse_task(
    {"name": "count", "type": "classification", "classes": ["none", "one", "several"]}, "t", LABELS
)
VOLUME = parse_task({"name": "volume", "type": "regression"}, "t", LABELS)


def one_hot(indices, k=3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(indices), k).float()


def test_classification_scores_by_hand():
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    predicted = [0, 1, 1, 1, 2, 2, 0]
    scores = classification_scores(one_hot(predicted), targets)
    assert scores["confusion_matrix"].tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    # F1 per class: 2tp / (2tp + fp + fn): none 2/4, one 4/5, several 4/5.
    assert scores["f1"].tolist() == pytest.approx([0.5, 0.8, 0.8])
    assert float(scores["f1_macro"]) == pytest.approx(0.7)
    # Balanced accuracy: mean recall 1/2, 2/2, 2/3.
    assert float(scores["balanced_accuracy"]) == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    assert scores["predicted_fraction"].tolist() == pytest.approx([2 / 7, 3 / 7, 2 / 7])
    # One-hot scores: AUROC of class c is (TPR + TNR) / 2.
    assert scores["auroc"][0] == pytest.approx((1 / 2 + 4 / 5) / 2)


def test_classes_absent_from_the_reference_are_left_out():
    # Class 'none' never occurs in the reference but is predicted once.
    scores = classification_scores(one_hot([0, 1, 2, 2]), torch.tensor([1, 1, 2, 2]))
    assert scores["f1"][0] == 0 and float(scores["f1_macro"]) == pytest.approx((0 + 2 / 3 + 1) / 3)
    assert float(scores["balanced_accuracy"]) == pytest.approx((0.5 + 1) / 2)
    assert math.isnan(scores["auroc"][0]) and not math.isnan(scores["auroc_macro"])


def test_task_metrics_and_never_predicted_classes():
    metrics = TaskMetrics(COUNT)
    for target in (0, 1, 2, 2):
        metrics.update(one_hot([2]), torch.tensor([target]))
    values = metrics.compute()
    assert float(values["predicted_several"]) == 1 and float(values["f1_several"]) == pytest.approx(
        2 / 3
    )
    assert never_predicted(COUNT, values) == ["none", "one"]
    assert metrics.confusion_matrix.tolist() == [[0, 0, 1], [0, 0, 1], [0, 0, 2]]
    regression = TaskMetrics(VOLUME)
    regression.update(torch.tensor([3.0]), torch.tensor([1.0]))
    regression.update(torch.tensor([1.0]), torch.tensor([2.0]))
    values = regression.compute()
    assert float(values["mae"]) == pytest.approx(1.5)
    assert float(values["rmse"]) == pytest.approx(math.sqrt(2.5))


def test_summary_compares_with_trivial_baselines():
    targets = [0, 1, 2, 2]
    probabilities = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.2, 0.2, 0.6]]
    volumes = [(50.0, 52.0), (80.0, 76.0), (65.0, 60.0), (90.0, 95.0)]
    rows = [
        case_row(COUNT, torch.tensor([p]), torch.tensor([t]))
        | case_row(VOLUME, torch.tensor([v]), torch.tensor([r]))
        for t, p, (r, v) in zip(targets, probabilities, volumes, strict=True)
    ]
    assert rows[0]["count/predicted"] == "none" and rows[0]["volume/abs_error"] == 2.0
    statistics = {"count": {"counts": [1, 2, 5]}, "volume": {"mean": 70.0, "std": 10.0}}
    summary = summarize_case_tasks(rows, [COUNT, VOLUME], statistics)
    assert summary["count"]["f1_macro"] == pytest.approx(1.0)
    assert summary["count"]["baseline"]["predicts"] == "several"
    # The majority class everywhere: F1 of 'several' 2/3, the other classes 0.
    assert summary["count"]["baseline"]["f1_macro"] == pytest.approx(2 / 9)
    assert summary["volume"]["mae"] == pytest.approx(np.mean([2, 4, 5, 5]))
    assert summary["volume"]["baseline"]["mae"] == pytest.approx(np.mean([20, 10, 5, 20]))
