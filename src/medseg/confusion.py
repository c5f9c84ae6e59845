"""Confusion matrices of classification tasks as TensorBoard images."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from medseg import plots


class ConfusionMatrixImages(L.Callback):
    """After every validation, add each classification task's confusion matrix of the
    validation cases to TensorBoard as ``val/<task>/confusion_matrix``. (The test split's
    go to the run's ``plots/`` folder.)"""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tasks = getattr(pl_module, "tasks", None)
        matrices = tasks.confusion_matrices.get("val", {}) if tasks is not None else {}
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not matrices or not loggers or trainer.sanity_checking or not trainer.is_global_zero:
            return
        for name, matrix in matrices.items():
            figure = plots.confusion_matrix(
                matrix.numpy(), tasks.specs[name].class_names, unit="cases"
            )
            image = plots.figure_rgb(figure)
            for logger in loggers:
                logger.experiment.add_image(
                    f"val/{name}/confusion_matrix",
                    image,
                    global_step=trainer.global_step,
                    dataformats="HWC",
                )
