"""Shared fixtures: a tiny phantom and tiny, fast training configs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from medseg import pipeline
from medseg.data.datamodule import SegmentationDataModule
from medseg.data.phantom import write_phantom_dataset
from medseg.utils.config import register_resolvers

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"

TINY_PHANTOM = {"num_cases": 8, "seed": 0, "shape": [48, 48, 16], "spacing": [2.5, 2.5, 7.5]}

register_resolvers()


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """An 8-case 48x48x16 phantom shared by the session (generated once)."""
    root = tmp_path_factory.mktemp("data") / "phantom"
    return write_phantom_dataset(root, **TINY_PHANTOM)


def tiny_datamodule(root: Path, **settings) -> SegmentationDataModule:
    """A datamodule over `root` with small patches, batches and queue, in-process loading, a
    2-fold split and no augmentation; `settings` override any argument."""
    defaults = {
        "root": root,
        "preprocess": {"intensity": {"mode": "ct_window", "window": [-160, 240]}},
        "patch_size": (32, 32, 16),
        "batch_size": 2,
        "samples_per_volume": 2,
        "queue_length": 4,
        "num_workers": 0,
        "num_folds": 2,
        "test_fraction": 0.25,
        "augmentation": "none",
    }
    return SegmentationDataModule(**(defaults | settings))


def tiny_data_overrides(root: Path, data_root: Path) -> list[str]:
    """Paths into `root`, the tiny phantom, small patches and a short CPU trainer."""
    shape = ",".join(map(str, TINY_PHANTOM["shape"]))
    spacing = ",".join(map(str, TINY_PHANTOM["spacing"]))
    return [
        f"paths.root_dir={root}",
        f"data.root={data_root}",
        f"data.phantom.num_cases={TINY_PHANTOM['num_cases']}",
        f"data.phantom.shape=[{shape}]",
        f"data.phantom.spacing=[{spacing}]",
        "data.preprocess.spacing=null",
        "data.patch_size=[32,32,16]",
        "data.samples_per_volume=2",
        "data.queue_length=4",
        "data.num_workers=0",
        "data.num_folds=2",
        "data.test_fraction=0.25",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.check_val_every_n_epoch=1",
        "trainer.log_every_n_steps=1",
        "+trainer.limit_train_batches=2",
        "+trainer.enable_model_summary=false",
    ]


TINY_MODEL = [
    "model.width=4",
    "model.max_features=16",
    "model.num_stages=3",
    "model.blocks_per_stage=[1,1,1]",
]


def tiny_overrides(root: Path, data_root: Path) -> list[str]:
    """Overrides that make a full train/val/test run take seconds on a CPU."""
    return [*tiny_data_overrides(root, data_root), *TINY_MODEL, f"paths.output_dir={root}/run"]


def eval_overrides(root: Path, data_root: Path) -> list[str]:
    """The tiny phantom's data settings, without the training-only ones (for eval)."""
    skipped = ("model.", "trainer.", "+trainer.")
    return [o for o in tiny_overrides(root, data_root) if not o.startswith(skipped)]


def compose_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, phantom_root) -> tuple[DictConfig, Path, dict[str, float]]:
    """One tiny training run shared by the session: (config, run folder, final metrics)."""
    root = tmp_path_factory.mktemp("train")
    cfg = compose_config("train", tiny_overrides(root, phantom_root))
    metrics = pipeline.train(cfg)
    return cfg, Path(cfg.paths.output_dir), metrics


@pytest.fixture
def tiny_train_cfg(tmp_path, phantom_root) -> DictConfig:
    return compose_config("train", tiny_overrides(tmp_path, phantom_root))


def run_script(
    script: str, *args: str, cwd: Path = REPO, timeout: int = 600, env: dict | None = None
):
    """Run one of src/*.py (or ``scripts/x.py``) as a user would (extra environment variables
    in `env`)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    path = REPO / script if "/" in script else REPO / "src" / script
    return subprocess.run(
        [sys.executable, str(path), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """A command that failed as medseg promises: exit status 1, no traceback, and one line of
    its output holding every fragment (the file and the problem). Returns that line."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, f"exit status {result.returncode}:\n{output}"
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if all(f in line for f in fragments)]
    assert lines, f"no line names all of {fragments}:\n{output}"
    return lines[0]
