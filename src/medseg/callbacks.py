"""Lightning callbacks: pictures of validation cases during training."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from medseg import plots
from medseg.errors import ConfigError


class ValidationOverlays(L.Callback):
    """Logs overlays of image, reference and prediction of the first validation cases.

    At every validation, the first `num_cases` cases are predicted with the module's
    ``predict_volume`` (the same call as validation itself, so these cases cost a second
    sliding window) and drawn in three planes on the training grid, as TensorBoard images
    ``val/overlay_<case>``. Every `gif_every_n_epochs` epochs (0: never) an animated GIF
    through the axial slices of each of these cases goes to `dirpath`.
    """

    def __init__(self, num_cases: int = 1, gif_every_n_epochs: int = 0, dirpath: str | None = None):
        super().__init__()
        for key, value, minimum in (
            ("num_cases", num_cases, 1),
            ("gif_every_n_epochs", gif_every_n_epochs, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(
                    f"callbacks.validation_overlays.{key} must be an integer >= {minimum}, "
                    f"got {value!r}"
                )
        if gif_every_n_epochs and not dirpath:
            raise ConfigError("callbacks.validation_overlays.dirpath is needed to write GIFs")
        self.num_cases = num_cases
        self.gif_every_n_epochs = gif_every_n_epochs
        self.dirpath = Path(dirpath) if dirpath else None

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or batch_idx >= self.num_cases or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        write_gif = self.gif_every_n_epochs and (epoch + 1) % self.gif_every_n_epochs == 0
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers and not write_gif:
            return
        spacing = [float(s) for s in batch["spacing"][0]]
        with torch.no_grad():
            prediction = pl_module.predict_volume(batch["image"][:1], spacing).labels[0]
        prediction = prediction.cpu().numpy()
        reference = pl_module.composed_target(batch["label"][:1])[0, 0].cpu().numpy()
        image = batch["image"][0, 0].float().cpu().numpy()
        case_id = batch["case_id"][0]
        title = f"{case_id}, epoch {epoch}"
        if loggers:
            rgb = plots.figure_rgb(plots.case_overlay(image, reference, prediction, spacing, title))
            for logger in loggers:
                logger.experiment.add_image(
                    f"val/overlay_{case_id}", rgb, trainer.global_step, dataformats="HWC"
                )
        if write_gif:
            path = self.dirpath / f"epoch_{epoch:03d}_{case_id}.gif"
            plots.slice_gif(image, reference, prediction, spacing, path, title)
