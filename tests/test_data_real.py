"""Training on real data from ../shared/data, arranged as an MSD folder of symlinks."""

import csv
import json
from pathlib import Path

import pytest

from medseg import pipeline

from .conftest import SHARED_DATA, TINY_MODEL, compose_config

CT = SHARED_DATA / "totalseg_ct" / "ct_sm"


@pytest.fixture
def totalseg_msd(tmp_path) -> Path:
    """Four case ids pointing at the one real CT with its liver mask (enough for a split)."""
    if not (CT / "example_ct_sm.nii.gz").is_file():
        pytest.skip(f"real CT data not found at {CT}")
    root = tmp_path / "TotalSegLiver"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(4):
        (root / "imagesTr" / f"ct_{i}_0000.nii.gz").symlink_to(CT / "example_ct_sm.nii.gz")
        (root / "labelsTr" / f"ct_{i}.nii.gz").symlink_to(CT / "example_seg_liver.nii.gz")
    meta = {"labels": {"0": "background", "1": "liver"}, "channel_names": {"0": "CT"}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_data_trains_on_real_ct(totalseg_msd, tmp_path):
    overrides = [
        "data=msd",
        f"data.root={totalseg_msd}",
        "data.preprocess.intensity.mode=ct_window",
        "+data.preprocess.intensity.window=[-160,240]",
        "data.patch_size=[32,32,16]",
        "data.num_workers=0",
        "data.num_folds=2",
        "data.test_fraction=0.25",
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path}/run",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.check_val_every_n_epoch=1",
        "+trainer.limit_train_batches=2",
        *TINY_MODEL,
    ]
    metrics = pipeline.train(compose_config("train", overrides))
    assert "val/dice_liver" in metrics
    with (tmp_path / "run" / "test_metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["case_id"].startswith("ct_")
    # The liver label of the real CT: 10.5 % of 122*101*30 voxels of 27 mm^3.
    assert float(rows[0]["volume_ml_reference_liver"]) == pytest.approx(
        0.10451 * 122 * 101 * 30 * 27 / 1000, rel=1e-3
    )
