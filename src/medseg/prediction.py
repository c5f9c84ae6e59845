"""Predict whole cases in their original geometry and write them in the input's format.

A case is read as it is on disk, prepared with the preprocessing stored in the checkpoint
(non-finite voxels, reorientation, resampling, intensity) and predicted stage by stage by
:func:`medseg.inference.predict_cascade_averaged`; every stage's probabilities are resampled
back onto the input's own voxel grid and the cascade decides there (thresholds, lesion only
inside its organ), so the written label map has the input's shape, spacing, orientation and
affine, and overlays it exactly in a viewer. That holds for a volume thinner than
resampling needs (a single slice saved as 3D) too: it is padded by repeating its edge voxels
for the network, and the prediction is resampled back onto its one slice. NRRD and MetaImage
inputs get predictions in their own format with their exact origin, spacing and direction
(or NIfTI, as configured); DICOM series get NIfTI.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from rich.progress import Progress

from medseg.checkpoints import load_module
from medseg.data.cases import Case, group_case_files, skipped_files
from medseg.data.dicom import holds_dicom_series
from medseg.data.formats import format_of, output_ending, supported_formats
from medseg.data.geometry import (
    DEFAULT_MAX_RESAMPLE_GROWTH,
    ResampleLimit,
    warn_implausible_spacing,
)
from medseg.data.image_io import DEFAULT_READING, ReadOptions, save_like
from medseg.data.preprocess import build_preprocessing, image_source, preprocess_settings
from medseg.data.subjects import case_to_subject
from medseg.errors import ConfigError, DataError
from medseg.inference import predict_cascade_averaged
from medseg.models.cascade import compose
from medseg.module import SegmentationModule
from medseg.reports import write_case_csv
from medseg.utils.failures import case_failure

log = logging.getLogger(__name__)

# Hyperparameters every member of an ensemble must share.
ENSEMBLE_KEYS = ("in_channels", "stages", "dataset_labels", "preprocess")


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> SegmentationModule:
    """The module saved in a checkpoint, in eval mode: every reader of checkpoints uses this.

    Read by :func:`medseg.checkpoints.load_module` (``weights_only=True``: a checkpoint with
    pickled Python objects is refused; missing or corrupt files give a clear error).
    """
    return load_module(path).to(map_location)


def find_input_cases(path: str | Path) -> list[Case]:
    """The cases of an image (a file of a format medseg reads, or a DICOM series folder) or
    of a folder of them (``<case>_NNNN`` files are channels; a subfolder is a DICOM series;
    other files are skipped with a warning).

    Raises:
        DataError: the path does not exist, is a file of an unknown format, or is a folder
            holding no image.
    """
    path = Path(path).expanduser()
    if path.is_file():
        format_of(path)  # an unknown format is an error, not zero cases
        return [Case(case_id, tuple(files)) for case_id, files in group_case_files([path]).items()]
    if not path.is_dir():
        raise DataError(f"input: {path} does not exist")
    if holds_dicom_series(path):
        return [Case(path.name, (path,))]
    entries = [p for p in path.iterdir() if p.is_file() or holds_dicom_series(p)]
    grouped = group_case_files(entries)
    skipped = skipped_files(entries)
    if skipped:
        log.warning(
            "input: skipping %d file(s) of no image format in %s: %s", len(skipped), path, skipped
        )
    if not grouped:
        raise DataError(f"input: no images in {path} (medseg reads {supported_formats()})")
    return [Case(case_id, tuple(files)) for case_id, files in grouped.items()]


def input_files(case: Case) -> str:
    """The image file(s) of a case as its error messages name them."""
    return ", ".join(str(p) for p in case.images)


def resample_to_grid(
    volume: torch.Tensor,
    source_affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: Sequence[int],
    chunk_voxels: int = 1 << 22,
) -> torch.Tensor:
    """Trilinear resampling of [K, *source] onto the voxel grid of another affine and shape.

    Written with ``grid_sample`` rather than TorchIO's ``Resample(target)``: that one goes
    through SimpleITK channel by channel and fills voxels beyond the source grid with a
    constant, which for probability maps would invent a class at the border; here the
    border is replicated and the work stays on the prediction's device. The target is done
    in slabs of about `chunk_voxels` voxels to bound the memory of the sampling grid.
    """
    # voxel index in the target -> world (mm) -> voxel index in the source
    index_map = torch.as_tensor(
        np.linalg.inv(source_affine) @ target_affine, dtype=torch.float64, device=volume.device
    )
    source_shape = torch.tensor(volume.shape[1:], dtype=torch.float64, device=volume.device)
    scale = 2 / (source_shape - 1).clamp_min(1)  # align_corners=True: -1 and 1 are end voxels
    nx, ny, nz = (int(s) for s in target_shape)
    out = torch.empty((volume.shape[0], nx, ny, nz), dtype=volume.dtype, device=volume.device)
    rows = max(1, chunk_voxels // (ny * nz))
    axes = [torch.arange(n, dtype=torch.float64, device=volume.device) for n in (ny, nz)]
    for start in range(0, nx, rows):
        xs = torch.arange(start, min(start + rows, nx), dtype=torch.float64, device=volume.device)
        index = torch.stack(torch.meshgrid(xs, *axes, indexing="ij"), dim=-1)
        source = index @ index_map[:3, :3].T + index_map[:3, 3]
        # grid_sample wants (x, y, z) = (last, middle, first) axis of the input
        grid = (source * scale - 1).flip(-1).to(volume.dtype)
        out[:, start : start + len(xs)] = F.grid_sample(
            volume[None], grid[None], mode="bilinear", padding_mode="border", align_corners=True
        )[0]
    return out


def output_label_values(module: SegmentationModule) -> np.ndarray:
    """Composed class index -> the dataset label value written for it: the lowest value the
    class stands for in the composed map (else the lowest its stage assigns to it)."""
    composed = module.cascade.composed_values()
    declared = [values for s in module.cascade.stages for values in s.classes.values()]
    written = [0]
    for index, values in enumerate(declared, start=1):
        own = [value for value, klass in composed.items() if klass == index]
        written.append(min(own or values))
    return np.array(written)


@dataclass
class CasePrediction:
    """One case predicted on its original voxel grid (arrays in the input file's voxel order)."""

    case_id: str
    reference: Path  # the input file whose header and geometry the outputs carry
    affine: np.ndarray  # RAS affine of the input's grid, as it was read
    labels: np.ndarray  # dataset label values
    probabilities: np.ndarray  # float32 [*spatial, K]
    entropy: np.ndarray | None = None  # float32 [*spatial], nats; with MC dropout
    # cascade stage -> uint8 [*spatial] foreground of that stage (every stage with classes)
    stage_masks: dict[str, np.ndarray] = field(default_factory=dict)
    # case-level task outputs as CSV columns: a class name and its probabilities, or a value
    tasks: dict[str, str | float] = field(default_factory=dict)


@dataclass
class PredictionRun:
    """What a run over many cases wrote, and which cases failed (one message each)."""

    predicted: list[str] = field(default_factory=list)  # case ids
    written: dict[str, Path] = field(default_factory=dict)  # case id -> label map
    failures: list[str] = field(default_factory=list)
    case_table: Path | None = None  # case_predictions.csv of case-level tasks


class Predictor:
    """Predicts cases with one checkpoint or an ensemble of them (probabilities averaged).

    Args:
        modules: trained modules sharing classes, channels and preprocessing (e.g. folds).
        mirror_axes: spatial axes of the preprocessed (RAS) volume to mirror at test time;
            every subset is predicted and averaged.
        mc_dropout_samples: Monte-Carlo dropout passes (0: off); adds a voxel-wise entropy map.
        precision: ``32-true``, ``bf16-mixed`` or ``16-mixed`` autocast.
        device: ``cpu``, ``cuda``, ... or ``auto`` (a GPU when there is one).
        overlap, batch_size: sliding-window settings; None keeps the checkpoint's.
        nonfinite, nonfinite_value: the policy for NaN/Inf input voxels (``error`` or
            ``replace`` with a value); None applies the checkpoint's ``data.preprocess``
            policy (a value alone replaces its value).
        max_resample_growth: an input whose resampling to the checkpoint's spacing would
            multiply its voxels by more than this is refused.
        reading: how input files are read (DICOM series with uneven slice positions).
    """

    def __init__(
        self,
        modules: Sequence[SegmentationModule],
        mirror_axes: Sequence[int] = (),
        mc_dropout_samples: int = 0,
        precision: str = "32-true",
        device: str = "auto",
        overlap: float | None = None,
        batch_size: int | None = None,
        nonfinite: str | None = None,
        nonfinite_value: float | None = None,
        max_resample_growth: float = DEFAULT_MAX_RESAMPLE_GROWTH,
        reading: ReadOptions = DEFAULT_READING,
    ):
        if not modules:
            raise ConfigError("ckpt_path: at least one checkpoint is needed")
        first = modules[0].hparams
        for index, module in enumerate(modules[1:], start=1):
            for key in ENSEMBLE_KEYS:
                theirs, mine = _ensemble_value(module.hparams, key), _ensemble_value(first, key)
                if theirs != mine:
                    raise ConfigError(
                        f"ckpt_path: checkpoint {index} differs from checkpoint 0 in {key} "
                        f"({theirs} vs {mine}); an ensemble needs the same"
                    )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        settings = {"overlap": overlap, "batch_size": batch_size}
        for module in modules:
            module.to(self.device).eval()
            module.inference.update({k: v for k, v in settings.items() if v is not None})
        self.modules = list(modules)
        self.mirror_axes = tuple(mirror_axes)
        self.mc_dropout_samples = mc_dropout_samples
        self.precision = precision
        self.in_channels = int(first.in_channels)
        self.class_names = modules[0].class_names
        preprocess = dict(first.preprocess or {})
        if nonfinite is not None:
            preprocess |= {"nonfinite": nonfinite, "nonfinite_value": nonfinite_value}
        elif nonfinite_value is not None:
            preprocess["nonfinite_value"] = nonfinite_value
        self.preprocessing = build_preprocessing(
            **preprocess,
            nonfinite_key="prediction",
            resample_limit=ResampleLimit.from_config(
                max_resample_growth, "prediction.max_resample_growth"
            ),
            pad_thin_axes=True,
        )
        self.label_values = output_label_values(modules[0])
        self.reading = reading

    def predict(self, case: Case) -> CasePrediction:
        """Predict one case; raises DataError naming the file when it cannot be used."""
        subject = self._load(case)
        original = subject["image"]
        warn_implausible_spacing(image_source(original), original.affine, original.spatial_shape)
        prepared = self.preprocessing(subject)["image"]
        prediction = predict_cascade_averaged(
            self.modules,
            prepared.data[None].float().to(self.device),
            prepared.spacing,
            mirror_axes=self.mirror_axes,
            mc_dropout_samples=self.mc_dropout_samples,
            precision=self.precision,
        )
        resampled = {
            name: resample_to_grid(
                probabilities[0], prepared.affine, original.affine, original.spatial_shape
            )[None]
            for name, probabilities in prediction.stage_probabilities.items()
        }
        composed = compose(resampled, self.modules[0].cascade, original.spacing)
        probabilities = composed.probabilities[0]
        labels = self.label_values[composed.labels[0].cpu().numpy()]
        entropy = None
        if self.mc_dropout_samples:
            entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(0)
            entropy = entropy.cpu().numpy().astype(np.float32)
        return CasePrediction(
            case_id=case.case_id,
            reference=case.images[0],
            affine=np.asarray(original.affine),
            labels=labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.int16),
            probabilities=np.moveaxis(probabilities.cpu().numpy(), 0, -1).astype(np.float32),
            entropy=entropy,
            stage_masks={
                name: (stage_labels[0] > 0).cpu().numpy().astype(np.uint8)
                for name, stage_labels in composed.stage_labels.items()
                if self.modules[0].cascade.stage(name).classes
            },
            tasks=self._case_task_columns(prediction.tasks),
        )

    def _case_task_columns(self, predictions: dict[str, torch.Tensor]) -> dict[str, str | float]:
        """``<task>/predicted``: the predicted class (name) or value;
        ``<task>/probability_<class>``: the class probabilities (averaged over the ensemble,
        mirroring and MC dropout), named as in the test report's ``test_metrics.csv``."""
        columns: dict[str, str | float] = {}
        for task in self.modules[0].cascade.case_tasks:
            value = predictions[task.name][0].cpu()
            if task.type == "classification":
                columns[f"{task.name}/predicted"] = task.class_names[int(value.argmax())]
                columns |= {
                    f"{task.name}/probability_{name}": float(p)
                    for name, p in zip(task.class_names, value.tolist(), strict=True)
                }
            else:
                columns[f"{task.name}/predicted"] = float(value)
        return columns

    def _load(self, case: Case) -> tio.Subject:
        subject = case_to_subject(case, options=self.reading)
        files = input_files(case)
        try:
            with warnings.catch_warnings():
                # TorchIO warns before falling back from SimpleITK to nibabel; the error says it
                warnings.simplefilter("ignore", UserWarning)
                subject.load()
        except DataError:  # the reader's own message names the file
            raise
        except Exception as error:  # SimpleITK and nibabel raise many types for bad files
            raise DataError(
                f"{files}: cannot be read as an image ({type(error).__name__}: {error})"
            ) from error
        channels = subject["image"].num_channels
        if channels != self.in_channels:
            raise DataError(
                f"{files}: has {channels} channel(s), the model expects {self.in_channels}"
            )
        return subject


