"""Metrics of tasks, logged as ``<split>/<task>/<metric>[_<class>]``, and their test summary.

- segmentation: ``dice_<class>``, ``dice_mean``;
- voxel_regression: ``mae``, ``rmse`` (mm, over every voxel);
- classification: ``f1_macro``, ``f1_<class>``, ``balanced_accuracy``, ``auroc`` (macro,
  one class against the rest), ``predicted_<class>`` (fraction of cases predicted as it),
  and a confusion matrix (rows: reference, columns: prediction);
- regression: ``mae``, ``rmse`` in the target's units.

Classification scores are computed from the confusion matrix by hand: torchmetrics' macro
recall counts a class that is predicted but absent from the reference as 0 (balanced
accuracy averages over the reference's classes only), and its AUROC gives 0 for a class
without positives; here such classes are left out, as scikit-learn does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.segmentation import DiceScore
from torchmetrics.utilities import dim_zero_cat

from medseg.tasks import TaskSpec


def dice_metric(num_classes: int) -> DiceScore:
    """Dice per foreground class of index label maps, accumulated over volumes."""
    return DiceScore(
        num_classes=num_classes, include_background=False, average="none", input_format="index"
    )


def classification_scores(
    probabilities: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Scores of case probabilities [N, K] against class indices [N].

    Returns ``confusion_matrix`` [K, K] (rows: reference), ``f1`` [K] (NaN for a class
    neither in the reference nor predicted), ``f1_macro``, ``balanced_accuracy`` (mean recall
    over the reference's classes), ``auroc`` [K] (NaN for a class that is all or none of the
    reference), its mean ``auroc_macro``, and ``predicted_fraction`` [K].
    """
    num_classes = probabilities.shape[1]
    targets = targets.long()
    predicted = probabilities.argmax(1)
    confusion = torch.bincount(targets * num_classes + predicted, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    true_positives = confusion.diag().double()
    support = confusion.sum(1).double()
    predicted_counts = confusion.sum(0).double()
    f1 = 2 * true_positives / (support + predicted_counts)  # NaN where both are 0
    recall = true_positives[support > 0] / support[support > 0]
    auroc = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    for c in range(num_classes):
        if 0 < support[c] < len(targets):
            auroc[c] = binary_auroc(probabilities[:, c].float(), (targets == c).long()).double()
    return {
        "confusion_matrix": confusion,
        "f1": f1,
        "f1_macro": f1.nanmean(),
        "balanced_accuracy": recall.mean() if recall.numel() else torch.tensor(float("nan")),
        "auroc": auroc,
        "auroc_macro": auroc.nanmean(),
        "predicted_fraction": predicted_counts / max(len(targets), 1),
    }


class CaseClassification(Metric):
    """Collects case probabilities and targets (few per epoch) and scores them together."""

    full_state_update = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.add_state("probabilities", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, probabilities: torch.Tensor, targets: torch.Tensor) -> None:
        self.probabilities.append(probabilities.float())
        self.targets.append(targets.long())

    def compute(self) -> dict[str, torch.Tensor]:
        if not self.probabilities:
            empty = torch.zeros(0, self.num_classes)
            return classification_scores(empty, torch.zeros(0, dtype=torch.long))
        return classification_scores(dim_zero_cat(self.probabilities), dim_zero_cat(self.targets))


class TaskMetrics(nn.Module):
    """The metrics of one task over a validation or test epoch.

    ``update`` takes the task's prediction and target for one volume: class indices
    [1, *spatial] (segmentation), a map in mm [1, 1, *spatial] (voxel regression),
    probabilities [1, K] and a class index [1] (classification), or values [1] (regression).
    ``compute`` returns scalars by metric name (without the ``<split>/<task>/`` prefix).
    """

    def __init__(self, task: TaskSpec):
        super().__init__()
        self.task = task
        if task.type == "segmentation":
            self.dice = dice_metric(task.num_outputs)
        elif task.type == "classification":
            self.classification = CaseClassification(task.num_outputs)
        else:
            self.mae = MeanAbsoluteError()
            self.rmse = MeanSquaredError(squared=False)
        self.confusion_matrix: torch.Tensor | None = None  # of the last compute()

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        if self.task.type == "segmentation":
            self.dice.update(prediction, target)
        elif self.task.type == "classification":
            self.classification.update(prediction, target)
        else:
            self.mae.update(prediction.flatten().float(), target.flatten().float())
            self.rmse.update(prediction.flatten().float(), target.flatten().float())

    def compute(self) -> dict[str, torch.Tensor]:
        names = self.task.class_names
        if self.task.type == "segmentation":
            scores = self.dice.compute().reshape(-1)
            values = {f"dice_{n}": s for n, s in zip(names[1:], scores, strict=True)}
            return values | {"dice_mean": scores.nanmean()}
        if self.task.type == "classification":
            scores = self.classification.compute()
            self.confusion_matrix = scores["confusion_matrix"].cpu()
            values = {
                "f1_macro": scores["f1_macro"],
                "balanced_accuracy": scores["balanced_accuracy"],
                "auroc": scores["auroc_macro"],
            }
            values |= {f"f1_{n}": s for n, s in zip(names, scores["f1"], strict=True)}
            fractions = scores["predicted_fraction"]
            return values | {f"predicted_{n}": f for n, f in zip(names, fractions, strict=True)}
        return {"mae": self.mae.compute(), "rmse": self.rmse.compute()}

    def reset(self) -> None:
        for metric in self.children():
            metric.reset()


def metric_names(task: TaskSpec) -> list[str]:
    """Names of the metrics :class:`TaskMetrics` computes for a task, in logging order."""
    names = task.class_names
    if task.type == "segmentation":
        return [*(f"dice_{n}" for n in names[1:]), "dice_mean"]
    if task.type == "classification":
        return [
            "f1_macro",
            "balanced_accuracy",
            "auroc",
            *(f"f1_{n}" for n in names),
            *(f"predicted_{n}" for n in names),
        ]
    return ["mae", "rmse"]


def never_predicted(task: TaskSpec, values: Mapping[str, torch.Tensor]) -> list[str]:
    """Classes of a classification task that no case was predicted as, from computed values."""
    return [n for n in task.class_names if float(values[f"predicted_{n}"]) == 0]


def case_row(task: TaskSpec, prediction: torch.Tensor, target: torch.Tensor) -> dict:
    """Per-case test columns ``<task>/...`` of a case-level task (prediction of one case)."""
    prefix = task.name
    if task.type == "classification":
        probabilities = prediction.reshape(-1)
        row = {
            f"{prefix}/target": task.categories[int(target)],
            f"{prefix}/predicted": task.categories[int(probabilities.argmax())],
        }
        return row | {
            f"{prefix}/probability_{n}": float(p)
            for n, p in zip(task.categories, probabilities, strict=True)
        }
    value, reference = float(prediction.reshape(())), float(target.reshape(()))
    return {
        f"{prefix}/target": reference,
        f"{prefix}/predicted": value,
        f"{prefix}/abs_error": abs(value - reference),
    }


def summarize_case_tasks(
    rows: Sequence[dict], tasks: Sequence[TaskSpec], statistics: Mapping[str, Mapping]
) -> dict[str, dict]:
    """Test-split scores of each case-level task next to a trivial baseline fitted on the
    training split: the majority class for classification, the mean for regression."""
    summary = {}
    for task in tasks:
        targets = [row[f"{task.name}/target"] for row in rows]
        if task.type == "classification":
            indices = torch.tensor([task.categories.index(t) for t in targets])
            probabilities = torch.tensor(
                [[row[f"{task.name}/probability_{n}"] for n in task.categories] for row in rows]
            )
            majority = int(torch.tensor(statistics[task.name]["counts"]).argmax())
            baseline = torch.zeros_like(probabilities)
            baseline[:, majority] = 1
            scores = classification_scores(probabilities, indices)
            baseline_scores = classification_scores(baseline, indices)
            summary[task.name] = {
                "f1_macro": float(scores["f1_macro"]),
                "balanced_accuracy": float(scores["balanced_accuracy"]),
                "auroc": float(scores["auroc_macro"]),
                "confusion_matrix": scores["confusion_matrix"].tolist(),
                "classes": list(task.categories),
                "baseline": {
                    "predicts": task.categories[majority],
                    "f1_macro": float(baseline_scores["f1_macro"]),
                    "balanced_accuracy": float(baseline_scores["balanced_accuracy"]),
                },
            }
        else:
            reference = torch.tensor(targets, dtype=torch.float64)
            predicted = torch.tensor([row[f"{task.name}/predicted"] for row in rows])
            mean = float(statistics[task.name]["mean"])
            summary[task.name] = {
                "mae": float((predicted - reference).abs().mean()),
                "rmse": float((predicted - reference).pow(2).mean().sqrt()),
                "baseline": {
                    "predicts": mean,
                    "mae": float((reference - mean).abs().mean()),
                    "rmse": float((reference - mean).pow(2).mean().sqrt()),
                },
            }
    return summary
