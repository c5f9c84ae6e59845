"""A patch the network cannot train on is refused before any data is prepared or any training
starts (issue 12, item 9), with the keys to change."""

from .conftest import assert_clean_failure, run_script, tiny_data_overrides


def test_the_issue_patch_with_the_default_network_is_refused_before_training(
    tmp_path, phantom_root
):
    # As the issue's user typed it (data.patch_size=[32,32,16], model=resse_unet_tiny with 5
    # stages), on the tiny phantom, in bf16 on the CPU (the default where the CPU has bf16).
    data = [o for o in tiny_data_overrides(tmp_path, phantom_root) if "patch_size" not in o]
    result = run_script(
        "train.py",
        "data.patch_size=[32,32,16]",
        *data,
        "trainer.precision=bf16-mixed",
        f"paths.output_dir={tmp_path / 'run'}",
    )
    line = assert_clean_failure(
        result,
        "stage 'segmentation': data.patch_size=[32, 32, 16] with model.num_stages=5",
        "gives a bottleneck of [2, 2, 1] voxels and feature maps 2 voxels deep along the first",
        "use data.patch_size=[48, 32, 16] or model.num_stages=4 (bottleneck [4, 4, 2])",
        "trainer.precision=32-true",
    )
    assert "non-finite" not in line
    # Refused before the cache is prepared or anything trains.
    assert not (tmp_path / "data" / "cache").exists()
    assert not list((tmp_path / "run").rglob("*.ckpt"))
