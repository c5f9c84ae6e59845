"""Bad checkpoints: crafted `_target_`s and interpolations are refused before anything runs,
and files that are no checkpoint at all say so. Every crafted checkpoint is the `trained_run`
fixture's own, edited; its payload would write a file (``pwned``) if it were ever built."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from medseg import pipeline
from medseg.checkpoints import load_checkpoint
from medseg.errors import ConfigError, DataError
from medseg.module import SegmentationModule
from medseg.trusted import KINDS, check_trusted

from .conftest import (
    assert_clean_failure,
    compose_config,
    eval_overrides,
    run_script,
    tiny_overrides,
)

WRITE_TEXT = "pathlib.Path.write_text"


def write_file(marker: Path, partial: bool = False) -> dict:
    """A `_target_` config that writes `marker` when Hydra builds it."""
    payload = {
        "_target_": WRITE_TEXT,
        "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}, "pwned"],
    }
    return {**payload, "_partial_": True} if partial else payload


def add_task_loss(hparams: dict, loss: dict) -> None:
    hparams["stages"][0]["tasks"] = [{"name": "size", "type": "regression", "loss": loss}]


# name -> (edit of the hyperparameters given the marker path, refused key, refused value)
ATTACKS: dict[str, tuple[Callable[[dict, Path], None], str, str]] = {
    "loss": (lambda h, m: h.update(loss=write_file(m)), "loss._target_", WRITE_TEXT),
    "optimizer": (
        lambda h, m: h.update(optimizer=write_file(m, partial=True)),
        "optimizer._target_",
        WRITE_TEXT,
    ),
    "scheduler": (
        lambda h, m: h.update(scheduler=write_file(m, partial=True)),
        "scheduler._target_",
        WRITE_TEXT,
    ),
    "task_loss": (
        lambda h, m: add_task_loss(h, write_file(m)),
        "stages[0].tasks[0].loss._target_",
        WRITE_TEXT,
    ),
    "stage_optim": (
        lambda h, m: h["stages"][0].update(optim={"optimizer": write_file(m, partial=True)}),
        "stages[0].optim.optimizer._target_",
        WRITE_TEXT,
    ),
    "nested_kwarg": (
        lambda h, m: h["loss"].update(dice_weight=write_file(m)),
        "loss.dice_weight._target_",
        WRITE_TEXT,
    ),
    "nested_args": (
        lambda h, m: h["loss"].update(_args_=[write_file(m)]),
        "loss._args_[0]._target_",
        WRITE_TEXT,
    ),
    # eval passes the checkpoint's preprocessing to instantiate(cfg.data, preprocess=...)
    "preprocess": (
        lambda h, m: h["preprocess"].update(intensity=write_file(m)),
        "preprocess.intensity._target_",
        WRITE_TEXT,
    ),
    "interpolation": (
        lambda h, m: h["loss"].update(smooth="${oc.env:HOME}"),
        "loss.smooth",
        "${oc.env:HOME}",
    ),
    "attribute_chain": (
        lambda h, m: h["optimizer"].update(_target_="torch.optim.SGD.__init__"),
        "optimizer._target_",
        "torch.optim.SGD.__init__",
    ),
}


@pytest.fixture(scope="module")
def good_checkpoint(trained_run) -> Path:
    return trained_run[1] / "checkpoints" / "last.ckpt"


def craft(good: Path, folder: Path, attack: str) -> tuple[Path, Path]:
    """A copy of `good` with `attack` in its hyperparameters; and the file its payload writes."""
    edit = ATTACKS[attack][0]
    checkpoint = torch.load(good, weights_only=True)
    marker = folder / f"pwned_by_{attack}"
    edit(checkpoint["hyper_parameters"], marker)
    path = folder / f"{attack}.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def refusal(path: Path, attack: str) -> tuple[str, str]:
    """The fragments the one-line refusal of `attack` holds: the file, the key and value."""
    _, key, value = ATTACKS[attack]
    return f"{path}: refused: hyper_parameters.{key} is {value!r}", "tampered with"


# -- the allowlist -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        ("medseg.losses.DiceCELoss", "loss"),
        ("torch.nn.CrossEntropyLoss", "loss"),
        ("torch.nn.SmoothL1Loss", "loss"),
        ("torch.optim.SGD", "optimizer"),
        ("torch.optim.AdamW", "optimizer"),
        ("medseg.schedulers.polynomial", "scheduler"),
        ("medseg.schedulers.cosine", "scheduler"),
        ("torch.optim.lr_scheduler.CosineAnnealingLR", "scheduler"),
        ("torch.optim.lr_scheduler.ReduceLROnPlateau", "scheduler"),
    ],
)
def test_the_allowlist_allows_what_medseg_builds(target, kind):
    assert KINDS[kind].allows(target)
    check_trusted({"_target_": target}, kind, kind)


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        (WRITE_TEXT, "loss"),
        ("os.system", "loss"),
        ("builtins.exec", "optimizer"),
        ("subprocess.run", "scheduler"),
        ("torch.load", "loss"),
        ("torch.optim.SGD.__init__", "optimizer"),
        ("torch.nn.functional.cross_entropy", "loss"),  # a function, not a module class
        ("medseg.losses.deep_supervision_loss", "loss"),  # an allowed module, not a loss
        ("medseg.losses.F", "loss"),  # an imported module
        ("medseg.utils.io.atomic_write_text", "loss"),
        ("torch.optim.lr_scheduler.LambdaLR", "optimizer"),  # the wrong kind
        ("torch.optim.SGD", "scheduler"),
        ("torch.optim._functional", "optimizer"),
        ("torch.optim", "optimizer"),
        ("SGD", "optimizer"),
        ("", "loss"),
    ],
)
def test_the_allowlist_refuses_everything_else(target, kind):
    assert not KINDS[kind].allows(target)
    with pytest.raises(ConfigError) as error:
        check_trusted({"_target_": target, "lr": 0.1}, kind, f"model.{kind}")
    assert str(error.value).startswith(f"model.{kind}._target_: {target!r} is not a")
    assert f"{kind} medseg can build (allowed: " in str(error.value)


def test_targets_are_checked_everywhere_in_a_config_before_any_import():
    nested = {"_target_": "torch.nn.Sequential", "_args_": [{"_target_": "os.system"}]}
    with pytest.raises(ConfigError, match=r"^loss._args_\[0\]._target_: 'os.system' is not a loss"):
        check_trusted(nested, "loss", "loss")
    with pytest.raises(ConfigError, match=r"^loss.weight._target_: 12 is not a loss"):
        check_trusted({"_target_": "torch.nn.MSELoss", "weight": {"_target_": 12}}, "loss", "loss")
    with pytest.raises(ConfigError, match=r"^loss.smooth: '\$\{oc.env:HOME\}' is an interpolation"):
        check_trusted({"_target_": "torch.nn.MSELoss", "smooth": "${oc.env:HOME}"}, "loss", "loss")


# -- checkpoints: refused before anything is built -------------------------------------------


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_crafted_checkpoint_is_refused_naming_the_key_and_target(
    attack, good_checkpoint, tmp_path
):
    path, marker = craft(good_checkpoint, tmp_path, attack)
    with pytest.raises(DataError) as error:
        load_checkpoint(path)
    assert all(fragment in str(error.value) for fragment in refusal(path, attack))
    # Built directly from the hyperparameters, bypassing load_checkpoint, it is refused too.
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]
    if attack != "preprocess":  # the module never builds its preprocessing settings
        with pytest.raises(ConfigError):
            SegmentationModule(**hparams)
    assert not marker.exists()


def test_the_unedited_checkpoint_loads(good_checkpoint):
    assert load_checkpoint(good_checkpoint)["hyper_parameters"]["loss"]["_target_"] == (
        "medseg.losses.DiceCELoss"
    )


def test_resume_true_refuses_a_crafted_last_checkpoint(good_checkpoint, tmp_path, phantom_root):
    cfg = compose_config("train", [*tiny_overrides(tmp_path, phantom_root), "resume=true"])
    run = Path(cfg.paths.output_dir)
    (run / "checkpoints").mkdir(parents=True)
    path, marker = craft(good_checkpoint, run / "checkpoints", "scheduler")
    path.rename(run / "checkpoints" / "last.ckpt")
    with pytest.raises(DataError) as error:
        pipeline.train(cfg)
    assert all(
        f in str(error.value) for f in refusal(run / "checkpoints" / "last.ckpt", "scheduler")
    )
    assert not marker.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]


def test_predict_refuses_a_crafted_checkpoint_and_writes_nothing(
    good_checkpoint, tmp_path, phantom_root
):
    path, marker = craft(good_checkpoint, tmp_path, "loss")
    image = phantom_root / "imagesTr" / "phantom_000.nii.gz"
    output = tmp_path / "out"
    result = run_script(
        "predict.py",
        f"ckpt_path={path}",
        f"input={image}",
        f"output={output}",
        f"paths.root_dir={tmp_path}",
    )
    assert_clean_failure(result, *refusal(path, "loss"))
    assert not marker.exists()
    assert not list(output.rglob("*.nii.gz"))


def test_eval_refuses_an_ensemble_with_one_crafted_member(good_checkpoint, tmp_path, phantom_root):
    path, marker = craft(good_checkpoint, tmp_path, "preprocess")
    result = run_script(
        "eval.py",
        f"ckpt_path=[{good_checkpoint},{path}]",
        *eval_overrides(tmp_path, phantom_root),
    )
    assert_clean_failure(result, *refusal(path, "preprocess"))
    assert not marker.exists()
    assert not (tmp_path / "run" / "test_metrics.csv").exists()


def test_train_refuses_to_resume_from_a_crafted_checkpoint(good_checkpoint, tmp_path, phantom_root):
    path, marker = craft(good_checkpoint, tmp_path, "optimizer")
    result = run_script("train.py", *tiny_overrides(tmp_path, phantom_root), f"ckpt_path={path}")
    assert_clean_failure(result, *refusal(path, "optimizer"))
    assert not marker.exists()
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_train_refuses_to_finetune_from_a_crafted_checkpoint(
    good_checkpoint, tmp_path, phantom_root
):
    path, marker = craft(good_checkpoint, tmp_path, "task_loss")
    overrides = [*tiny_overrides(tmp_path, phantom_root), f"finetune.ckpt_path={path}"]
    with pytest.raises(DataError) as error:
        pipeline.train(compose_config("train", overrides))
    assert all(fragment in str(error.value) for fragment in refusal(path, "task_loss"))
    assert not marker.exists()
    assert not list((tmp_path / "run").rglob("*.ckpt"))


# -- training from the user's own config: the same rules -------------------------------------


@pytest.mark.parametrize(
    ("key", "target"),
    [
        ("loss", WRITE_TEXT),
        ("model.optimizer", "torch.optim.SGD.__init__"),
        ("model.scheduler", "os.system"),
    ],
)
def test_train_refuses_a_config_target_outside_the_allowlist(key, target, tmp_path, phantom_root):
    cfg = compose_config(
        "train", [*tiny_overrides(tmp_path, phantom_root), f"{key}._target_={target}"]
    )
    with pytest.raises(ConfigError, match=rf"^{key}._target_: '{target}' is not a"):
        pipeline.train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_stage_optim_override_is_checked_with_its_key(tmp_path, phantom_root):
    cfg = compose_config("train", tiny_overrides(tmp_path, phantom_root))
    stages = OmegaConf.to_container(cfg.stage.stages)
    stages[0]["optim"] = {"scheduler": {"_target_": "builtins.exec", "_partial_": True}}
    cfg.stage.stages = stages
    key = re.escape("stage.stages[0].optim.scheduler._target_")
    with pytest.raises(ConfigError, match=rf"^{key}: 'builtins.exec' is not a scheduler"):
        pipeline.train(cfg)


# -- files that are no checkpoint -------------------------------------------------------------


def test_files_that_are_no_checkpoint_say_so(good_checkpoint, tmp_path, phantom_root):
    text = tmp_path / "notes.ckpt"
    text.write_text("these are not the weights you are looking for\n")
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(bytes(range(7, 256)))
    image = phantom_root / "imagesTr" / "phantom_000.nii.gz"
    expected = {
        text: "it starts with b'thes'",
        empty: "an empty file",
        noise: "it starts with b'\\x07\\x08\\t\\n'",
        image: "it starts with b'\\x1f\\x8b",
        tmp_path: "a folder",
    }
    for path, what in expected.items():
        with pytest.raises(DataError) as error:
            load_checkpoint(path)
        assert str(error.value).startswith(f"{path}: not a PyTorch checkpoint ({what}")
    weights = torch.load(good_checkpoint, weights_only=True)["state_dict"]
    torch.save(weights, tmp_path / "weights.pt")
    with pytest.raises(DataError, match="not a medseg checkpoint"):
        load_checkpoint(tmp_path / "weights.pt")


def test_predict_with_a_text_file_as_checkpoint_says_it_is_not_one(tmp_path, phantom_root):
    text = tmp_path / "model.ckpt"
    text.write_text("https://example.org/model.ckpt\n")
    image = phantom_root / "imagesTr" / "phantom_000.nii.gz"
    overrides = [f"ckpt_path={text}", f"input={image}", f"paths.root_dir={tmp_path}"]
    with pytest.raises(DataError) as error:
        pipeline.predict(compose_config("predict", [*overrides, f"output={tmp_path / 'out'}"]))
    assert str(error.value).startswith(f"{text}: not a PyTorch checkpoint (it starts with b'http'")
    assert "tampered" not in str(error.value) and "pickled" not in str(error.value)
    assert not list((tmp_path / "out").rglob("*.nii.gz"))
