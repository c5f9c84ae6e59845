"""Exact resume: a run killed mid-epoch and resumed ends with the uninterrupted run's weights."""

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from medseg.errors import ConfigError
from medseg.pipeline import _resume_checkpoint
from medseg.utils.instantiate import instantiate_callbacks

from .conftest import REPO, compose_config, run_script, tiny_overrides

DETERMINISTIC = [
    "trainer.max_epochs=2",
    "trainer.deterministic=true",
    "callbacks.rich_progress_bar=null",
]


class KillAt(L.Callback):
    """SIGKILL this process when training reaches (epoch, batch): no cleanup, like a lost node."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGKILL)


def train(root: Path, data: Path, run_dir: Path, *extra: str):
    overrides = [o for o in tiny_overrides(root, data) if "output_dir" not in o]
    return run_script(
        "train.py",
        *overrides,
        *DETERMINISTIC,
        f"hydra.run.dir={run_dir}",
        *extra,
        env={"PYTHONPATH": str(REPO)},
    )


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, phantom_root):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train(tmp_path, phantom_root, whole).returncode == 0
    kill = [
        f"+callbacks.kill._target_={__name__}.KillAt",
        "+callbacks.kill.epoch=1",
        "+callbacks.kill.batch=1",
    ]
    killed = train(tmp_path, phantom_root, cut, *kill)
    assert killed.returncode == -signal.SIGKILL
    saved = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 0  # the kill came mid-way through epoch 1
    resumed = train(tmp_path, phantom_root, cut, "resume=true")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {cut}/checkpoints/last.ckpt" in (cut / "train.log").read_text()

    expected = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    actual = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)
    assert actual["global_step"] == expected["global_step"] == 4
    for name, weights in expected["state_dict"].items():
        torch.testing.assert_close(actual["state_dict"][name], weights, atol=1e-6, rtol=0)
    assert (cut / "test_metrics.csv").read_text() == (whole / "test_metrics.csv").read_text()


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, phantom_root):
    cfg = compose_config("train", [*tiny_overrides(tmp_path, phantom_root), "resume=true"])
    callbacks = instantiate_callbacks(cfg.callbacks)
    assert _resume_checkpoint(cfg, callbacks) is None
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.touch()
    assert _resume_checkpoint(cfg, callbacks) == last
    explicit = OmegaConf.merge(cfg, {"ckpt_path": str(tmp_path / "other.ckpt")})
    assert _resume_checkpoint(explicit, callbacks) == tmp_path / "other.ckpt"
    with pytest.raises(ConfigError, match="resume=true needs the last_checkpoint callback"):
        _resume_checkpoint(cfg, [])
