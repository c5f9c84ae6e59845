"""Training with tasks: a model with only a classification task trains and evaluates; loss
weights follow their schedule; a head trains at its own learning rate; classes that are never
predicted are reported."""

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medseg import pipeline
from medseg.errors import ConfigError
from medseg.models.unet import ResidualSEUNet
from medseg.module import SegmentationModule
from medseg.multitask import CascadeTasks
from medseg.stages import build_cascade

from .conftest import compose_config, eval_overrides, tiny_overrides

LABELS = {0: "background", 1: "liver", 2: "lesion"}


def read_csv(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def multitask_overrides(root: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        *tiny_overrides(root, data_root),
        "experiment=phantom_multitask",
        "data.patch_size=[32,32,16]",
        "data.samples_per_volume=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def classification_only_run(tmp_path_factory, phantom_root):
    root = tmp_path_factory.mktemp("classification")
    overrides = multitask_overrides(
        root,
        phantom_root,
        "stage.stages=[{name: classifier, classes: {}, tasks: [{name: lesion_count, "
        "type: classification, column: lesion_class, classes: [none, one, several]}]}]",
        "optimized_metric=val/lesion_count/f1_macro",
    )
    cfg = compose_config("train", overrides)
    return cfg, Path(cfg.paths.output_dir), pipeline.train(cfg)


def test_a_model_with_only_a_classification_task_trains(classification_only_run):
    _, run, metrics = classification_only_run
    assert {"val/lesion_count/f1_macro", "test/lesion_count/f1_macro"} <= set(metrics)
    assert {"test/lesion_count/balanced_accuracy", "test/lesion_count/auroc"} <= set(metrics)
    assert not any("dice" in name for name in metrics)
    module = SegmentationModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert len(module.nets["classifier"].decoder) == 0  # no segmentation: no decoder
    counts = module.tasks.statistics()["lesion_count"]["counts"]
    assert sum(counts) == 3  # the tiny phantom's training split
    rows = read_csv(run / "test_metrics.csv")
    assert len(rows) == 2 and rows[0]["lesion_count/target"] in ("none", "one", "several")
    assert {"lesion_count/probability_none", "lesion_count/predicted"} <= set(rows[0])
    summary = json.loads((run / "test_summary.json").read_text())
    assert "dice" not in summary
    task = summary["tasks"]["lesion_count"]
    assert task["classes"] == ["none", "one", "several"] and len(task["confusion_matrix"]) == 3
    assert sum(map(sum, task["confusion_matrix"])) == 2
    assert {"predicts", "f1_macro"} <= set(task["baseline"])


def test_confusion_matrices_reach_tensorboard(classification_only_run):
    _, run, _ = classification_only_run
    events = EventAccumulator(str(run / "tensorboard"))  # every event file of the run
    events.Reload()
    assert "val/lesion_count/confusion_matrix" in events.Tags()["images"]
    assert (run / "plots" / "lesion_count_confusion_matrix.png").is_file()  # the test split's


def test_eval_scores_the_tasks_of_a_checkpoint(classification_only_run, tmp_path, phantom_root):
    _, run, _ = classification_only_run
    ckpt = run / "checkpoints" / "last.ckpt"
    eval_cfg = compose_config(
        "eval", [*eval_overrides(tmp_path, phantom_root), f"ckpt_path={ckpt}"]
    )
    metrics = pipeline.evaluate(eval_cfg)
    assert "test/lesion_count/f1_macro" in metrics
    rows = read_csv(Path(eval_cfg.paths.output_dir) / "test_metrics.csv")
    trained = read_csv(run / "test_metrics.csv")
    assert [r["lesion_count/probability_one"] for r in rows] == pytest.approx(
        [r["lesion_count/probability_one"] for r in trained]
    )


def test_predict_writes_case_level_predictions(classification_only_run, tmp_path, phantom_root):
    _, run, _ = classification_only_run
    trained = {r["case_id"]: r for r in read_csv(run / "test_metrics.csv")}
    tested = json.loads((run / "test_summary.json").read_text())["checkpoints"][0]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for case_id in trained:  # the test cases' images, as a user's folder
        (inputs / f"{case_id}.nii.gz").symlink_to(phantom_root / "imagesTr" / f"{case_id}.nii.gz")
    output = tmp_path / "predicted"
    cfg = compose_config(
        "predict",
        [
            f"ckpt_path={tested}",
            f"input={inputs}",
            f"output={output}",
            f"paths.log_dir={tmp_path / 'logs'}",
            "prediction.precision=32-true",
        ],
    )
    assert pipeline.predict(cfg) == {"predicted_cases": 2.0}
    rows = {r["case_id"]: r for r in read_csv(output / "case_predictions.csv")}
    assert set(rows) == set(trained)
    classes = ("none", "one", "several")
    for case_id, row in rows.items():
        probabilities = [float(row[f"lesion_count/probability_{c}"]) for c in classes]
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
        assert row["lesion_count/predicted"] == classes[probabilities.index(max(probabilities))]
        # predict (original files) and the test report (prepared cases) see the same volume
        reported = [float(trained[case_id][f"lesion_count/probability_{c}"]) for c in classes]
        assert probabilities == pytest.approx(reported, abs=1e-3)
    assert not list(output.glob("*.nii.gz"))  # no segmentation: no label maps


def test_scheduled_loss_weight_and_head_learning_rate(tmp_path, phantom_root):
    overrides = multitask_overrides(
        tmp_path,
        phantom_root,
        "trainer.max_epochs=2",
        "trainer.check_val_every_n_epoch=2",
        "~stage.stages.0.tasks.0.weight",
        "+stage.stages.0.tasks.0.weight={0: 1.0, 2: 3.0}",
        "stage.stages.0.tasks.1.lr=0.05",
        "callbacks.model_checkpoint.monitor=val/liver_volume/mae",
        "callbacks.model_checkpoint.mode=min",
    )
    pipeline.train(compose_config("train", overrides))
    logged = read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    weights = {
        int(r["epoch"]): float(r["train/lesion_count/weight"])
        for r in logged
        if r.get("train/lesion_count/weight")
    }
    assert weights == {0: 1.0, 1: 2.0}
    # The regression head has its own parameter group at its own learning rate; the schedule
    # (cosine over 2 epochs) scales both groups alike.
    lrs = [r for r in logged if r.get("lr-AdamW/pg1")]
    assert float(lrs[0]["lr-AdamW/pg1"]) == pytest.approx(1e-3)
    assert float(lrs[0]["lr-AdamW/liver_volume"]) == pytest.approx(0.05)
    assert float(lrs[1]["lr-AdamW/liver_volume"]) / float(lrs[1]["lr-AdamW/pg1"]) == pytest.approx(
        50, rel=1e-2
    )


def test_monitoring_a_metric_the_model_does_not_log_is_refused(tmp_path, phantom_root):
    overrides = multitask_overrides(tmp_path, phantom_root, "optimized_metric=val/dice_tumour")
    with pytest.raises(ConfigError, match="monitor=val/dice_tumour is not logged by this model"):
        pipeline.train(compose_config("train", overrides))


def test_classes_never_predicted_are_reported(caplog):
    stage = {
        "name": "seg",
        "classes": None,
        "tasks": [{"name": "count", "type": "classification", "classes": ["a", "b", "c"]}],
    }
    cascade = build_cascade({"stages": [stage]}, LABELS)
    net = ResidualSEUNet(1, 3, width=4, num_stages=3, blocks_per_stage=1)
    tasks = CascadeTasks(cascade, {"seg": net}, {"_target_": "medseg.losses.DiceCELoss"})
    for target in (0, 1, 2):
        tasks.update(
            "val", {"count": torch.tensor([[0.1, 0.2, 0.7]])}, {"count": torch.tensor([target])}
        )
    with caplog.at_level(logging.INFO, logger="medseg.multitask"):
        values = tasks.compute("val", epoch=4)
    assert float(values["val/count/predicted_c"]) == 1.0
    assert "val epoch 4: task 'count' predicted a 0%, b 0%, c 100%" in caplog.text
    assert "val epoch 4: task 'count' never predicted class(es) ['a', 'b']" in caplog.text
    assert tasks.confusion_matrices["val"]["count"].tolist() == [[0, 0, 1], [0, 0, 1], [0, 0, 1]]
