"""Train, evaluate, predict and prepare data as plain functions of a composed config (no
Hydra needed to call them)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import rich
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf

from medseg import checkpoints, plots
from medseg.checkpoints import AtomicCheckpointIO, StoreRunConfig, check_compatible
from medseg.data.cache import FINGERPRINT_FILE, cache_size_bytes, validate_dataset
from medseg.data.cases import Case, CaseValidationError, DatasetInfo, parse_labels
from medseg.data.datamodule import SegmentationDataModule
from medseg.data.fingerprint import override_line, suggest
from medseg.data.formats import check_output_format
from medseg.data.image_io import DEFAULT_READING, ReadOptions
from medseg.errors import ConfigError, DataError
from medseg.evaluation import Evaluation, ScoringPair, pair_folders, score_pairs, write_reports
from medseg.module import SegmentationModule, build_module
from medseg.prediction import Predictor, find_input_cases, load_checkpoint, predict_cases
from medseg.reports import summarize, write_case_csv, write_summary_json
from medseg.task_metrics import summarize_case_tasks
from medseg.training_guards import EpochSeed
from medseg.utils.failures import raise_failures
from medseg.utils.instantiate import instantiate_callbacks, instantiate_loggers
from medseg.utils.io import atomic_write_text
from medseg.utils.outputs import check_output_folders
from medseg.utils.rich_utils import print_fingerprint, print_task_table

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model, test the best checkpoint, and return the final metrics.

    Writes into ``cfg.paths.output_dir``: the resolved config, logs, checkpoints, training
    curves and the test split's report (see :func:`test_modules`), whose means are also
    logged as ``test/<metric>_<class>``. ``ckpt_path`` (or ``resume=true``: this run
    folder's ``last.ckpt``) continues an interrupted run. Test cases that cannot be
    predicted or scored are listed in one DataError after the report of the others.
    """
    check_output_folders(cfg, ["paths.output_dir", "data.cache_dir"])
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if rank_zero_only.rank == 0:
        atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(resolved))

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
        slice_axis=datamodule.slice_axis,
    )
    module.cascade.train_all_stages = bool(cfg.trainer.get("fast_dev_run"))
    module.cascade.check_epochs(cfg.trainer.get("max_epochs"))
    training_masks = cfg.stage.get("training_masks")
    datamodule.attach_cascade(
        module.cascade,
        OmegaConf.to_container(training_masks, resolve=True) if training_masks else None,
    )
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    _check_monitored_metrics(module, callbacks)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=[*callbacks, EpochSeed(cfg.seed), StoreRunConfig(resolved)],
        logger=instantiate_loggers(cfg.get("logger")) or False,
        plugins=[AtomicCheckpointIO()],
    )
    _check_ddp_launch(trainer)
    if cfg.get("train", True):
        for warning in module.check_windows(bf16_on_cpu=_bf16_on_cpu(trainer)):
            log.warning("%s", warning)
        ckpt_path = _resume_checkpoint(cfg, callbacks)
        if ckpt_path is not None:
            saved = checkpoints.load_checkpoint(ckpt_path)
            check_compatible(saved, dict(module.hparams), ckpt_path)
            log.info("resuming from %s", ckpt_path)
        _fit(trainer, module, datamodule, ckpt_path)
    metrics = _floats(trainer.callback_metrics)
    if not trainer.is_global_zero:
        return metrics
    _plot_training_curves(trainer, output_dir)
    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("no best checkpoint was saved: testing the current weights")
        test_ids = _limit_test_cases(datamodule.split.test, cfg.trainer)
        test_cases = [datamodule.dataset.case(i) for i in test_ids]
        test_metrics, failures = test_modules(
            [load_checkpoint(best) if best else module.eval()],
            test_cases,
            cfg,
            checkpoints=[best] if best else [],
            datamodule=datamodule,
        )
        for logger in trainer.loggers:
            logger.log_metrics(test_metrics, step=trainer.global_step)
            logger.save()
        metrics |= test_metrics
        _raise_unscored(failures, len(test_cases), output_dir)
    return metrics


