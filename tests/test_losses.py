import math

import pytest
import torch
import torch.nn.functional as F

from medseg.losses import (
    DiceCELoss,
    deep_supervision_loss,
    deep_supervision_weights,
    soft_dice_loss,
)


def one_hot_logits(label: torch.Tensor, num_classes: int, scale: float = 100.0) -> torch.Tensor:
    return scale * F.one_hot(label[:, 0], num_classes).movedim(-1, 1).float()


def test_dice_loss_is_zero_for_a_perfect_prediction():
    label = torch.randint(0, 3, (2, 1, 8, 8, 8))
    assert soft_dice_loss(one_hot_logits(label, 3), label).item() == pytest.approx(0, abs=1e-4)


def test_dice_loss_on_hand_made_masks():
    # Class 1: reference 4 voxels, prediction 4 voxels, overlap 2 -> Dice 0.5.
    target = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    target[0, 0, 0, :] = 1
    predicted = torch.zeros_like(target)
    predicted[0, 0, 0, :2] = 1
    predicted[0, 0, 1, :2] = 1
    loss = soft_dice_loss(one_hot_logits(predicted, 2), target, smooth=0)
    assert loss.item() == pytest.approx(0.5, abs=1e-4)
    # With the background counted: background Dice = 2*10 / (12 + 12) = 5/6.
    loss_bg = soft_dice_loss(
        one_hot_logits(predicted, 2), target, include_background=True, smooth=0
    )
    assert loss_bg.item() == pytest.approx(1 - (0.5 + 5 / 6) / 2, abs=1e-4)


def test_batch_dice_pools_the_batch():
    # Sample 0: class 1 perfect (4 voxels); sample 1: class 1 absent but 4 voxels predicted.
    target = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    target[0, 0, 0, :] = 1
    predicted = target.clone()
    predicted[1, 0, 3, :] = 1
    logits = one_hot_logits(predicted, 2)
    pooled = soft_dice_loss(logits, target, batch_dice=True, smooth=0)
    per_sample = soft_dice_loss(logits, target, batch_dice=False, smooth=1e-5)
    assert pooled.item() == pytest.approx(1 - 2 * 4 / (8 + 4), abs=1e-4)  # 1 - 2/3
    assert per_sample.item() == pytest.approx(1 - (1 + 0) / 2, abs=1e-4)


def test_dice_ce_combines_both_terms():
    label = torch.randint(0, 3, (2, 1, 6, 6, 6))
    logits = torch.randn(2, 3, 6, 6, 6)
    loss = DiceCELoss(dice_weight=2.0, ce_weight=0.5)(logits, label)
    expected = 2.0 * soft_dice_loss(logits, label) + 0.5 * F.cross_entropy(logits, label[:, 0])
    torch.testing.assert_close(loss, expected)


def test_focal_term_weighs_each_voxel_by_its_error():
    # two voxels of class 0 predicted with p = 0.9 and p = 0.5 (two classes)
    logits = torch.log(torch.tensor([[[0.9, 0.5], [0.1, 0.5]]]))  # [B=1, K=2, 2 voxels]
    label = torch.zeros(1, 1, 2, dtype=torch.long)
    focal = DiceCELoss(dice_weight=0.0, focal_gamma=2.0)(logits, label)
    by_hand = -(0.1**2 * math.log(0.9) + 0.5**2 * math.log(0.5)) / 2
    assert focal.item() == pytest.approx(by_hand, rel=1e-5)
    plain = DiceCELoss(dice_weight=0.0, focal_gamma=0.0)(logits, label)
    assert plain.item() == pytest.approx(-(math.log(0.9) + math.log(0.5)) / 2, rel=1e-5)


def test_deep_supervision_weights_halve_and_sum_to_one():
    weights = deep_supervision_weights(3)
    assert weights == pytest.approx([4 / 7, 2 / 7, 1 / 7])


def test_deep_supervision_loss_downsamples_the_target():
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    label[..., :4, :, :] = 1
    outputs = [one_hot_logits(label, 2), one_hot_logits(label[..., ::2, ::2, ::2], 2)]
    loss_fn = DiceCELoss()
    assert deep_supervision_loss(loss_fn, outputs, label).item() == pytest.approx(0, abs=1e-3)
    wrong = [outputs[0], -outputs[1]]
    expected = 1 / 3 * loss_fn(-outputs[1], label[..., ::2, ::2, ::2])
    torch.testing.assert_close(
        deep_supervision_loss(loss_fn, wrong, label), expected, atol=1e-3, rtol=1e-3
    )