def _ensemble_value(hparams: Mapping, key: str) -> object:
    """A hyperparameter as ensemble members are compared on it: preprocessing with the
    defaults of settings added since a checkpoint was written."""
    return preprocess_settings(hparams[key]) if key == "preprocess" else hparams[key]


def write_prediction(
    prediction: CasePrediction,
    output_dir: str | Path,
    save_probabilities: bool = False,
    save_stage_masks: bool = False,
    output_format: str = "input",
) -> Path:
    """Write ``<case>.<ending>`` (and ``probabilities/``, ``entropy/`` maps, and with
    `save_stage_masks` each cascade stage's foreground as ``stages/<stage>/<case>.<ending>``,
    the layout ``stage.training_masks.source=predictions`` reads) with the header and geometry
    of the input file, atomically and all or none, in the input's format or NIfTI
    (`output_format`, see :func:`medseg.data.formats.output_ending`). Returns the label map's
    path. (Case-level task outputs go to one table for all cases: see :func:`predict_cases`.)"""
    output_dir = Path(output_dir)
    ending = output_ending(prediction.reference, output_format)
    path = output_dir / f"{prediction.case_id}{ending}"
    outputs = {path: prediction.labels}
    if save_stage_masks:
        for stage, mask in prediction.stage_masks.items():
            outputs[output_dir / "stages" / stage / path.name] = mask
    if save_probabilities:
        outputs[output_dir / "probabilities" / path.name] = prediction.probabilities
    if prediction.entropy is not None:
        outputs[output_dir / "entropy" / path.name] = prediction.entropy
    # all or none: a case whose last map cannot be written leaves no label map behind either
    save_like(prediction.reference, prediction.affine, outputs)
    return path


