"""The LightningModule: one network per cascade stage, stage schedule, losses, sliding-window
validation, metrics and per-stage optimizers.

A plain multi-class model is a cascade of one stage. Optimization is manual because every
stage has its own optimizer and scheduler (Lightning's automatic optimization steps all
optimizers of a module together). A stage's tasks (:mod:`medseg.tasks`) add heads to its
network; their losses join the stage's loss and their heads its optimizer
(:mod:`medseg.multitask`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from medseg.data.slices import predict_slices, volume_patch_size
from medseg.errors import ConfigError, DataError
from medseg.inference import sliding_window_inference
from medseg.losses import deep_supervision_loss
from medseg.models.bottleneck import WindowKeys, check_window
from medseg.models.cascade import CascadePrediction, predict_cascade
from medseg.models.resolution import StageGrid, stage_grid
from medseg.models.unet import ResidualSEUNet
from medseg.multitask import CascadeTasks, lookup_table
from medseg.stages import Cascade, Finetune, StageSpec, build_cascade, parse_stage
from medseg.task_metrics import dice_metric, metric_names
from medseg.trusted import check_trusted, trusted_instantiate

log = logging.getLogger(__name__)

# Keys of the `model` config that configure training rather than the network.
TRAINING_KEYS = ("optimizer", "scheduler", "inference", "gradient_clip")
# The module's hyperparameters that are `_target_` configs, and their kinds (see
# medseg.trusted; [] is any list index). A `_target_` anywhere else in a checkpoint is refused.
TARGET_HPARAMS = {
    "loss": "loss",
    "optimizer": "optimizer",
    "scheduler": "scheduler",
    "stages[].optim.optimizer": "optimizer",
    "stages[].optim.scheduler": "scheduler",
    "stages[].tasks[].loss": "loss",
}
# The `_target_` configs a stage's `optim` overrides (merged into model.<name>).
OPTIM_KINDS = ("optimizer", "scheduler")


class SegmentationModule(L.LightningModule):
    """Trains the stages of a cascade on patches and validates the composed result on volumes.

    Every argument is a plain value or container, saved as hyperparameters, so a checkpoint
    rebuilds the module with ``medseg.checkpoints.load_module(path)`` alone.

    Args:
        network: keyword arguments of :class:`ResidualSEUNet` except the channel counts.
        in_channels: image channels.
        stages: the cascade's stages (see :class:`medseg.stages.StageSpec`), as dicts.
        dataset_labels: the source dataset's label map (value -> name).
        loss: config of the loss (with ``_target_``), applied to every stage.
        optimizer: partial config of the optimizer (``_partial_: true``); one per stage,
            with the stage's ``optim.optimizer`` overrides.
        scheduler: partial config of the learning-rate scheduler, stepped once per epoch in
            which its stage trains (with the stage's ``optim.scheduler`` overrides).
        inference: sliding-window settings: ``window`` (the training patch, data.patch_size;
            each stage's own window follows from it and the stage's grid, see
            :mod:`medseg.models.resolution`), ``overlap``, ``batch_size``, ``gaussian``.
        preprocess: the data preprocessing the network was trained with.
        freeze_earlier: freeze a stage's predecessors when it starts training.
        finetune: ``{ckpt_path, stages, unfreeze_every}`` (see :class:`Finetune`).
        gradient_clip: maximum gradient norm per stage (None: no clipping).
        slice_axis: None for 3D networks; for 2D networks, the volume axis they were trained
            on slices along (volumes are predicted slice by slice).
    """

    def __init__(
        self,
        network: dict,
        in_channels: int,
        stages: list[dict],
        dataset_labels: dict[int, str],
        loss: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        inference: dict | None = None,
        preprocess: dict | None = None,
        freeze_earlier: bool = True,
        finetune: dict | None = None,
        gradient_clip: float | None = 12.0,
        slice_axis: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        finetune = dict(finetune or {})
        self.cascade = Cascade(
            [parse_stage(s, i, dataset_labels) for i, s in enumerate(stages)],
            dataset_labels,
            freeze_earlier=freeze_earlier,
            finetune=Finetune(
                finetune.get("ckpt_path"),
                None if finetune.get("stages") is None else tuple(finetune["stages"]),
                finetune.get("unfreeze_every"),
            ),
        )
        self.class_names = self.cascade.class_names
        # Refused targets fail here, before any data is prepared, not when training starts.
        for name in OPTIM_KINDS:
            check_trusted(self.hparams[name], name, f"model.{name}")
            for index, stage in enumerate(self.cascade.stages):
                check_trusted(stage.optim.get(name), name, f"stage.stages[{index}].optim.{name}")
        self.nets = nn.ModuleDict(
            {
                s.name: ResidualSEUNet(
                    in_channels + len(s.input_masks),
                    s.num_outputs if s.classes else 0,
                    decoder=s.needs_decoder,
                    **{**network, **s.network},
                )
                for s in self.cascade.stages
            }
        )
        self.loss = trusted_instantiate(loss, "loss", "loss")
        self.tasks = CascadeTasks(self.cascade, self.nets, loss)
        self.inference = {"overlap": 0.5, "batch_size": 4, "gaussian": True, **(inference or {})}
        # Each stage's grid on the data patch (inference["window"], data.patch_size).
        self.grids: dict[str, StageGrid] = {}
        if "window" in self.inference:
            for s in self.cascade.stages:
                grid = stage_grid(s.name, s.downsample, s.patch_size, self.inference["window"])
                self.grids[s.name] = grid
            self.check_windows()  # its warnings are for training: pipeline.train logs them
        self.register_buffer("composed_lut", lookup_table(self.cascade.composed_values()), False)
        for stage in self.cascade.stages:
            lut = lookup_table(self.cascade.stage_values(stage))
            self.register_buffer(f"lut_{stage.name}", lut, persistent=False)
        self.multi_stage = len(self.cascade.stages) > 1
        # Test-split metrics are scored by medseg.evaluation in each case's original geometry.
        self.metrics = nn.ModuleDict({"val_metrics": self._dice_metrics()})

    # -- building blocks -------------------------------------------------------------------

    def _dice_metrics(self) -> nn.ModuleDict:
        """Dice of the composed result, plus each stage's own when there are several."""
        metrics = {"composed": dice_metric(len(self.class_names))} if self.cascade.segments else {}
        if self.multi_stage:
            metrics |= {
                s.name: dice_metric(s.num_outputs) for s in self.cascade.stages if s.classes
            }
        return nn.ModuleDict(metrics)

    def stage_target(self, stage: StageSpec, label: torch.Tensor) -> torch.Tensor:
        """Source label values -> this stage's output indices."""
        return getattr(self, f"lut_{stage.name}")[label]

    def composed_target(self, label: torch.Tensor) -> torch.Tensor:
        """Source label values -> composed class indices."""
        return self.composed_lut[label]

    @staticmethod
    def stage_input(stage: StageSpec, image: torch.Tensor, priors: Mapping | None) -> torch.Tensor:
        """The image, plus the earlier stages' masks this stage sees, as channels."""
        if not stage.input_masks:
            return image
        if not priors or any(m not in priors for m in stage.input_masks):
            raise RuntimeError(
                f"stage {stage.name!r} needs the masks of {list(stage.input_masks)} in the batch "
                "(build the datamodule with cascade=...)"
            )
        return torch.cat([image, *(priors[m] for m in stage.input_masks)], dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The first stage's network output (the whole model for a single stage)."""
        return self.nets[self.cascade.stages[0].name](image)

    def stage_forward(
        self, stage: StageSpec, inputs: torch.Tensor, all_levels: bool
    ) -> tuple[list[torch.Tensor] | None, dict[str, torch.Tensor]]:
        """A stage's segmentation logits (every decoder level, or only the full-resolution
        one; None for a stage without classes) and its tasks' raw outputs by task name."""
        net = self.nets[stage.name]
        net.check_input_size(inputs.shape[2:])
        encoder = net.encode(inputs)
        decoder = net.decode_features(encoder, all_levels) if stage.needs_decoder else None
        segmentation = net.segment(decoder) if stage.classes else None
        tasks = self.tasks.outputs(stage, encoder, decoder[0] if decoder else None)
        return segmentation, tasks

    def stage_predictions(
        self, stage: StageSpec, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One stage's softmax [1, K_s, *spatial] by Gaussian sliding window over `inputs`
        (slice by slice for a 2D network; on the stage's own grid, then interpolated back),
        and its tasks' predictions for the volume (see :meth:`CascadeTasks.predict`): dense
        tasks are blended with the segmentation, case-level heads are averaged over the
        windows."""
        case_outputs: dict[str, list[torch.Tensor]] = {t.name: [] for t in stage.case_tasks}

        def predictor(windows: torch.Tensor) -> torch.Tensor:
            segmentation, tasks = self.stage_forward(stage, windows, all_levels=False)
            for name, outputs in case_outputs.items():
                outputs.append(tasks[name])
            # A stage without classes is all background (one constant channel).
            seg = (
                segmentation[0]
                if segmentation
                else windows.new_zeros(len(windows), 1, *windows.shape[2:])
            )
            dense = [tasks[t.name] for t in stage.dense_tasks]
            return torch.cat([x.float() for x in (seg, *dense)], dim=1)

        grid = self.stage_grid(stage)

        def sliding_window(volume: torch.Tensor) -> torch.Tensor:
            outputs = sliding_window_inference(
                grid.pool(volume),
                predictor,
                window=grid.window,
                overlap=self.inference["overlap"],
                batch_size=self.inference["batch_size"],
                gaussian=self.inference["gaussian"],
            )
            return grid.unpool(outputs, volume.shape[2:])

        if self.hparams.slice_axis is None:
            outputs = sliding_window(inputs)
        else:
            outputs = predict_slices(inputs, self.hparams.slice_axis, sliding_window)
        logits, dense = outputs.split([stage.num_outputs, outputs.shape[1] - stage.num_outputs], 1)
        return torch.softmax(logits, dim=1), self.tasks.predict(stage, dense, case_outputs)

    def stage_probabilities(self, stage: StageSpec, inputs: torch.Tensor) -> torch.Tensor:
        """One stage's softmax [1, K_s, *spatial] by Gaussian sliding window over `inputs`."""
        return self.stage_predictions(stage, inputs)[0]

    def stage_grid(self, stage: StageSpec) -> StageGrid:
        if stage.name not in self.grids:
            raise RuntimeError(
                "the module has no sliding-window size (inference.window): build it with "
                "build_module or load it from a checkpoint"
            )
        return self.grids[stage.name]

    def check_windows(self, bf16_on_cpu: bool = False) -> list[str]:
        """A ConfigError naming the keys for a stage window its network cannot train on
        (`bf16_on_cpu`: training runs in bf16 on the CPU); the warnings of the windows below
        nnU-Net's bottleneck rule. See :mod:`medseg.models.bottleneck`."""
        warnings = []
        for index, stage in enumerate(self.cascade.stages):
            grid = self.stage_grid(stage)
            depth_keys = {"num_stages", "strides"} & set(stage.network)
            network = f"stage.stages[{index}].network" if depth_keys else "model"
            settings = {**self.hparams.network, **stage.network}
            keys = WindowKeys(
                stage=stage.name,
                window="data.patch_size"
                if stage.patch_size is None
                else f"stage.stages[{index}].patch_size",
                scale=grid.factors if stage.patch_size is None else (1,) * len(grid.window),
                network=network,
                explicit_strides=settings.get("strides") is not None,
            )
            net = self.nets[stage.name]
            warning = check_window(grid.window, net.strides, keys, bf16_on_cpu)
            if warning is not None:
                warnings.append(warning)
        return warnings

    @property
    def region_box_sizes(self) -> dict[str, tuple[int, ...]]:
        """The smallest box each stage predicts in: one of its windows (3D data voxels)."""
        return {
            name: volume_patch_size(grid.extent, self.hparams.slice_axis)
            for name, grid in self.grids.items()
        }

    def predict_volume(
        self, image: torch.Tensor, spacing: Sequence[float] | None = None
    ) -> CascadePrediction:
        """Composed prediction for one preprocessed volume [1, C, *spatial].

        Every stage predicts by Gaussian sliding window inside its region; `spacing` (mm)
        turns region margins into voxels (default 1 mm). Ensembles and test-time
        augmentation: :func:`medseg.inference.predict_cascade_averaged`.
        """
        spacing = [float(s) for s in spacing] if spacing is not None else [1.0] * (image.ndim - 2)
        task_predictions: dict[str, torch.Tensor] = {}

        def stage_probabilities(stage: StageSpec, inputs: torch.Tensor) -> torch.Tensor:
            probabilities, tasks = self.stage_predictions(stage, inputs)
            task_predictions.update(tasks)
            return probabilities

        prediction = predict_cascade(
            image, spacing, self.cascade, stage_probabilities, self.region_box_sizes
        )
        prediction.tasks = task_predictions
        return prediction

    # -- training --------------------------------------------------------------------------

    def trainable_stages(self) -> list[str]:
        return self.cascade.trainable(self.current_epoch)

    def setup(self, stage: str) -> None:
        if stage != "fit" or not self.tasks.case_tasks:
            return
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "target_statistics"):
            raise RuntimeError(
                "case-level tasks fit class weights and target scaling to the training split: "
                "train with a SegmentationDataModule"
            )
        self.tasks.set_statistics(datamodule.target_statistics())

    def on_train_epoch_start(self) -> None:
        trainable = set(self.trainable_stages())
        for name, net in self.nets.items():
            net.requires_grad_(name in trainable)
            if name in self.tasks.heads:
                self.tasks.heads[name].requires_grad_(name in trainable)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        trainable = self.trainable_stages()
        optimizers = _as_list(self.optimizers())
        total = torch.zeros((), device=batch["image"].device)
        size = len(batch["image"])
        for name in trainable:
            stage = self.cascade.stage(name)
            grid = self.stage_grid(stage)
            # The stage's part of the patch; a downsampled stage's outputs are coarser than
            # its labels, which deep supervision's per-level targets take care of.
            view = grid.crop_batch(batch)
            inputs = grid.pool(self.stage_input(stage, view["image"], view.get("priors")))
            segmentation, outputs = self.stage_forward(
                stage, inputs, all_levels=self.nets[name].deep_supervision
            )
            if segmentation is not None:
                target = self.stage_target(stage, view["label"])
                loss = deep_supervision_loss(self.loss, segmentation, target)
                if self.multi_stage:
                    self.log(f"train/{name}/loss", loss, batch_size=size)
                total = total + stage.loss_weight * loss
            for task in stage.tasks:
                loss = self.tasks.loss(task, outputs[task.name], view)
                weight = task.weight.at(self.current_epoch)
                self.log(f"train/{task.name}/loss", loss, batch_size=size)
                if not task.weight.constant:
                    self.log(
                        f"train/{task.name}/weight",
                        weight,
                        on_step=False,
                        on_epoch=True,
                        batch_size=size,
                    )
                total = total + weight * loss
        self.log("train/loss", total, prog_bar=True, batch_size=size)
        stepped = [optimizers[self.cascade.names.index(n)] for n in trainable]
        for optimizer in stepped:
            optimizer.zero_grad()
        self.manual_backward(total)
        for optimizer in stepped:
            if self.hparams.gradient_clip:
                self.clip_gradients(optimizer, self.hparams.gradient_clip, "norm")
            optimizer.step()
        return total

    def on_train_epoch_end(self) -> None:
        schedulers = _as_list(self.lr_schedulers())
        if not schedulers:
            return
        for name in self.trainable_stages():
            schedulers[self.cascade.names.index(name)].step()

    def configure_optimizers(self):
        optimizers, schedulers = [], []
        for index, stage in enumerate(self.cascade.stages):
            optimizer = self._stage_optim(index, "optimizer")(
                params=self.tasks.parameter_groups(stage, self.nets[stage.name])
            )
            optimizers.append(optimizer)
            factory = self._stage_optim(index, "scheduler")
            if factory is not None:
                kwargs = {"optimizer": optimizer}
                if "epochs" in inspect.signature(factory).parameters:
                    kwargs["epochs"] = self.cascade.training_epochs(stage.name, self._max_epochs())
                schedulers.append(factory(**kwargs))
        return optimizers, schedulers

    def _stage_optim(self, index: int, name: str):
        """The partial optimizer or scheduler (`name`) of stage `index`: ``model.<name>``
        with the stage's ``optim.<name>`` overrides; None without a ``model.<name>``."""
        overrides = self.cascade.stages[index].optim.get(name)
        config = _merge(self.hparams[name], overrides)
        if config is None:
            return None
        key = f"stage.stages[{index}].optim.{name}" if overrides else f"model.{name}"
        return trusted_instantiate(config, name, key)

    def _max_epochs(self) -> int:
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        if max_epochs is None or max_epochs < 0:
            raise ConfigError(
                "trainer.max_epochs must be set: learning-rate schedules span the epochs each "
                "stage trains"
            )
        return max_epochs

    def load_finetune_weights(self) -> None:
        """Initialise the networks from ``finetune.ckpt_path`` (weights only, fresh optimizers)."""
        path = Path(self.cascade.finetune.ckpt_path).expanduser()
        if not path.exists():
            raise DataError(f"finetune.ckpt_path: checkpoint {path} does not exist")
        from medseg.checkpoints import load_checkpoint  # it imports this module

        state = load_checkpoint(path)["state_dict"]
        own = self.state_dict()
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        if mismatched:
            raise ConfigError(
                f"finetune.ckpt_path {path}: parameter shapes differ for {mismatched[:10]}: the "
                "checkpoint's networks do not match this configuration"
            )
        result = self.load_state_dict(state, strict=False)
        for prefix, what in (("nets.", "stages"), ("tasks.heads.", "the task heads of stages")):
            missing = sorted(
                {
                    k.removeprefix(prefix).split(".")[0]
                    for k in result.missing_keys
                    if k.startswith(prefix)
                }
            )
            if missing:
                log.warning("finetune: no weights in %s for %s %s", path, what, missing)

    # -- evaluation ------------------------------------------------------------------------

    def _evaluate_volume(self, batch: dict, split: str) -> CascadePrediction:
        prediction = self.predict_volume(batch["image"], batch["spacing"][0])
        metrics = self.metrics[f"{split}_metrics"]
        if self.cascade.segments:
            target = self.composed_target(batch["label"])
            log_probs = torch.log(prediction.probabilities.clamp_min(1e-8))
            self.log(f"{split}/loss", self.loss(log_probs, target), batch_size=1, sync_dist=True)
            metrics["composed"].update(prediction.labels, target[:, 0])
        for stage in self.cascade.stages:
            if stage.name in metrics:
                stage_target = self.stage_target(stage, batch["label"])[:, 0]
                metrics[stage.name].update(prediction.stage_labels[stage.name], stage_target)
        self.tasks.update(split, prediction.tasks, batch)
        return prediction

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate_volume(batch, "val")

    def _log_dice(self, split: str) -> None:
        metrics = self.metrics[f"{split}_metrics"]
        for key, metric in metrics.items():
            prefix = split if key == "composed" else f"{split}/{key}"
            names = (
                self.class_names
                if key == "composed"
                else ["background", *self.cascade.stage(key).classes]
            )
            scores = metric.compute().reshape(-1)  # a 0-d tensor when there is one class
            for name, score in zip(names[1:], scores, strict=True):
                self.log(f"{prefix}/dice_{name}", score)
            self.log(f"{prefix}/dice_mean", scores.nanmean(), prog_bar=key == "composed")
            metric.reset()

    def _log_tasks(self, split: str) -> None:
        for name, value in self.tasks.compute(split, self.current_epoch).items():
            self.log(name, value)

    def validation_metric_names(self) -> list[str]:
        """Every metric validation logs (what checkpoints and sweeps may monitor)."""
        names = []
        if self.cascade.segments:
            names += ["val/loss", *(f"val/dice_{c}" for c in self.class_names[1:]), "val/dice_mean"]
        for stage in self.cascade.stages:
            if stage.name in self.metrics["val_metrics"]:
                names += [f"val/{stage.name}/dice_{c}" for c in stage.classes]
                names.append(f"val/{stage.name}/dice_mean")
        for task in self.cascade.tasks:
            names += [f"val/{task.name}/{metric}" for metric in metric_names(task)]
        return names

    def on_validation_epoch_end(self) -> None:
        self._log_dice("val")
        self._log_tasks("val")


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _merge(base: Mapping | None, overrides: Mapping | None) -> dict | None:
    if not base:
        return None
    if not overrides:
        return dict(base)
    return OmegaConf.to_container(OmegaConf.merge(base, overrides))


def build_module(
    model: DictConfig,
    stage: DictConfig,
    loss: DictConfig,
    in_channels: int,
    dataset_labels: Mapping[int, str],
    patch_size: Sequence[int],
    preprocess: Mapping | None = None,
    finetune: Mapping | None = None,
    slice_axis: int | None = None,
) -> SegmentationModule:
    """Assemble the LightningModule from the `model`, `stage` and `loss` config groups.

    ``slice_axis`` (the data's 2D mode) needs a 2D network, and a 3D network needs 3D data.
    """
    model_dict = OmegaConf.to_container(model, resolve=True)
    network = {k: v for k, v in model_dict.items() if k not in TRAINING_KEYS}
    if "optimizer" not in model_dict:
        raise ConfigError("model.optimizer is missing: every model preset needs an optimizer")
    data_dims = 3 if slice_axis is None else 2
    if network.get("dims", 3) != data_dims:
        data = (
            f"data.slice_axis={slice_axis} gives 2D slices"
            if slice_axis is not None
            else "data.slice_axis=null gives 3D patches"
        )
        raise ConfigError(
            f"model.dims={network.get('dims', 3)} does not match the data: {data}; "
            f"set model.dims={data_dims}"
        )
    stage_dict = OmegaConf.to_container(stage, resolve=True)
    finetune = dict(finetune or {})
    cascade = build_cascade(stage_dict, dataset_labels, finetune)
    module = SegmentationModule(
        network=network,
        in_channels=in_channels,
        stages=[s.as_dict() for s in cascade.stages],
        dataset_labels=dict(dataset_labels),
        loss=OmegaConf.to_container(loss, resolve=True),
        optimizer=model_dict["optimizer"],
        scheduler=model_dict.get("scheduler"),
        inference={**model_dict.get("inference", {}), "window": list(patch_size)},
        preprocess=dict(preprocess or {}),
        freeze_earlier=cascade.freeze_earlier,
        finetune={
            "ckpt_path": cascade.finetune.ckpt_path,
            "stages": None if cascade.finetune.stages is None else list(cascade.finetune.stages),
            "unfreeze_every": cascade.finetune.unfreeze_every,
        },
        gradient_clip=model_dict.get("gradient_clip"),
        slice_axis=slice_axis,
    )
    if cascade.finetune.ckpt_path is not None:
        module.load_finetune_weights()
    return module
