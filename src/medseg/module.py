"""The LightningModule: network, loss, sliding-window validation, metrics and optimizers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning as L
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchmetrics.segmentation import DiceScore

from medseg.errors import ConfigError
from medseg.inference import sliding_window_inference
from medseg.losses import deep_supervision_loss
from medseg.metrics import case_metrics
from medseg.models.unet import ResidualSEUNet

# Keys of the `model` config that configure training rather than the network.
TRAINING_KEYS = ("optimizer", "scheduler", "inference")


class SegmentationModule(L.LightningModule):
    """Trains a ResidualSEUNet on patches and validates it on whole volumes.

    Every argument is a plain value or container, saved as hyperparameters, so a checkpoint
    rebuilds the module with ``SegmentationModule.load_from_checkpoint(path)`` alone.

    Args:
        network: keyword arguments of :class:`ResidualSEUNet` except the channel counts.
        in_channels: image channels.
        classes: output class name -> source label values it covers, in output order
            (background, output 0, is every value not listed).
        dataset_labels: the source dataset's label map (value -> name), kept for reports.
        loss: config of the loss (with ``_target_``).
        optimizer: partial config of the optimizer (``_partial_: true``).
        scheduler: partial config of the learning-rate scheduler, stepped every epoch.
        inference: sliding-window settings: ``window``, ``overlap``, ``batch_size``,
            ``gaussian``.
        preprocess: the data preprocessing the network was trained with.
    """

    def __init__(
        self,
        network: dict,
        in_channels: int,
        classes: dict[str, list[int]],
        dataset_labels: dict[int, str],
        loss: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        inference: dict | None = None,
        preprocess: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.class_names = ["background", *classes]
        self.net = ResidualSEUNet(in_channels, len(self.class_names), **network)
        self.loss = instantiate(loss)
        self.inference = {"overlap": 0.5, "batch_size": 4, "gaussian": True, **(inference or {})}
        if "window" in self.inference:
            self.net.check_input_size(self.inference["window"])
        lut = torch.zeros(max(dataset_labels) + 1, dtype=torch.long)
        for index, values in enumerate(classes.values(), start=1):
            lut[list(values)] = index
        self.register_buffer("label_lut", lut, persistent=False)
        self.val_dice = self._dice_metric()
        self.test_dice = self._dice_metric()
        self.test_rows: list[dict] = []

    def _dice_metric(self) -> DiceScore:
        return DiceScore(
            num_classes=len(self.class_names),
            include_background=False,
            average="none",
            input_format="index",
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.net(image)

    def target(self, label: torch.Tensor) -> torch.Tensor:
        """Source label values -> output class indices."""
        return self.label_lut[label]

    def predict_volume(self, image: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits [1, K, *spatial] for one whole volume."""
        return sliding_window_inference(
            image,
            self.net,
            window=self.inference["window"],
            overlap=self.inference["overlap"],
            batch_size=self.inference["batch_size"],
            gaussian=self.inference["gaussian"],
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        target = self.target(batch["label"])
        outputs = self.net(batch["image"])
        if isinstance(outputs, list):
            loss = deep_supervision_loss(self.loss, outputs, target)
        else:
            loss = self.loss(outputs, target)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(target))
        return loss

    def _evaluate_volume(self, batch: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        target = self.target(batch["label"])
        logits = self.predict_volume(batch["image"])
        self.log(f"{prefix}/loss", self.loss(logits, target), batch_size=1, sync_dist=True)
        return logits.argmax(1), target[:, 0]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_dice.update(*self._evaluate_volume(batch, "val"))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        prediction, target = self._evaluate_volume(batch, "test")
        self.test_dice.update(prediction, target)
        row = {"case_id": batch["case_id"][0]}
        row |= case_metrics(prediction[0], target[0], self.class_names, batch["spacing"][0])
        self.test_rows.append(row)

    def _log_dice(self, metric: DiceScore, prefix: str) -> None:
        scores = metric.compute().reshape(-1)  # a 0-d tensor when there is one class
        for name, score in zip(self.class_names[1:], scores, strict=True):
            self.log(f"{prefix}/dice_{name}", score)
        self.log(f"{prefix}/dice_mean", scores.nanmean(), prog_bar=True)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_dice(self.val_dice, "val")

    def on_test_epoch_start(self) -> None:
        self.test_rows = []

    def on_test_epoch_end(self) -> None:
        self._log_dice(self.test_dice, "test")
        if dist.is_available() and dist.is_initialized():
            gathered: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, self.test_rows)
            self.test_rows = [row for rows in gathered for row in rows]
        self.test_rows.sort(key=lambda row: row["case_id"])

    def configure_optimizers(self) -> dict:
        optimizer = instantiate(self.hparams.optimizer)(params=self.parameters())
        if not self.hparams.scheduler:
            return {"optimizer": optimizer}
        scheduler = instantiate(self.hparams.scheduler)(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}


def resolve_classes(
    classes: Mapping[str, Sequence[int]] | None, dataset_labels: Mapping[int, str]
) -> dict[str, list[int]]:
    """Output classes of a stage: the dataset's foreground labels, or a declared regrouping."""
    if classes is None:
        return {name: [value] for value, name in dataset_labels.items() if value != 0}
    resolved: dict[str, list[int]] = {}
    for name, values in classes.items():
        values = [values] if isinstance(values, int) else list(values)
        unknown = sorted(set(values) - set(dataset_labels) | ({0} & set(values)))
        if not values or unknown:
            raise ConfigError(
                f"stage.classes.{name}: label values {unknown or values} are not foreground "
                f"labels of the dataset (declared: {dict(dataset_labels)})"
            )
        resolved[str(name)] = values
    return resolved


def build_module(
    model: DictConfig,
    stage: DictConfig,
    loss: DictConfig,
    in_channels: int,
    dataset_labels: Mapping[int, str],
    patch_size: Sequence[int],
    preprocess: Mapping | None = None,
) -> SegmentationModule:
    """Assemble the LightningModule from the `model`, `stage` and `loss` config groups."""
    model_dict = OmegaConf.to_container(model, resolve=True)
    network = {k: v for k, v in model_dict.items() if k not in TRAINING_KEYS}
    if "optimizer" not in model_dict:
        raise ConfigError("model.optimizer is missing: every model preset needs an optimizer")
    return SegmentationModule(
        network=network,
        in_channels=in_channels,
        classes=resolve_classes(
            OmegaConf.to_container(stage.classes) if stage.classes is not None else None,
            dataset_labels,
        ),
        dataset_labels=dict(dataset_labels),
        loss=OmegaConf.to_container(loss, resolve=True),
        optimizer=model_dict["optimizer"],
        scheduler=model_dict.get("scheduler"),
        inference={**model_dict.get("inference", {}), "window": list(patch_size)},
        preprocess=dict(preprocess or {}),
    )