def predict_cases(
    predictor: Predictor,
    cases: Iterable[Case],
    output_dir: str | Path,
    save_probabilities: bool = False,
    progress: bool = True,
    save_stage_masks: bool = False,
    output_format: str = "input",
) -> PredictionRun:
    """Predict and write every case; a case that fails (whatever it raises, see
    :func:`medseg.utils.failures.case_failure`) is reported and the others go on.

    A model with case-level tasks (classification, regression) also gets
    ``case_predictions.csv``: one row per predicted case (``case_id`` and the columns of
    :meth:`Predictor._case_task_columns`), written atomically once all cases are done. A
    model with only case-level tasks writes no label maps.
    """
    segments = predictor.modules[0].cascade.segments
    cases = list(cases)
    run = PredictionRun()
    task_rows: list[dict] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("predicting", total=len(cases))
        for case in cases:
            bar.update(task, description=f"predicting {case.case_id}")
            try:
                prediction = predictor.predict(case)
                if segments:
                    written = write_prediction(
                        prediction, output_dir, save_probabilities, save_stage_masks, output_format
                    )
            except Exception as error:
                run.failures.append(case_failure(error, input_files(case), "predicted"))
            else:
                run.predicted.append(case.case_id)
                if segments:
                    run.written[case.case_id] = written
                    log.info("%s -> %s", case.case_id, written)
                if prediction.tasks:
                    task_rows.append({"case_id": case.case_id, **prediction.tasks})
            bar.advance(task)
    if task_rows:
        run.case_table = write_case_csv(task_rows, Path(output_dir) / "case_predictions.csv")
        log.info("case-level task predictions -> %s", run.case_table)
    return run