def _fit(trainer: L.Trainer, module, datamodule, ckpt_path: str | None) -> None:
    """``trainer.fit``, where a Ctrl-C stays a KeyboardInterrupt: Lightning shuts the run
    down cleanly, then exits with status 1, which the CLI could not tell from a failure."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise


def _limit_test_cases(case_ids: Sequence[str], trainer_cfg: DictConfig) -> list[str]:
    """The test cases a run predicts: all of them, or, as the debug configs ask, as many as
    Lightning would run test batches of one case under ``trainer.fast_dev_run`` (true: 1)
    or ``trainer.limit_test_batches`` (a count, or a fraction), but at least one."""
    fast_dev_run = trainer_cfg.get("fast_dev_run")
    limit = trainer_cfg.get("limit_test_batches")
    if fast_dev_run:
        count = 1 if fast_dev_run is True else int(fast_dev_run)
    elif isinstance(limit, float):
        count = max(1, int(len(case_ids) * limit))
    elif isinstance(limit, int):
        count = max(1, limit)
    else:
        count = len(case_ids)
    return list(case_ids)[:count]


def test_modules(
    modules: Sequence[SegmentationModule],
    cases: Sequence[Case],
    cfg: DictConfig,
    checkpoints: Sequence[str],
    datamodule: SegmentationDataModule | None = None,
    failures: Sequence[str] = (),
) -> tuple[dict[str, float], list[str]]:
    """Predict labelled cases into ``<output_dir>/predictions``, score them in their own
    geometry and write the ``test`` report; returns ``test/<metric>_<class>`` means and one
    line per case that could not be predicted or scored.

    Every case that can be is scored; the report lists the others (`failures`: earlier
    problems of cases left out, e.g. eval's invalid test cases) under ``failures``.

    A model with tasks also has them scored on `datamodule`'s test split (whose cases are
    `cases`): per-case columns ``<task>/...``, a ``tasks`` section of the summary and
    ``test/<task>/<metric>`` metrics (see :func:`test_tasks`)."""
    output_dir = Path(cfg.paths.output_dir)
    cascade = modules[0].cascade
    details: dict = {"checkpoints": [str(c) for c in checkpoints]}
    task_rows: dict[str, dict] = {}
    task_metrics: dict[str, float] = {}
    if cascade.tasks and datamodule is not None:
        task_rows, details["tasks"], task_metrics = test_tasks(modules[0], datamodule, output_dir)
    if not cascade.segments:  # only case-level tasks: no label maps to predict or score
        rows = [{"case_id": c.case_id, **task_rows.get(c.case_id, {})} for c in cases]
        write_case_csv(rows, output_dir / "test_metrics.csv")
        summary = {**details, "split": "test", "num_cases": len(rows)}
        summary |= {"cases": [r["case_id"] for r in rows], "failures": list(failures)}
        write_summary_json(summary, output_dir / "test_summary.json")
        return task_metrics, list(failures)
    reading = datamodule.dataset.reading if datamodule is not None else DEFAULT_READING
    settings = OmegaConf.to_container(cfg.prediction, resolve=True)
    predictor = Predictor(modules, **settings, reading=reading)
    run = predict_cases(predictor, cases, output_dir / "predictions")
    pairs = [
        ScoringPair(c.case_id, run.written[c.case_id], c.label, c.images[0], c.label_masks)
        for c in cases
        if c.case_id in run.written
    ]
    tolerance = cfg.evaluation.nsd_tolerance_mm
    reorient = bool(cfg.evaluation.reorient_labels)
    evaluation = score_pairs(
        pairs, cascade.class_names, cascade.composed_values(), tolerance, reorient
    )
    evaluation.failures[:0] = [*failures, *run.failures]
    stage_dice: dict[str, float] = {}
    if len(cascade.stages) > 1:  # each stage's own classes, regrouped from the composed map
        rows = {row["case_id"]: row for row in evaluation.rows}
        scored_pairs = [pair for pair in pairs if pair.case_id in rows]
        for stage in (s for s in cascade.stages if s.classes):
            names = ["background", *stage.classes]
            scored = score_pairs(
                scored_pairs, names, cascade.stage_values(stage), tolerance, reorient
            )
            for stage_row in scored.rows:
                rows[stage_row["case_id"]] |= {
                    f"{stage.name}/{k}": v for k, v in stage_row.items() if "dice_" in k
                }
            means = scored.mean_metrics(f"test/{stage.name}")
            stage_dice |= {k: v for k, v in means.items() if "/dice_" in k}
    details |= {"predictions": str(output_dir / "predictions"), "nsd_tolerance_mm": tolerance}
    for row in evaluation.rows:
        row |= task_rows.get(row["case_id"], {})
    metrics = _write_test_report(evaluation, pairs, cfg, details)
    return metrics | stage_dice | task_metrics, evaluation.failures


def _write_test_report(
    evaluation: Evaluation, pairs: Sequence[ScoringPair], cfg: DictConfig, details: dict
) -> dict[str, float]:
    """The ``test`` report of the scored cases (none when no case could be scored)."""
    if not evaluation.rows:
        return {}
    output_dir = Path(cfg.paths.output_dir)
    return write_reports(evaluation, pairs, output_dir, "test", details, cfg.evaluation.worst_cases)


def _raise_unscored(failures: Sequence[str], num_cases: int, output_dir: Path) -> None:
    raise_failures(
        failures,
        num_cases,
        "case(s) could not be scored",
        f"are scored in {output_dir / 'test_metrics.csv'}",
    )


def test_tasks(
    module: SegmentationModule, datamodule: SegmentationDataModule, output_dir: Path
) -> tuple[dict[str, dict], dict[str, dict], dict[str, float]]:
    """Score the module's tasks on the test split, on the network's voxel grid.

    Returns per-case columns by case id, the summary (case-level tasks next to a trivial
    baseline fitted on the training split: the majority class, the mean; dense tasks as
    per-case statistics) and the ``test/<task>/<metric>`` values; draws each classification
    task's confusion matrix to ``plots/<task>_confusion_matrix.png``. An ensemble's tasks are
    scored with its first member.
    """
    datamodule.setup("test")
    rows: dict[str, dict] = {}
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            predictions = module.predict_volume(batch["image"], batch["spacing"][0]).tasks
            module.tasks.update("test", predictions, batch)
            spacing = batch["spacing"][0].tolist()
            rows[batch["case_id"][0]] = module.tasks.test_row(predictions, batch, spacing)
    metrics = {k: float(v) for k, v in module.tasks.compute("test", module.current_epoch).items()}
    cascade, ordered = module.cascade, [rows[c] for c in sorted(rows)]
    summary = summarize_case_tasks(ordered, cascade.case_tasks, module.tasks.statistics())
    for task in cascade.tasks:
        if task.type == "segmentation":
            summary[task.name] = {
                "dice": summarize(ordered, f"{task.name}/dice", task.class_names[1:])
            }
        elif task.type == "voxel_regression":
            summary[task.name] = {"mae_mm": summarize(ordered, f"{task.name}/mae", ["mm"])["mm"]}
    print_task_table(f"test tasks ({len(rows)} cases)", summary)
    for name, matrix in module.tasks.confusion_matrices["test"].items():
        figure = plots.confusion_matrix(
            matrix.numpy(), module.tasks.specs[name].class_names, unit="cases"
        )
        plots.save_figure(figure, output_dir / "plots" / f"{name}_confusion_matrix.png")
    return rows, summary, metrics


def _check_monitored_metrics(module: SegmentationModule, callbacks: list) -> None:
    """A checkpoint callback must monitor a validation metric the model logs (checked before
    any training, rather than by Lightning after the first validation)."""
    logged = module.validation_metric_names()
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None) or ""
        if (
            isinstance(callback, ModelCheckpoint)
            and monitor.startswith("val/")
            and monitor not in logged
        ):
            raise ConfigError(
                f"callbacks.model_checkpoint.monitor={monitor} is not logged by this model; "
                f"set optimized_metric to one of {logged}"
            )


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score a checkpoint (or an ensemble) on the test split of ``cfg.data``, or a folder of
    predictions against a folder of labels (``pred_dir``, ``label_dir``).

    With a checkpoint, its own preprocessing and patch size are used (the network only works
    on data prepared the way it was trained, and a case-level head on volumes padded as in
    training), whatever ``cfg.data.preprocess`` and ``cfg.data.patch_size`` say.

    Every case that can be is scored and reported; the others (an invalid test case, a
    prediction that cannot be read or scored) are listed in one DataError at the end.
    """
    check_output_folders(cfg, ["paths.output_dir"])
    paths = _checkpoint_paths(cfg.get("ckpt_path"))
    if bool(paths) == bool(cfg.get("pred_dir")):
        raise ConfigError(
            "eval needs either ckpt_path=<checkpoint> (scores its test split) or "
            "pred_dir=<folder> label_dir=<folder> (scores predictions), not both"
        )
    if not paths:
        return _evaluate_folders(cfg)
    modules = [load_checkpoint(p) for p in paths]
    datamodule = instantiate(
        cfg.data,
        preprocess=modules[0].hparams.preprocess,
        patch_size=modules[0].hparams.inference["window"],
    )
    if datamodule.dataset.labels != modules[0].hparams.dataset_labels:
        raise ConfigError(
            f"the checkpoint was trained on labels {modules[0].hparams.dataset_labels}, but "
            f"{datamodule.dataset.root} declares {datamodule.dataset.labels}"
        )
    test_ids = list(datamodule.split.test)
    cases, invalid = _valid_cases(datamodule.dataset, datamodule.settings, test_ids)
    if modules[0].cascade.tasks:  # their targets come with the datamodule
        datamodule.attach_cascade(modules[0].cascade)
    metrics, failures = test_modules(
        modules, cases, cfg, [str(p) for p in paths], datamodule=datamodule, failures=invalid
    )
    _raise_unscored(failures, len(test_ids), Path(cfg.paths.output_dir))
    return metrics


