"""Training a cascade: the stage schedule freezes what it says; fine-tuning changes only the
stages it names; metrics are logged per stage and for the composed result."""

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from medseg.data.cascade import prediction_mask_paths
from medseg.data.cases import discover_cases
from medseg.module import build_module
from medseg.prediction import Predictor, load_checkpoint, predict_cases

from .conftest import compose_config, tiny_overrides


class Snapshots(L.Callback):
    """Weights of each stage network at the start and end of every training epoch."""

    def __init__(self):
        self.weights: dict[tuple[str, int], dict[str, dict[str, torch.Tensor]]] = {}
        self.requires_grad: dict[int, dict[str, bool]] = {}

    def _take(self, module) -> dict[str, dict[str, torch.Tensor]]:
        return {
            name: {k: v.detach().clone() for k, v in net.state_dict().items()}
            for name, net in module.nets.items()
        }

    def on_train_epoch_start(self, trainer, module):
        self.weights["start", trainer.current_epoch] = self._take(module)

    def on_train_batch_end(self, trainer, module, *args):
        self.requires_grad[trainer.current_epoch] = {
            name: all(p.requires_grad for p in net.parameters())
            for name, net in module.nets.items()
        }

    def on_train_epoch_end(self, trainer, module):
        self.weights["end", trainer.current_epoch] = self._take(module)


# binary_first's lesion stage takes 64x64x32 of each patch: too much of the tiny one (32x32x16)
LESION_PATCH = "stage.stages.1.patch_size=[16,16,8]"


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def fit(tmp_path, phantom_root, extra: list[str], max_epochs: int) -> tuple:
    overrides = [
        *tiny_overrides(tmp_path, phantom_root),
        "stage=binary_first",
        LESION_PATCH,
        *extra,
    ]
    overrides += [f"trainer.max_epochs={max_epochs}", "trainer.check_val_every_n_epoch=100"]
    cfg = compose_config("train", overrides)
    datamodule = instantiate(cfg.data)
    module = build_module(
        cfg.model,
        cfg.stage,
        cfg.loss,
        datamodule.in_channels,
        datamodule.dataset.labels,
        datamodule.patch_size,
        finetune=OmegaConf.to_container(cfg.finetune),
    )
    datamodule.attach_cascade(module.cascade, OmegaConf.to_container(cfg.stage.training_masks))
    snapshots = Snapshots()
    trainer = instantiate(
        cfg.trainer, callbacks=[snapshots], logger=False, enable_checkpointing=False
    )
    trainer.fit(module, datamodule=datamodule)
    return module, trainer, snapshots


def test_stage_schedule_freezes_what_it_says(tmp_path, phantom_root):
    overrides = ["stage.stages.0.epochs=1", "stage.freeze_earlier=true"]
    _, _, snap = fit(tmp_path, phantom_root, overrides, max_epochs=2)
    w = snap.weights
    # Epoch 0: only the organ stage trains.
    assert not same(w["start", 0]["organ"], w["end", 0]["organ"])
    assert same(w["start", 0]["lesion"], w["end", 0]["lesion"])
    # Epoch 1: the lesion stage starts and the organ stage is frozen.
    assert same(w["end", 0]["organ"], w["end", 1]["organ"])
    assert not same(w["start", 1]["lesion"], w["end", 1]["lesion"])
    assert snap.requires_grad == {
        0: {"organ": True, "lesion": False},
        1: {"organ": False, "lesion": True},
    }


@pytest.fixture(scope="module")
def cascade_checkpoint(tmp_path_factory, phantom_root):
    tmp_path = tmp_path_factory.mktemp("ckpt")
    _, trainer, _ = fit(
        tmp_path, phantom_root, ["stage.freeze_earlier=false", "stage.stages.0.epochs=1"], 2
    )
    path = tmp_path / "cascade.ckpt"
    trainer.save_checkpoint(path)
    return path, torch.load(path, weights_only=True)["state_dict"]


def stage_weights(state: dict, stage: str) -> dict[str, torch.Tensor]:
    prefix = f"nets.{stage}."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize(
    ("extra", "changed"),
    [
        (["finetune.stages=[lesion]"], {"lesion"}),
        (["finetune.stages=[organ]"], {"organ"}),
        (["finetune.stages=all"], {"organ", "lesion"}),
        (["finetune.unfreeze_every=1"], {"lesion"}),  # one epoch: only the last stage yet
    ],
)
def test_finetuning_changes_only_the_named_stages(
    extra, changed, cascade_checkpoint, tmp_path, phantom_root
):
    path, state = cascade_checkpoint
    module, _, snap = fit(tmp_path, phantom_root, [f"finetune.ckpt_path={path}", *extra], 1)
    for stage in ("organ", "lesion"):
        assert same(snap.weights["start", 0][stage], stage_weights(state, stage))
        final = {k: v for k, v in module.nets[stage].state_dict().items()}
        assert same(final, stage_weights(state, stage)) == (stage not in changed), stage


def test_cascade_logs_stage_and_composed_metrics(tmp_path, phantom_root):
    from medseg import pipeline

    overrides = [
        *tiny_overrides(tmp_path, phantom_root),
        "experiment=liver_cascade",
        LESION_PATCH,
        "debug=fast_dev_run",
    ]
    metrics = pipeline.train(compose_config("train", overrides))
    expected = {
        "test/dice_liver",
        "test/dice_lesion",
        "test/dice_mean",
        "test/organ/dice_liver",
        "test/lesion/dice_lesion",
        "test/organ/dice_mean",
    }
    assert expected <= set(metrics)


def test_predicted_stage_masks_are_the_training_masks_layout(
    cascade_checkpoint, phantom_root, tmp_path
):
    path, _ = cascade_checkpoint
    case = discover_cases(phantom_root).cases[0]
    predictor = Predictor([load_checkpoint(path)], precision="32-true")
    run = predict_cases(predictor, [case], tmp_path, progress=False, save_stage_masks=True)
    found = prediction_mask_paths(tmp_path / "stages", ["organ"], [case.case_id])
    organ = nib.load(found[case.case_id]["organ"])
    labels = nib.load(run.written[case.case_id])
    source = nib.load(case.images[0])
    np.testing.assert_allclose(organ.affine, source.affine)
    assert organ.shape == source.shape
    organ_mask = np.asarray(organ.dataobj)
    assert set(np.unique(organ_mask)) <= {0, 1}
    # the composed map is the organ stage's foreground, split into liver and lesion
    np.testing.assert_array_equal(organ_mask > 0, np.asarray(labels.dataobj) > 0)
    lesion_file = tmp_path / "stages" / "lesion" / f"{case.case_id}.nii.gz"
    lesion = np.asarray(nib.load(lesion_file).dataobj)
    assert not np.any(lesion & ~organ_mask.astype(bool))
