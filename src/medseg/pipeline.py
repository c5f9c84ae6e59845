"""Train and evaluate as plain functions of a composed config (no Hydra needed to call them)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from medseg.errors import ConfigError, DataError
from medseg.module import SegmentationModule, build_module
from medseg.reports import summarize, write_case_csv, write_summary_json
from medseg.utils.instantiate import instantiate_callbacks, instantiate_loggers
from medseg.utils.io import atomic_write_text
from medseg.utils.rich_utils import print_metric_table

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("mean", "std", "median", "min", "max", "n")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model, test the best checkpoint, and return the final metrics.

    Writes into ``cfg.paths.output_dir``: the resolved config, logs, checkpoints and the
    test split's per-case metrics (``test_metrics.csv``) and summary (``test_summary.json``).
    """
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    datamodule = instantiate(cfg.data)
    module = build_module(
        cfg.model,
        cfg.stage,
        cfg.loss,
        in_channels=datamodule.in_channels,
        dataset_labels=datamodule.dataset.labels,
        patch_size=datamodule.patch_size,
        preprocess=OmegaConf.to_container(cfg.data.get("preprocess") or {}, resolve=True),
        finetune=OmegaConf.to_container(cfg.get("finetune") or {}, resolve=True),
    )
    module.cascade.train_all_stages = bool(cfg.trainer.get("fast_dev_run"))
    module.cascade.check_epochs(cfg.trainer.get("max_epochs"))
    training_masks = cfg.stage.get("training_masks")
    datamodule.attach_cascade(
        module.cascade,
        OmegaConf.to_container(training_masks, resolve=True) if training_masks else None,
    )
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=instantiate_callbacks(cfg.get("callbacks")),
        logger=instantiate_loggers(cfg.get("logger")) or False,
    )
    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = _floats(trainer.callback_metrics)
    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("no best checkpoint was saved: testing the current weights")
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics |= _floats(trainer.callback_metrics)
        _report(module, output_dir, "test", checkpoint=best or None)
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate a checkpoint on the test split of ``cfg.data``.

    The checkpoint's own preprocessing is used (the network only works on data prepared
    the way it was trained), whatever ``cfg.data.preprocess`` says.
    """
    ckpt_path = Path(cfg.ckpt_path).expanduser()
    if not ckpt_path.is_file():
        raise DataError(f"ckpt_path: checkpoint {ckpt_path} does not exist")
    module = SegmentationModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    datamodule = instantiate(cfg.data, preprocess=module.hparams.preprocess)
    if datamodule.dataset.labels != module.hparams.dataset_labels:
        raise ConfigError(
            f"the checkpoint was trained on labels {module.hparams.dataset_labels}, but "
            f"{datamodule.dataset.root} declares {datamodule.dataset.labels}"
        )
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=instantiate_callbacks(cfg.get("callbacks")), logger=False
    )
    trainer.test(module, datamodule=datamodule)
    metrics = _floats(trainer.callback_metrics)
    _report(module, Path(cfg.paths.output_dir), "test", checkpoint=str(ckpt_path))
    return metrics


def _report(module: SegmentationModule, output_dir: Path, split: str, checkpoint: str | None):
    rows = module.test_rows
    names = module.class_names[1:]
    csv_path = write_case_csv(rows, output_dir / f"{split}_metrics.csv")
    dice = summarize(rows, "dice", names)
    summary = {
        "checkpoint": checkpoint,
        "split": split,
        "num_cases": len(rows),
        "cases": [row["case_id"] for row in rows],
        "dice": dice,
        "dice_mean": float(torch.tensor([s["mean"] for s in dice.values()]).nanmean()),
    }
    json_path = write_summary_json(summary, output_dir / f"{split}_summary.json")
    print_metric_table(f"{split} Dice per class ({len(rows)} cases)", dice, SUMMARY_COLUMNS)
    log.info("per-case metrics: %s; summary: %s", csv_path, json_path)


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}
