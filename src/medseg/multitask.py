"""The tasks of a cascade at run time: heads, losses, target statistics, whole-volume
predictions and metrics. The LightningModule owns one :class:`CascadeTasks`.

Whole-volume prediction: dense tasks are blended over the sliding windows with the stage's
segmentation (Gaussian weighting). A case-level head sees one window at a time, as in
training, so its case prediction is the mean over the volume's windows (of the class
probabilities, or of the regressed values). When a target depends on the whole volume (a
count, a volume), train with patches that cover the volume: there is then one window.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from hydra.errors import InstantiationException
from torch import nn

from medseg.errors import ConfigError
from medseg.metrics import case_metrics
from medseg.models.heads import TaskHeads
from medseg.models.unet import ResidualSEUNet
from medseg.stages import Cascade, StageSpec
from medseg.task_metrics import TaskMetrics, case_row, never_predicted
from medseg.tasks import DEFAULT_LOSSES, TaskSpec, class_weights
from medseg.trusted import trusted_instantiate

log = logging.getLogger(__name__)

SPLITS = ("val", "test")


def lookup_table(mapping: Mapping[int, int]) -> torch.Tensor:
    """Label value -> index, as a tensor to index label maps with."""
    lut = torch.zeros(max(mapping) + 1, dtype=torch.long)
    for value, index in mapping.items():
        lut[value] = index
    return lut


def build_task_loss(task: TaskSpec, segmentation_loss: Mapping, key: str) -> nn.Module:
    """The task's loss module: its own `loss` config (at config key `key`), else its type's
    default (segmentation tasks default to the segmentation loss, config key ``loss``). A
    classification loss gets a `weight` buffer for class weights unless ``class_weights`` is
    ``none``."""
    config = dict(task.loss or DEFAULT_LOSSES.get(task.type) or segmentation_loss)
    key = key if task.loss else "loss"
    if task.type == "classification" and task.class_weights != "none":
        try:
            return trusted_instantiate(config, "loss", key, weight=torch.ones(task.num_outputs))
        except InstantiationException as error:
            raise ConfigError(
                f"task {task.name!r}: loss {config['_target_']} takes no class weights "
                f"({error}); set class_weights: none"
            ) from error
    return trusted_instantiate(config, "loss", key)


class CascadeTasks(nn.Module):
    """Heads, losses, statistics and metrics of every task of a cascade.

    Args:
        cascade: the validated cascade (its stages' tasks).
        nets: the stage networks the heads read (name -> network).
        segmentation_loss: `_target_` config of the segmentation loss.
    """

    def __init__(
        self, cascade: Cascade, nets: Mapping[str, ResidualSEUNet], segmentation_loss: Mapping
    ):
        super().__init__()
        self.specs = {t.name: t for t in cascade.tasks}
        self.heads = nn.ModuleDict()
        for stage in cascade.stages:
            if stage.tasks:
                net = nets[stage.name]
                decoder = net.decoder_features[0] if stage.needs_decoder else None
                self.heads[stage.name] = TaskHeads(stage.tasks, net.dims, net.features, decoder)
        self.losses = nn.ModuleDict(
            {
                task.name: build_task_loss(
                    task, segmentation_loss, f"stage.stages[{i}].tasks[{j}].loss"
                )
                for i, stage in enumerate(cascade.stages)
                for j, task in enumerate(stage.tasks)
            }
        )
        for task in cascade.tasks:
            if task.type == "segmentation":
                values = {v: 0 for v in cascade.dataset_labels}
                for index, label_values in enumerate(task.label_classes.values(), start=1):
                    values |= dict.fromkeys(label_values, index)
                self.register_buffer(f"lut_{task.name}", lookup_table(values), persistent=False)
            elif task.type == "classification":
                counts = torch.zeros(task.num_outputs, dtype=torch.long)
                self.register_buffer(f"counts_{task.name}", counts)
            elif task.type == "regression":
                self.register_buffer(f"moments_{task.name}", torch.tensor([0.0, 1.0]))
        self.metrics = nn.ModuleDict(
            {
                split: nn.ModuleDict({t.name: TaskMetrics(t) for t in cascade.tasks})
                for split in SPLITS
            }
        )
        # split -> task -> confusion matrix of the last epoch (for the confusion-matrix images)
        self.confusion_matrices: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def case_tasks(self) -> list[TaskSpec]:
        return [t for t in self.specs.values() if t.is_case_level]

    # -- target statistics of the training split -------------------------------------------

    def set_statistics(self, statistics: Mapping[str, Mapping]) -> None:
        """Fit class weights and regression scaling to the training split's targets."""
        for task in self.case_tasks:
            stats = statistics[task.name]
            if task.type == "classification":
                counts = getattr(self, f"counts_{task.name}")
                counts.copy_(torch.as_tensor(stats["counts"]))
                missing = [
                    c for c, n in zip(task.categories, stats["counts"], strict=True) if not n
                ]
                if missing:
                    log.warning("task %r: no training case of class(es) %s", task.name, missing)
                if task.class_weights != "none":
                    weights = class_weights(stats["counts"], task.class_weights)
                    self.losses[task.name].weight.copy_(torch.tensor(weights))
                    log.info(
                        "task %r: training cases per class %s, class weights %s",
                        task.name,
                        dict(zip(task.categories, stats["counts"], strict=True)),
                        [round(w, 3) for w in weights],
                    )
            else:
                std = stats["std"] if stats["std"] > 0 else 1.0
                getattr(self, f"moments_{task.name}").copy_(torch.tensor([stats["mean"], std]))

    def statistics(self) -> dict[str, dict]:
        """The training split's statistics the tasks were fitted to (as in
        :func:`medseg.data.targets.target_statistics`)."""
        result = {}
        for task in self.case_tasks:
            if task.type == "classification":
                result[task.name] = {"counts": getattr(self, f"counts_{task.name}").tolist()}
            else:
                mean, std = getattr(self, f"moments_{task.name}").tolist()
                result[task.name] = {"mean": mean, "std": std}
        return result

    # -- training --------------------------------------------------------------------------

    def outputs(
        self, stage: StageSpec, encoder: Sequence[torch.Tensor], decoder: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Raw head outputs of a stage's tasks."""
        return self.heads[stage.name](encoder, decoder) if stage.tasks else {}

    def loss(self, task: TaskSpec, output: torch.Tensor, batch: Mapping) -> torch.Tensor:
        """The task's loss on a training batch (targets in the batch under the task's name)."""
        loss_fn = self.losses[task.name]
        if task.type == "segmentation":
            return loss_fn(output, self.label_target(task, batch["label"]))
        if task.name not in batch:
            raise RuntimeError(
                f"the batch has no targets for task {task.name!r}: attach the cascade to the "
                "datamodule (attach_cascade) before setup"
            )
        target = batch[task.name]
        if task.type == "regression":
            mean, std = getattr(self, f"moments_{task.name}")
            return loss_fn(output[:, 0].float(), (target - mean) / std)
        return loss_fn(output.float(), target)

    def label_target(self, task: TaskSpec, label: torch.Tensor) -> torch.Tensor:
        """Source label values -> the segmentation task's class indices."""
        return getattr(self, f"lut_{task.name}")[label]

    def parameter_groups(self, stage: StageSpec, network: nn.Module) -> list[dict]:
        """Optimizer parameter groups of a stage: the network and the heads without their
        own learning rate, then one group per head with its `lr`."""
        shared = list(network.parameters())
        groups = []
        heads = self.heads[stage.name].heads if stage.tasks else {}
        for task in stage.tasks:
            parameters = list(heads[task.name].parameters())
            if task.lr is None:
                shared += parameters
            else:
                groups.append({"params": parameters, "lr": task.lr, "name": task.name})
        return [{"params": shared}, *groups]

    # -- whole-volume prediction -----------------------------------------------------------

    def predict(
        self, stage: StageSpec, dense: torch.Tensor, case: Mapping[str, Sequence[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Predictions of a stage's tasks for one volume.

        Args:
            dense: [1, sum of dense outputs, *spatial] blended logits/maps of the dense tasks.
            case: task -> the head's outputs on every window ([n, K] each).

        Returns task -> class indices [1, *spatial] (segmentation), a map in mm [1, 1,
        *spatial] (voxel regression), probabilities [1, K] (classification) or a value [1].
        """
        predictions: dict[str, torch.Tensor] = {}
        sizes = [t.num_outputs for t in stage.dense_tasks]
        for task, output in zip(stage.dense_tasks, dense.split(sizes, dim=1), strict=True):
            if task.type == "segmentation":
                predictions[task.name] = output.argmax(1)
            else:
                predictions[task.name] = output * task.clip_mm
        for task in stage.case_tasks:
            outputs = torch.cat([o.float() for o in case[task.name]])
            if task.type == "classification":
                predictions[task.name] = torch.softmax(outputs, 1).mean(0, keepdim=True)
            else:
                mean, std = getattr(self, f"moments_{task.name}")
                predictions[task.name] = (outputs[:, 0] * std + mean).mean(0, keepdim=True)
        return predictions

    def evaluation_target(self, task: TaskSpec, batch: Mapping) -> torch.Tensor:
        """The reference of one volume, in the form of :meth:`predict`'s prediction."""
        if task.type == "segmentation":
            return self.label_target(task, batch["label"])[:, 0]
        if task.type == "voxel_regression":
            return batch[task.name] * task.clip_mm
        return batch[task.name]

    # -- metrics ---------------------------------------------------------------------------

    def update(self, split: str, predictions: Mapping[str, torch.Tensor], batch: Mapping) -> None:
        for name, metric in self.metrics[split].items():
            metric.update(predictions[name], self.evaluation_target(self.specs[name], batch))

    def compute(self, split: str, epoch: int) -> dict[str, torch.Tensor]:
        """Every task's metrics of the epoch as ``<split>/<task>/<metric>``; reports the
        predicted class distribution and warns about classes never predicted."""
        values = {}
        self.confusion_matrices[split] = {}
        for name, metric in self.metrics[split].items():
            task = self.specs[name]
            task_values = metric.compute()
            values |= {f"{split}/{name}/{k}": v for k, v in task_values.items()}
            if task.type == "classification":
                self.confusion_matrices[split][name] = metric.confusion_matrix
                _report_distribution(split, epoch, task, task_values)
            metric.reset()
        return values

    def test_row(
        self, predictions: Mapping[str, torch.Tensor], batch: Mapping, spacing: Sequence[float]
    ) -> dict:
        """Per-case test columns of every task (``<task>/...``)."""
        row: dict = {}
        for name, task in self.specs.items():
            prediction, target = predictions[name], self.evaluation_target(task, batch)
            if task.is_case_level:
                row |= case_row(task, prediction[0], target[0])
            elif task.type == "segmentation":
                scores = case_metrics(
                    prediction[0].cpu().numpy(), target[0].cpu().numpy(), task.class_names, spacing
                )
                row |= {f"{name}/{k}": v for k, v in scores.items() if k.startswith("dice")}
            else:
                row[f"{name}/mae_mm"] = float((prediction - target).abs().mean())
        return row


def _report_distribution(
    split: str, epoch: int, task: TaskSpec, values: Mapping[str, torch.Tensor]
) -> None:
    fractions = ", ".join(f"{n} {float(values[f'predicted_{n}']):.0%}" for n in task.categories)
    log.info("%s epoch %d: task %r predicted %s", split, epoch, task.name, fractions)
    missing = never_predicted(task, values)
    if missing:
        log.warning(
            "%s epoch %d: task %r never predicted class(es) %s (predicted: %s); an "
            "imbalanced task may need class weights or a larger loss weight",
            split,
            epoch,
            task.name,
            missing,
            fractions,
        )
