"""End-to-end: train writes a complete run folder; eval re-scores its checkpoint; CLI errors."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from medseg import pipeline
from medseg.data.splits import split_cases
from medseg.module import SegmentationModule

from .conftest import compose_config, run_script, tiny_overrides


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, phantom_root):
    root = tmp_path_factory.mktemp("train")
    cfg = compose_config("train", tiny_overrides(root, phantom_root))
    metrics = pipeline.train(cfg)
    return cfg, Path(cfg.paths.output_dir), metrics


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


def test_test_split_metrics_are_written_per_case(trained_run):
    _, run, _ = trained_run
    rows = read_csv(run / "test_metrics.csv")
    test_cases = list(split_cases([f"phantom_{i:03d}" for i in range(8)], 0.25, 2, 0, 0).test)
    assert [r["case_id"] for r in rows] == test_cases
    assert {"dice_liver", "dice_lesion", "volume_ml_reference_liver"} <= set(rows[0])
    summary = json.loads((run / "test_summary.json").read_text())
    assert summary["num_cases"] == 2 and summary["cases"] == test_cases
    liver = [float(r["dice_liver"]) for r in rows]
    assert summary["dice"]["liver"]["mean"] == pytest.approx(sum(liver) / 2)
    # Reference volumes are real: label voxels x voxel volume of the tiny phantom (2.5*2.5*7.5).
    assert all(float(r["volume_ml_reference_liver"]) > 0 for r in rows)


def test_checkpoint_is_self_contained(trained_run):
    _, run, _ = trained_run
    module = SegmentationModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert module.class_names == ["background", "liver", "lesion"]
    assert module.hparams.preprocess["intensity"] == {"mode": "ct_window", "window": [-160, 240]}
    assert module.hparams.inference["window"] == [32, 32, 16]
    with torch.no_grad():
        assert module.eval()(torch.zeros(1, 1, 32, 32, 16)).shape == (1, 3, 32, 32, 16)


def test_eval_rescores_the_checkpoint_on_the_test_split(trained_run, tmp_path, phantom_root):
    _, run, _ = trained_run
    ckpt = run / "checkpoints" / "epoch_000.ckpt"
    overrides = [o for o in tiny_overrides(tmp_path, phantom_root) if not o.startswith("model.")]
    overrides = [o for o in overrides if "limit_train_batches" not in o]
    eval_cfg = compose_config("eval", [*overrides, f"ckpt_path={ckpt}"])
    metrics = pipeline.evaluate(eval_cfg)
    rows = read_csv(Path(eval_cfg.paths.output_dir) / "test_metrics.csv")
    train_rows = read_csv(run / "test_metrics.csv")
    assert [r["case_id"] for r in rows] == [r["case_id"] for r in train_rows]
    for mine, theirs in zip(rows, train_rows, strict=True):
        assert float(mine["dice_liver"]) == pytest.approx(float(theirs["dice_liver"]), abs=1e-6)
    assert json.loads((Path(eval_cfg.paths.output_dir) / "test_summary.json").read_text())[
        "checkpoint"
    ] == str(ckpt)
    assert "test/dice_mean" in metrics


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
