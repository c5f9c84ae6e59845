"""A NaN/Inf loss stops the run naming the batch's cases, or skips the step when configured."""

import numpy as np
import pytest
import torch

from medseg import pipeline
from medseg.checkpoints import load_checkpoint
from medseg.data.datamodule import SegmentationDataModule
from medseg.data.splits import split_cases
from medseg.errors import ConfigError, TrainingError
from medseg.training_guards import EpochSeed, NonFiniteLossGuard

from .conftest import compose_config, run_script, tiny_overrides

# Every training patch of the tiny phantom in one epoch (3 cases x 2 patches, batches of 2).
ALL_PATCHES = "trainer.limit_train_batches=3"
TRAIN_CASE = split_cases([f"phantom_{i:03d}" for i in range(8)], 0.25, 2, 0, 0).train[0]


@pytest.fixture
def nan_image_case(monkeypatch) -> str:
    """Replace one training case's preprocessed image by NaN."""
    setup = SegmentationDataModule.setup

    def poisoned_setup(self, stage=None):
        setup(self, stage)
        for case in self.cases.get("train", []):
            if case.case_id == TRAIN_CASE:
                case.image = np.full(case.image.shape, np.nan, dtype=np.float32)

    monkeypatch.setattr(SegmentationDataModule, "setup", poisoned_setup)
    return TRAIN_CASE


def test_a_nan_loss_stops_training_naming_the_case(nan_image_case, tmp_path, phantom_root):
    cfg = compose_config("train", [*tiny_overrides(tmp_path, phantom_root), ALL_PATCHES])
    with pytest.raises(TrainingError) as error:
        pipeline.train(cfg)
    message = str(error.value)
    assert message.startswith("non-finite training loss (nan) at epoch 0")
    assert nan_image_case in message.split("batch cases: ")[1]
    assert "callbacks.nonfinite_loss.action=skip" in message


def test_skip_drops_the_bad_steps_and_training_goes_on(
    nan_image_case, tmp_path, phantom_root, caplog
):
    overrides = [*tiny_overrides(tmp_path, phantom_root), ALL_PATCHES]
    cfg = compose_config("train", [*overrides, "callbacks.nonfinite_loss.action=skip"])
    metrics = pipeline.train(cfg)
    skipped = [
        r.getMessage() for r in caplog.records if "skipping this optimizer step" in r.message
    ]
    assert skipped and all(nan_image_case in message for message in skipped)
    assert len(skipped) < 3  # the batches without the case were trained on
    weights = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert 0 <= metrics["test/dice_mean"] <= 1


def test_the_cli_reports_a_nan_loss_in_one_message(tmp_path, phantom_root):
    overrides = [o for o in tiny_overrides(tmp_path, phantom_root) if "output_dir" not in o]
    result = run_script("train.py", *overrides, "loss.smooth=nan")
    output = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    assert result.returncode == 1
    assert (
        "error: non-finite training loss (nan) at epoch 0, step 0; batch cases: phantom_" in output
    )
    assert "Traceback" not in output


def test_unknown_action_is_a_config_error():
    with pytest.raises(ConfigError, match=r"callbacks\.nonfinite_loss\.action must be one of"):
        NonFiniteLossGuard("ignore")


def test_epoch_seed_depends_on_seed_epoch_and_rank_only():
    seeds = {EpochSeed(1).epoch_seed(e, r) for e in range(3) for r in range(2)}
    assert len(seeds) == 6
    assert EpochSeed(1).epoch_seed(2, 1) == EpochSeed(1).epoch_seed(2, 1)
    assert EpochSeed(2).epoch_seed(2, 1) != EpochSeed(1).epoch_seed(2, 1)