def _valid_cases(
    dataset: DatasetInfo, settings: Mapping, case_ids: Sequence[str]
) -> tuple[list[Case], list[str]]:
    """The cases that pass validation, and one line (its problems) per case that does not:
    an invalid test case is listed, the others are still scored."""
    cases, invalid = [], []
    for case_id in case_ids:
        try:
            validate_dataset(dataset.subset([case_id]), settings)
        except CaseValidationError as error:
            invalid.append("; ".join(error.problems))
        else:
            cases.append(dataset.case(case_id))
    return cases, invalid


def _evaluate_folders(cfg: DictConfig) -> dict[str, float]:
    if not cfg.get("label_dir"):
        raise ConfigError("label_dir: the folder of reference labels is needed with pred_dir")
    label_dir = Path(cfg.label_dir).expanduser()
    pairs = pair_folders(Path(cfg.pred_dir).expanduser(), label_dir, cfg.get("image_dir"))
    labels = _folder_labels(cfg.get("labels"), label_dir)
    evaluation = score_pairs(
        pairs,
        list(labels.values()),
        {value: index for index, value in enumerate(labels)},
        cfg.evaluation.nsd_tolerance_mm,
        bool(cfg.evaluation.reorient_labels),
    )
    details = {
        "predictions": str(cfg.pred_dir),
        "labels": str(label_dir),
        "nsd_tolerance_mm": cfg.evaluation.nsd_tolerance_mm,
    }
    metrics = _write_test_report(evaluation, pairs, cfg, details)
    _raise_unscored(evaluation.failures, len(pairs), Path(cfg.paths.output_dir))
    return metrics


