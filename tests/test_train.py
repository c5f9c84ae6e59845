"""End-to-end: train writes a complete run folder; eval re-scores its checkpoint; CLI errors."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from medseg import pipeline
from medseg.checkpoints import RUN_CONFIG_KEY, load_checkpoint, load_module
from medseg.data.splits import split_cases
from medseg.errors import DataError
from medseg.metrics import METRICS

from .conftest import (
    assert_clean_failure,
    compose_config,
    eval_overrides,
    run_script,
    tiny_overrides,
)


def read_csv(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_run_folder_has_config_logs_and_checkpoints(trained_run):
    cfg, run, metrics = trained_run
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["root"] == cfg.data.root and saved["model"]["width"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch_000.ckpt",
        "last.ckpt",
    ]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    logged = read_csv(run / "csv" / "metrics.csv")
    columns = set(logged[0])
    assert {"train/loss", "val/dice_mean", "val/dice_liver", "val/dice_lesion"} <= columns
    assert {"test/dice_mean", "val/dice_mean", "test/dice_liver"} <= set(metrics)


def test_test_split_is_scored_in_the_original_geometry(trained_run, phantom_root):
    _, run, metrics = trained_run
    rows = read_csv(run / "test_metrics.csv")
    test_cases = list(split_cases([f"phantom_{i:03d}" for i in range(8)], 0.25, 2, 0, 0).test)
    assert [r["case_id"] for r in rows] == test_cases
    columns = {f"{m}_{c}" for m in METRICS for c in ("liver", "lesion")}
    assert columns | {"volume_ml_reference_liver", "volume_ml_predicted_lesion"} <= set(rows[0])
    summary = json.loads((run / "test_summary.json").read_text())
    assert summary["num_cases"] == 2 and summary["cases"] == test_cases
    assert summary["checkpoints"] == [str(run / "checkpoints" / "epoch_000.ckpt")]
    liver = [float(r["dice_liver"]) for r in rows]
    assert summary["dice"]["liver"]["mean"] == pytest.approx(sum(liver) / 2)
    assert metrics["test/dice_liver"] == pytest.approx(sum(liver) / 2)
    assert sum(map(sum, summary["confusion_matrix"]["voxels"])) == 2 * 48 * 48 * 16
    # Reference volumes are real: label voxels x voxel volume of the tiny phantom (2.5*2.5*7.5).
    assert all(float(r["volume_ml_reference_liver"]) > 0 for r in rows)
    # The written predictions carry the inputs' affines; the logs hold the report's means.
    for case_id in test_cases:
        written = nib.load(run / "predictions" / f"{case_id}.nii.gz")
        source = nib.load(phantom_root / "imagesTr" / f"{case_id}.nii.gz")
        np.testing.assert_array_equal(written.affine, source.affine)
        assert written.shape == source.shape
    logged = [r for r in read_csv(run / "csv" / "metrics.csv") if r.get("test/dice_liver")]
    assert float(logged[-1]["test/dice_liver"]) == pytest.approx(sum(liver) / 2)
    pictures = {p.name for p in (run / "plots").iterdir()}
    assert {"metrics.png", "confusion_matrix.png", "training_curves.png"} <= pictures
    assert {f"worst_{c}.png" for c in test_cases} <= pictures


def test_checkpoint_is_self_contained(trained_run):
    cfg, run, _ = trained_run
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint[RUN_CONFIG_KEY] == OmegaConf.to_container(cfg, resolve=True)
    module = load_module(run / "checkpoints" / "last.ckpt")
    assert module.class_names == ["background", "liver", "lesion"]
    assert module.hparams.dataset_labels == {0: "background", 1: "liver", 2: "lesion"}
    assert module.hparams.preprocess["intensity"] == {"mode": "ct_window", "window": [-160, 240]}
    assert module.hparams.inference["window"] == [32, 32, 16]
    with torch.no_grad():
        assert module.eval()(torch.zeros(1, 1, 32, 32, 16)).shape == (1, 3, 32, 32, 16)


def test_eval_rescores_the_checkpoint_on_the_test_split(trained_run, tmp_path, phantom_root):
    _, run, _ = trained_run
    ckpt = run / "checkpoints" / "epoch_000.ckpt"
    eval_cfg = compose_config(
        "eval", [*eval_overrides(tmp_path, phantom_root), f"ckpt_path={ckpt}"]
    )
    metrics = pipeline.evaluate(eval_cfg)
    output = Path(eval_cfg.paths.output_dir)
    rows = read_csv(output / "test_metrics.csv")
    train_rows = read_csv(run / "test_metrics.csv")
    assert [r["case_id"] for r in rows] == [r["case_id"] for r in train_rows]
    for mine, theirs in zip(rows, train_rows, strict=True):
        assert float(mine["dice_liver"]) == pytest.approx(float(theirs["dice_liver"]), abs=1e-6)
    assert json.loads((output / "test_summary.json").read_text())["checkpoints"] == [str(ckpt)]
    assert {f"test/{m}_liver" for m in METRICS} | {"test/dice_mean"} <= set(metrics)

    # The same predictions scored as folders, without the checkpoint, give the same rows.
    labels = tmp_path / "labels"
    labels.mkdir()
    for row in rows:
        name = f"{row['case_id']}.nii.gz"
        (labels / name).symlink_to(phantom_root / "labelsTr" / name)
    folder_cfg = compose_config(
        "eval",
        [
            *eval_overrides(tmp_path, phantom_root),
            f"pred_dir={output / 'predictions'}",
            f"label_dir={labels}",
            "labels={0: background, 1: liver, 2: lesion}",
            f"paths.output_dir={tmp_path}/folders",
        ],
    )
    folder_metrics = pipeline.evaluate(folder_cfg)
    assert read_csv(tmp_path / "folders" / "test_metrics.csv") == rows
    assert folder_metrics == pytest.approx(metrics, nan_ok=True)


def test_eval_of_folders_reports_missing_predictions(tmp_path, phantom_root):
    (tmp_path / "predictions").mkdir()
    cfg = compose_config(
        "eval",
        [
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path}/out",
            f"pred_dir={tmp_path / 'predictions'}",
            f"label_dir={phantom_root / 'labelsTr'}",
        ],
    )
    with pytest.raises(DataError, match=r"8 case\(s\) of .* have no prediction .*phantom_000"):
        pipeline.evaluate(cfg)


def test_predict_cli_writes_predictions_and_names_bad_inputs(trained_run, tmp_path, phantom_root):
    _, run, _ = trained_run
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for case_id in ("phantom_000", "phantom_001"):
        name = f"{case_id}.nii.gz"
        (inputs / name).symlink_to(phantom_root / "imagesTr" / name)
    (inputs / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    checkpoints = [run / "checkpoints" / "epoch_000.ckpt", run / "checkpoints" / "last.ckpt"]
    result = run_script(
        "predict.py",
        f"ckpt_path=[{','.join(map(str, checkpoints))}]",
        f"input={inputs}",
        f"output={tmp_path / 'out'}",
        f"paths.root_dir={tmp_path}",
        "prediction.mirror_axes=[0]",
        "save_probabilities=true",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "1 of 3 input(s) could not be predicted" in output
    assert f"{inputs / 'corrupt.nii.gz'}: cannot be read as an image" in output
    assert "Traceback" not in output
    written = sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz"))
    assert written == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    label = nib.load(tmp_path / "out" / "phantom_000.nii.gz")
    source = nib.load(phantom_root / "imagesTr" / "phantom_000.nii.gz")
    np.testing.assert_array_equal(label.affine, source.affine)
    assert set(np.unique(np.asanyarray(label.dataobj))) <= {0, 1, 2}
    assert nib.load(tmp_path / "out" / "probabilities" / "phantom_000.nii.gz").shape == (
        *source.shape,
        3,
    )


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    result = run_script(
        "eval.py", f"ckpt_path={tmp_path}/missing.ckpt", f"paths.root_dir={tmp_path}"
    )
    assert result.returncode == 1
    assert f"checkpoint {tmp_path}/missing.ckpt does not exist" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.width=abc", "model.width must be a positive integer, got 'abc'"),
        ("data.batch_size=0", "data.batch_size must be positive integer(s), got [0]"),
        ("model.widht=8", "Key 'widht' is not in struct"),
        ("model=resse_unet_xl", "Could not find 'model/resse_unet_xl'"),
    ],
)
def test_wrong_key_or_value_gives_a_clear_error(override, message, tmp_path, phantom_root):
    overrides = [o for o in tiny_overrides(tmp_path, phantom_root) if "output_dir" not in o]
    result = run_script("train.py", *overrides, override)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert message in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("trainer", "expected"),
    [
        ({}, 6),
        ({"fast_dev_run": True}, 1),
        ({"fast_dev_run": 2}, 2),
        ({"limit_test_batches": 2}, 2),
        ({"limit_test_batches": 0.5}, 3),
        ({"limit_test_batches": 1.0}, 6),
    ],
)
def test_debug_runs_predict_as_many_test_cases_as_test_batches(trainer, expected):
    """debug=fast_dev_run and debug=limit stay short: the test report covers the first test
    cases only, one per test batch Lightning would run."""
    cases = [f"case_{i}" for i in range(6)]
    assert pipeline._limit_test_cases(cases, OmegaConf.create(trainer)) == cases[:expected]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: trainer=gpu runs")
def test_trainer_gpu_without_a_gpu_is_one_line_naming_the_key(tmp_path, phantom_root):
    overrides = [o for o in tiny_overrides(tmp_path, phantom_root) if "accelerator" not in o]
    result = run_script("train.py", *overrides, "trainer=gpu")
    assert_clean_failure(result, "error: trainer: ", "No supported gpu backend found!")
