"""Segmentation losses: soft Dice + cross-entropy (or focal loss), and deep-supervision
weighting."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    include_background: bool = False,
    batch_dice: bool = True,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """1 - mean soft Dice of the softmax probabilities against an index label map.

    Args:
        logits: [B, K, *spatial] raw network outputs.
        target: [B, 1, *spatial] integer class indices.
        include_background: count class 0 in the mean (nnU-Net leaves it out).
        batch_dice: pool voxels of the whole batch per class (stable for small
            structures that are absent from some patches) instead of per sample.
        smooth: added to numerator and denominator; makes empty-vs-empty a perfect score.
    """
    num_classes = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    one_hot = F.one_hot(target[:, 0].long(), num_classes).movedim(-1, 1).to(probs.dtype)
    axes = (0, *range(2, probs.ndim)) if batch_dice else tuple(range(2, probs.ndim))
    intersection = (probs * one_hot).sum(axes)
    denominator = probs.sum(axes) + one_hot.sum(axes)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    if not include_background:
        dice = dice[..., 1:]
    return 1 - dice.mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean focal loss (Lin et al. 2017): cross-entropy of each voxel scaled by
    ``(1 - p_true) ** gamma``, so confidently right voxels count less; gamma 0 is plain
    cross-entropy. ``target`` holds class indices [B, *spatial]."""
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    if gamma == 0:
        return -log_p.mean()
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()


class DiceCELoss(nn.Module):
    """Weighted sum of soft Dice (no background by default) and cross-entropy, or focal loss
    when ``focal_gamma`` > 0."""

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        include_background: bool = False,
        batch_dice: bool = True,
        smooth: float = 1e-5,
        focal_gamma: float = 0.0,
    ):
        super().__init__()
        if focal_gamma < 0:
            raise ValueError(f"loss.focal_gamma must be >= 0, got {focal_gamma}")
        self.focal_gamma = float(focal_gamma)
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.include_background = include_background
        self.batch_dice = batch_dice
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dice = soft_dice_loss(logits, target, self.include_background, self.batch_dice, self.smooth)
        ce = focal_loss(logits, target[:, 0].long(), self.focal_gamma)
        return self.dice_weight * dice + self.ce_weight * ce


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """Weights 1/2^i for output i (full resolution first), normalized to sum to 1."""
    raw = [0.5**i for i in range(num_outputs)]
    return [w / sum(raw) for w in raw]


def deep_supervision_loss(
    loss_fn: nn.Module, outputs: Sequence[torch.Tensor], target: torch.Tensor
) -> torch.Tensor:
    """Loss summed over decoder levels; the target is downsampled (nearest) to each level."""
    weights = deep_supervision_weights(len(outputs))
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for weight, output in zip(weights, outputs, strict=True):
        level_target = target
        if output.shape[2:] != target.shape[2:]:
            level_target = F.interpolate(
                target.float(), size=output.shape[2:], mode="nearest-exact"
            ).long()
        total = total + weight * loss_fn(output, level_target)
    return total