def _folder_labels(labels: DictConfig | None, label_dir: Path) -> dict[int, str]:
    """The declared label map, else the one in dataset.json beside `label_dir` (MSD layout)."""
    meta_path = label_dir.parent / "dataset.json"
    if labels is None:
        if not meta_path.is_file():
            raise ConfigError(
                f"labels: declare the label map (labels={{0: background, 1: liver}}) or put "
                f"a dataset.json beside {label_dir}"
            )
        try:
            labels = json.loads(meta_path.read_text()).get("labels")
        except (OSError, json.JSONDecodeError) as error:
            raise DataError(f"{meta_path}: cannot read dataset.json ({error})") from error
    else:
        labels = OmegaConf.to_container(labels)
    return parse_labels(labels, meta_path)


def predict(cfg: DictConfig) -> dict[str, float]:
    """Predict a file or folder of images with a checkpoint (or an ensemble) into ``output``.

    Every input that can be read is predicted; the ones that cannot are listed in one
    DataError at the end.
    """
    check_output_folders(cfg, ["output"])
    paths = _checkpoint_paths(cfg.ckpt_path)
    if not paths:
        raise ConfigError("ckpt_path: a checkpoint (or a list of them) is needed")
    check_output_format(cfg.output_format)
    reading = ReadOptions(nonuniform_slices=cfg.dicom.nonuniform_slices, config_prefix="")
    modules = [load_checkpoint(p) for p in paths]
    settings = OmegaConf.to_container(cfg.prediction, resolve=True)
    predictor = Predictor(modules, **settings, reading=reading)
    cases = find_input_cases(cfg.input)
    output = Path(cfg.output).expanduser()
    run = predict_cases(
        predictor,
        cases,
        output,
        save_probabilities=cfg.save_probabilities,
        save_stage_masks=cfg.save_stage_masks,
        output_format=cfg.output_format,
    )
    log.info("predicted %d of %d case(s) into %s", len(run.predicted), len(cases), output)
    raise_failures(
        run.failures, len(cases), "input(s) could not be predicted", f"were written to {output}"
    )
    return {"predicted_cases": float(len(run.predicted))}


