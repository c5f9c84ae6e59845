"""Checkpoints written by earlier medseg versions still load, predict, evaluate and resume."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg import pipeline
from medseg.checkpoints import load_checkpoint
from tests.conftest import compose_config, eval_overrides, tiny_overrides

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints_0.1.0"
SMALLER_MODEL = ["model.width=2", "model.max_features=8", "data.patch_size=[32,32,16]"]
# The overrides each fixture was trained with (see fixtures/checkpoints_0.1.0/README.md).
TRAINED_WITH = {
    "single": SMALLER_MODEL,
    "cascade": [
        *SMALLER_MODEL,
        "experiment=liver_cascade",
        "stage.stages.1.patch_size=[16,16,16]",
        "data.preprocess.spacing=null",
    ],
}


@pytest.mark.parametrize("name", sorted(TRAINED_WITH))
def test_a_0_1_0_checkpoint_predicts_evaluates_and_resumes(name, tmp_path, phantom_root):
    checkpoint = FIXTURES / f"{name}.ckpt"
    # eval: predicts the test split in each case's geometry and scores it
    eval_cfg = compose_config(
        "eval",
        [
            *eval_overrides(tmp_path, phantom_root),
            f"ckpt_path={checkpoint}",
            f"paths.output_dir={tmp_path}/eval",
        ],
    )
    metrics = pipeline.evaluate(eval_cfg)
    assert 0 <= metrics["test/dice_mean"] <= 1
    summary = json.loads((tmp_path / "eval" / "test_summary.json").read_text())
    for case_id in summary["cases"]:
        prediction = nib.load(tmp_path / "eval" / "predictions" / f"{case_id}.nii.gz")
        image = nib.load(phantom_root / "imagesTr" / f"{case_id}.nii.gz")
        assert prediction.shape == image.shape
        np.testing.assert_array_equal(prediction.affine, image.affine)

    # resume: one more epoch from the old checkpoint, under the config it was trained with
    overrides = [o for o in tiny_overrides(tmp_path, phantom_root) if "patch_size" not in o]
    train_cfg = compose_config(
        "train",
        [
            *overrides,
            *TRAINED_WITH[name],
            "trainer.max_epochs=2",
            "test=false",
            f"ckpt_path={checkpoint}",
            f"paths.output_dir={tmp_path}/resumed",
        ],
    )
    pipeline.train(train_cfg)
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert resumed["epoch"] == 1  # the fixture's epoch 0, then one more
