"""Checkpoints: atomic writes, weights-only loading, tampering refused, config mismatches named."""

import errno
import os
from pathlib import Path

import pytest
import torch

from medseg import pipeline
from medseg.checkpoints import (
    AtomicCheckpointIO,
    check_compatible,
    load_checkpoint,
    load_module,
)
from medseg.errors import ConfigError, DataError

from .conftest import compose_config, run_script, tiny_overrides


class RunsCode:
    """A pickled object that runs a shell command when unpickled (a malicious checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def tampered_checkpoint(trained_run, tmp_path) -> tuple[Path, Path]:
    """A copy of a real checkpoint with a code-running object added; and the marker it writes."""
    _, run, _ = trained_run
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    marker = tmp_path / "pwned"
    checkpoint["hyper_parameters"]["extra"] = RunsCode(marker)
    path = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def test_a_checkpoint_with_a_pickled_callable_is_refused(tampered_checkpoint):
    path, marker = tampered_checkpoint
    with pytest.raises(DataError, match=r"refused to load.*pickled Python object \(posix.system\)"):
        load_checkpoint(path)
    assert not marker.exists()


def test_eval_refuses_a_tampered_checkpoint_with_one_message(
    tampered_checkpoint, tmp_path, phantom_root
):
    path, marker = tampered_checkpoint
    overrides = [o for o in tiny_overrides(tmp_path, phantom_root) if o.startswith("data.")]
    result = run_script("eval.py", f"ckpt_path={path}", f"paths.root_dir={tmp_path}", *overrides)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "refused to load: the checkpoint contains a pickled Python object" in output
    assert "Traceback" not in output
    assert not marker.exists()


def test_resuming_from_a_tampered_checkpoint_is_refused(
    tampered_checkpoint, tmp_path, phantom_root
):
    path, marker = tampered_checkpoint
    cfg = compose_config("train", [*tiny_overrides(tmp_path, phantom_root), f"ckpt_path={path}"])
    with pytest.raises(DataError, match="refused to load"):
        pipeline.train(cfg)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_a_clear_error(trained_run, tmp_path):
    _, run, _ = trained_run
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes()[:4096])
    with pytest.raises(DataError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(truncated)


def test_resuming_with_a_different_network_names_the_keys(trained_run, tmp_path, phantom_root):
    _, run, _ = trained_run
    overrides = [*tiny_overrides(tmp_path, phantom_root), "model.width=8", "model.se=false"]
    cfg = compose_config("train", [*overrides, f"ckpt_path={run}/checkpoints/last.ckpt"])
    with pytest.raises(ConfigError) as error:
        pipeline.train(cfg)
    message = str(error.value)
    assert "was trained with a different config" in message
    assert "model.width: checkpoint has 4, config has 8" in message
    assert "model.se: checkpoint has True, config has False" in message


def test_labels_and_channels_are_checked_against_the_data(trained_run):
    _, run, _ = trained_run
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    check_compatible(checkpoint, {"in_channels": 1}, "x.ckpt")
    with pytest.raises(ConfigError) as error:
        check_compatible(
            checkpoint, {"dataset_labels": {0: "background", 1: "liver"}, "in_channels": 2}, "x"
        )
    assert "data.labels.2: checkpoint has 'lesion', config has None" in str(error.value)
    assert "data (image channels): checkpoint has 1, config has 2" in str(error.value)


def test_stage_settings_newer_than_the_checkpoint_take_their_defaults(trained_run):
    _, run, _ = trained_run
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    current = [dict(s) for s in checkpoint["hyper_parameters"]["stages"]]
    older = [
        {k: v for k, v in s.items() if k not in ("downsample", "min_component_mm3")}
        for s in current
    ]
    checkpoint["hyper_parameters"]["stages"] = older
    check_compatible(checkpoint, {"stages": current}, "x.ckpt")
    with pytest.raises(ConfigError, match=r"stage.stages.0.downsample: checkpoint has None"):
        check_compatible(checkpoint, {"stages": [{**current[0], "downsample": [2, 2, 1]}]}, "x")


def test_preprocess_settings_newer_than_the_checkpoint_take_their_defaults(trained_run):
    _, run, _ = trained_run
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    current = dict(checkpoint["hyper_parameters"]["preprocess"])
    older = {k: v for k, v in current.items() if k not in ("nonfinite", "nonfinite_value")}
    checkpoint["hyper_parameters"]["preprocess"] = older
    check_compatible(checkpoint, {"preprocess": {**current, "nonfinite": "error"}}, "x.ckpt")
    replacing = {**current, "nonfinite": "replace", "nonfinite_value": -1024}
    with pytest.raises(ConfigError, match=r"data.preprocess.nonfinite: checkpoint has 'error'"):
        check_compatible(checkpoint, {"preprocess": replacing}, "x.ckpt")


def test_other_differences_are_warnings(trained_run, caplog):
    _, run, _ = trained_run
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    loss = {**checkpoint["hyper_parameters"]["loss"], "dice_weight": 0.5}
    check_compatible(checkpoint, {"loss": loss}, "x.ckpt")
    assert "loss.dice_weight: checkpoint has 1.0, config has 0.5" in caplog.text


def test_a_failed_checkpoint_write_leaves_the_previous_file_intact(
    trained_run, tmp_path, monkeypatch
):
    _, run, _ = trained_run
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint, target)
    before = target.read_bytes()

    def disk_full(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    changed = {**checkpoint, "global_step": checkpoint["global_step"] + 1}
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint(changed, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    monkeypatch.undo()
    assert load_module(target).class_names == ["background", "liver", "lesion"]
