"""Every config composes; every experiment instantiates and trains with fast_dev_run."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from medseg import pipeline
from medseg.module import build_module

from .conftest import CONFIG_DIR, SHARED_DATA, TINY_MODEL, compose_config, tiny_data_overrides

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
GROUPS = [
    "data",
    "model",
    "stage",
    "loss",
    "trainer",
    "callbacks",
    "logger",
    "prediction",
    "evaluation",
    "debug",
    "hparams_search",
]
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONFIG_DIR / group).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_group_option_composes_and_resolves(group, option, tmp_path):
    overrides = [f"{group}={option}", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}"]
    if group == "data":
        overrides.append(f"data.root={tmp_path}")
    cfg = compose_config("train", overrides)
    OmegaConf.resolve(cfg)
    assert OmegaConf.missing_keys(cfg) == set()


def test_eval_config_composes(tmp_path):
    cfg = compose_config(
        "eval", [f"ckpt_path={tmp_path}/x.ckpt", f"paths.root_dir={tmp_path}", "paths.output_dir=."]
    )
    OmegaConf.resolve(cfg)
    assert cfg.task_name == "eval" and cfg.data.root == f"{tmp_path}/data/phantom"


def test_predict_config_composes(tmp_path):
    overrides = [f"ckpt_path={tmp_path}/x.ckpt", f"input={tmp_path}"]
    paths = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run"]
    cfg = compose_config("predict", [*overrides, *paths])
    OmegaConf.resolve(cfg)
    assert cfg.output == f"{tmp_path}/run/predictions"
    assert cfg.prediction.precision in ("32-true", "bf16-mixed", "16-mixed")


def test_there_are_experiments():
    assert {"phantom_resse_m", "liver_cascade", "brats_cascade"} <= set(EXPERIMENTS)


def experiment_overrides(experiment: str, root: Path, data_root: Path) -> list[str]:
    """The experiment on the tiny phantom, with patches large enough for a total stride of 32
    (in-plane patches for 2D experiments); experiments on real data keep their data (from
    ../shared/data) with a short trainer."""
    cfg = compose_config("train", [f"experiment={experiment}", f"paths.root_dir={root}"])
    if "phantom" in cfg.data:
        data = tiny_data_overrides(root, data_root)
        patch = "[32,32]" if cfg.data.slice_axis is not None else "[64,64,32]"
        return [f"experiment={experiment}", *data, f"data.patch_size={patch}"]
    real_root = SHARED_DATA / Path(cfg.data.root).name
    if not real_root.is_dir():
        pytest.skip(f"experiment {experiment} needs {real_root}, which is absent")
    return [
        f"experiment={experiment}",
        f"paths.root_dir={root}",
        f"data.root={real_root}",
        "data.preprocess.spacing=[4,4,4]",
        "data.patch_size=[32,32,32]",
        "data.num_workers=0",
        "data.samples_per_volume=1",
        "data.queue_length=2",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        *TINY_MODEL,
    ]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_instantiates(experiment, tmp_path, phantom_root):
    overrides = experiment_overrides(experiment, tmp_path, phantom_root)
    cfg = compose_config("train", [*overrides, f"paths.output_dir={tmp_path}/run"])
    datamodule = instantiate(cfg.data)
    module = build_module(
        cfg.model,
        cfg.stage,
        cfg.loss,
        datamodule.in_channels,
        datamodule.dataset.labels,
        datamodule.patch_size,
        slice_axis=datamodule.slice_axis,
    )
    assert module.class_names[0] == "background"
    # Every stage gets epochs within the experiment's own budget.
    own = compose_config("train", [f"experiment={experiment}", f"paths.root_dir={tmp_path}"])
    module.cascade.check_epochs(own.trainer.max_epochs)
    trainer = instantiate(cfg.trainer)
    assert trainer.max_epochs == 1


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(experiment, tmp_path, phantom_root):
    overrides = [*experiment_overrides(experiment, tmp_path, phantom_root), "debug=fast_dev_run"]
    cfg = compose_config("train", [*overrides, f"paths.output_dir={tmp_path}/run"])
    metrics = pipeline.train(cfg)
    assert 0 <= metrics["test/dice_mean"] <= 1
    assert (Path(cfg.paths.output_dir) / "test_metrics.csv").is_file()
