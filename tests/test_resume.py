"""Exact resume: a run interrupted mid-epoch and resumed ends as the uninterrupted run did."""

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from medseg import pipeline
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


class SimulatedCrashError(Exception):
    pass


class CrashAt(KillAt):
    """Raise when training reaches (epoch, batch): an interruption inside this process."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            raise SimulatedCrashError


def interrupt(name: str) -> list[str]:
    """Overrides adding an interruption in the middle of epoch 1 (after epoch 0's checkpoint)."""
    return [
        f"+callbacks.interrupt._target_={__name__}.{name}",
        "+callbacks.interrupt.epoch=1",
        "+callbacks.interrupt.batch=1",
    ]


def assert_same_run(expected_dir: Path, actual_dir: Path) -> None:
    expected = torch.load(expected_dir / "checkpoints" / "last.ckpt", weights_only=True)
    actual = torch.load(actual_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert actual["global_step"] == expected["global_step"] == 4
    for name, weights in expected["state_dict"].items():
        torch.testing.assert_close(actual["state_dict"][name], weights, atol=1e-6, rtol=0)
    test_metrics = "test_metrics.csv"
    assert (actual_dir / test_metrics).read_text() == (expected_dir / test_metrics).read_text()


@pytest.fixture
def deterministic_algorithms():
    yield
    torch.use_deterministic_algorithms(False)  # trainer.deterministic=true sets it process-wide


def test_interrupted_and_resumed_run_equals_uninterrupted_run(
    tmp_path, phantom_root, deterministic_algorithms
):
    def config(name: str, *extra: str):
        overrides = tiny_overrides(tmp_path / name, phantom_root)
        return compose_config("train", [*overrides, *DETERMINISTIC, *extra])

    pipeline.train(config("whole"))
    with pytest.raises(SimulatedCrashError):
        pipeline.train(config("cut", *interrupt("CrashAt")))
    saved = torch.load(tmp_path / "cut/run/checkpoints/last.ckpt", weights_only=True)
    assert saved["epoch"] == 0  # the interruption came mid-way through epoch 1
    pipeline.train(config("cut", "resume=true"))
    assert_same_run(tmp_path / "whole/run", tmp_path / "cut/run")


@pytest.mark.slow
def test_killed_process_resumes_exactly(tmp_path, phantom_root):
    def train(run_dir: Path, *extra: str):
        overrides = [o for o in tiny_overrides(tmp_path, phantom_root) if "output_dir" not in o]
        env = {"PYTHONPATH": str(REPO)}
        run = [*overrides, *DETERMINISTIC, f"hydra.run.dir={run_dir}", *extra]
        return run_script("train.py", *run, env=env)

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train(whole).returncode == 0
    assert train(cut, *interrupt("KillAt")).returncode == -signal.SIGKILL
    resumed = train(cut, "resume=true")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {cut}/checkpoints/last.ckpt" in (cut / "train.log").read_text()
    assert_same_run(whole, cut)


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