def _resume_checkpoint(cfg: DictConfig, callbacks: list) -> Path | None:
    """``ckpt_path``, else with ``resume=true`` the run folder's latest checkpoint if any.

    The latest checkpoint is the one a ModelCheckpoint without a monitored metric keeps
    (configs/callbacks/last_checkpoint.yaml: ``checkpoints/last.ckpt``).
    """
    if cfg.get("ckpt_path"):
        return Path(cfg.ckpt_path).expanduser()
    if not cfg.get("resume"):
        return None
    latest = [
        Path(cb.dirpath) / f"{cb.filename}{cb.FILE_EXTENSION}"
        for cb in callbacks
        if isinstance(cb, ModelCheckpoint) and cb.monitor is None and cb.dirpath and cb.filename
    ]
    if not latest:
        raise ConfigError(
            "resume=true needs the last_checkpoint callback (callbacks=default), which keeps "
            "checkpoints/last.ckpt"
        )
    if not latest[0].is_file():
        log.info("resume=true: no %s yet, starting from scratch", latest[0])
        return None
    return latest[0]


def _check_ddp_launch(trainer: L.Trainer) -> None:
    """Refuse DDP that Lightning would launch by re-running the command inside a local sweep.

    Lightning starts ranks 1.. by running ``sys.argv`` again; in a multirun that would start
    the whole sweep in every child. On SLURM (the submitit launcher), every rank is a task of
    the job and nothing is re-run.
    """
    spawns_children = (
        isinstance(trainer.strategy, DDPStrategy)
        and trainer.world_size > 1
        and not trainer.strategy.cluster_environment.creates_processes_externally
    )
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if spawns_children and multirun:
        raise ConfigError(
            "trainer=ddp with several local devices cannot run inside a local multirun (-m): "
            "run each configuration on its own, or launch the sweep on SLURM "
            "(hydra/launcher=slurm), where each rank is a task of the job"
        )


def _bf16_on_cpu(trainer: L.Trainer) -> bool:
    return isinstance(trainer.accelerator, CPUAccelerator) and trainer.precision.startswith("bf16")


def _checkpoint_paths(value: str | Sequence[str] | None) -> list[Path]:
    if value is None:
        return []
    items = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    return [Path(str(item)).expanduser() for item in items]


def _plot_training_curves(trainer: L.Trainer, output_dir: Path) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            logger.save()
            metrics_csv = Path(logger.log_dir) / "metrics.csv"
            if metrics_csv.is_file():
                figure = plots.training_curves(metrics_csv)
                plots.save_figure(figure, output_dir / "plots" / "training_curves.png")


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def prepare(cfg: DictConfig) -> dict[str, float]:
    """Preprocess ``cfg.data`` into its cache, print the dataset fingerprint and the settings
    it suggests as command-line overrides; return the number of cases and the cache size."""
    check_output_folders(cfg, ["data.cache_dir"])
    datamodule = instantiate(cfg.data)
    if datamodule.cache_dir is None:
        raise ConfigError("data.cache_dir is null: set it to the folder the cache goes to")
    datamodule.prepare_data()
    root = datamodule.cache_root
    fingerprint = json.loads((root / FINGERPRINT_FILE).read_text())
    stride = [int(cfg.patch_multiple)] * 3
    suggested = suggest(fingerprint, stride, int(cfg.max_patch_voxels))
    size = cache_size_bytes(root)
    print_fingerprint(fingerprint, root, size)
    overrides = override_line(suggested, datamodule.settings["intensity"])
    log.info("suggested settings: %s", overrides)
    console = rich.get_console()
    console.print("[bold]suggested overrides:[/bold]")
    console.print(overrides, soft_wrap=True, markup=False)  # one line, to copy as it is
    return {"num_cases": float(fingerprint["num_cases"]), "cache_bytes": float(size)}
