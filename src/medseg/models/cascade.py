"""Cascade inference: stage by stage, each inside its region, composed into one label map.

Stage 1 predicts on the whole volume; a later stage with a region predicts only inside the
bounding box of an earlier stage's mask (grown by a margin in mm), its mask is restricted to
that earlier mask (tumour only inside liver), and the stages' classes are composed into one
label map in which later stages override earlier ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from medseg.stages import Cascade, StageSpec

Box = tuple[slice, ...]
StagePredictor = Callable[[StageSpec, torch.Tensor], torch.Tensor]


@dataclass
class CascadePrediction:
    """Composed output for one volume.

    labels: [1, *spatial] composed class indices, decided stage by stage (thresholds,
        lesion only inside its region stage's mask).
    probabilities: [1, K, *spatial] composed class probabilities: a stage's class gets the
        probability mass of its region stage's foreground times the stage's own probability.
    stage_labels: stage name -> [1, *spatial] that stage's own class indices (0 outside its
        foreground).
    stage_probabilities: stage name -> [1, K_s, *spatial] that stage's softmax (background
        outside its region); :func:`compose` rebuilds everything else from these, e.g. after
        resampling them to another grid.
    tasks: task name -> that task's prediction (see medseg.multitask.CascadeTasks.predict).
    """

    labels: torch.Tensor
    probabilities: torch.Tensor
    stage_labels: dict[str, torch.Tensor]
    stage_probabilities: dict[str, torch.Tensor]
    tasks: dict[str, torch.Tensor] = field(default_factory=dict)


def bounding_box(mask: torch.Tensor, margin: Sequence[int]) -> Box | None:
    """Slices of the smallest box holding every True voxel, grown by `margin` voxels per axis
    and clipped to the volume; None for an empty mask."""
    if not bool(mask.any()):
        return None
    box = []
    for axis, (size, grow) in enumerate(zip(mask.shape, margin, strict=True)):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        present = torch.nonzero(mask.any(dim=others) if others else mask).flatten()
        start = max(int(present[0]) - grow, 0)
        stop = min(int(present[-1]) + 1 + grow, size)
        box.append(slice(start, stop))
    return tuple(box)


def crop(volume: torch.Tensor, box: Box) -> torch.Tensor:
    """Crop the trailing spatial axes of [..., *spatial] to `box`."""
    return volume[(..., *box)]


def paste(region: torch.Tensor, box: Box, shape: Sequence[int], fill: torch.Tensor) -> torch.Tensor:
    """Put `region` [N, C, *box] back into a [N, C, *shape] volume whose other voxels are
    `fill` (one value per channel)."""
    out = fill.reshape(1, -1, *([1] * len(shape))).expand(*region.shape[:2], *shape).clone()
    out[(..., *box)] = region
    return out


def grow_box(box: Box, min_size: Sequence[int], shape: Sequence[int]) -> Box:
    """`box` grown around its centre to at least `min_size` voxels per axis, shifted to stay
    inside a volume of `shape` (clipped where the volume itself is smaller)."""
    grown = []
    for part, size, length in zip(box, min_size, shape, strict=True):
        extent = min(max(part.stop - part.start, int(size)), int(length))
        start = part.start - (extent - (part.stop - part.start)) // 2
        start = min(max(start, 0), int(length) - extent)
        grown.append(slice(start, start + extent))
    return tuple(grown)


def margin_voxels(margin_mm: float, spacing: Sequence[float]) -> list[int]:
    return [math.ceil(margin_mm / float(s)) for s in spacing]


def decide(
    probabilities: torch.Tensor, threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground mask [N, *] and class index [N, *] (1..K-1 where foreground) of a stage."""
    if threshold is None:
        classes = probabilities.argmax(1)
        return classes > 0, classes
    foreground = (1 - probabilities[:, 0]) >= threshold
    return foreground, probabilities[:, 1:].argmax(1) + 1


def _in_region(
    stage: StageSpec, inputs: torch.Tensor, box: Box | None, predict: StagePredictor
) -> torch.Tensor:
    """The stage's probabilities inside `box`, background elsewhere (everywhere if no box:
    the region stage found nothing, so neither does this stage)."""
    shape = inputs.shape[2:]
    background = torch.zeros(stage.num_outputs, device=inputs.device)
    background[0] = 1
    if box is None:
        return background.reshape(1, -1, *([1] * len(shape))).expand(1, -1, *shape)
    return paste(predict(stage, crop(inputs, box)), box, shape, background)


def filter_components(
    mask: torch.Tensor, largest_only: bool = False, min_voxels: float = 0.0
) -> torch.Tensor:
    """`mask` [N, *spatial] keeping, per item, only its largest connected component
    (`largest_only`) and only components of at least `min_voxels` voxels (26-connected in
    3D, 8 in 2D). scipy labels the components: torch has no such operation."""
    if not largest_only and min_voxels <= 0:
        return mask
    kept = torch.zeros_like(mask)
    for i, item in enumerate(mask.cpu().numpy()):
        components, count = ndimage.label(item, structure=np.ones((3,) * item.ndim))
        if count:
            sizes = np.bincount(components.ravel())[1:]
            keep = sizes >= min_voxels
            if largest_only:
                keep &= np.arange(count) == sizes.argmax()
            item = np.isin(components, np.flatnonzero(keep) + 1)
        kept[i] = torch.from_numpy(item)
    return kept


def _stage_foreground(
    stage: StageSpec,
    probabilities: torch.Tensor,
    masks: Mapping[str, torch.Tensor],
    spacing: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """A stage's decision: foreground [1, *] (inside its region stage's mask; its largest
    component if the stage asks; without components under its minimum size) and classes."""
    foreground, classes = decide(probabilities, stage.threshold)
    if stage.region is not None:
        foreground = foreground & masks[stage.region.stage]
    voxel_mm3 = math.prod(float(s) for s in spacing)
    foreground = filter_components(
        foreground, stage.largest_component, stage.min_component_mm3 / voxel_mm3
    )
    return foreground, classes


def compose(
    stage_probabilities: Mapping[str, torch.Tensor], cascade: Cascade, spacing: Sequence[float]
) -> CascadePrediction:
    """Decide every stage and compose the label map and class probabilities on a grid of
    `spacing` (mm; for the stages' minimum component sizes).

    Later stages override earlier ones; a stage's classes take the probability mass of its
    region stage's foreground (times its own probability), so probabilities sum to 1.
    """
    first = next(iter(stage_probabilities.values()))
    shape = tuple(first.shape[2:])
    probabilities = torch.zeros(1, len(cascade.class_names), *shape, device=first.device)
    probabilities[:, 0] = 1
    labels = torch.zeros(1, *shape, dtype=torch.long, device=first.device)
    masks: dict[str, torch.Tensor] = {}
    stage_labels: dict[str, torch.Tensor] = {}
    class_values: list[set[int]] = [set()]  # source values of each composed class
    offset = 1
    for stage in cascade.stages:
        stage_probs = stage_probabilities[stage.name]
        foreground, classes = _stage_foreground(stage, stage_probs, masks, spacing)
        masks[stage.name] = foreground
        stage_labels[stage.name] = torch.where(foreground, classes, 0)
        labels[foreground] = offset + classes[foreground] - 1
        region = cascade.stage(stage.region.stage).values if stage.region else None
        inside = [
            i
            for i, values in enumerate(class_values)
            if region is None or (values and values <= region)
        ]
        mass = probabilities[:, inside].sum(1)
        probabilities[:, inside] *= stage_probs[:, :1]
        for j, values in enumerate(stage.classes.values(), start=1):
            probabilities[:, offset + j - 1] = mass * stage_probs[:, j]
            class_values.append(set(values))
        offset += len(stage.classes)
    return CascadePrediction(labels, probabilities, stage_labels, dict(stage_probabilities))


def predict_cascade(
    image: torch.Tensor,
    spacing: Sequence[float],
    cascade: Cascade,
    stage_probabilities: StagePredictor,
    min_box_sizes: Mapping[str, Sequence[int]] | None = None,
) -> CascadePrediction:
    """Run every stage of `cascade` on one volume and compose the result.

    Args:
        image: [1, C, *spatial] preprocessed volume.
        spacing: its voxel size in mm (for region margins).
        stage_probabilities: (stage, inputs [1, C + masks, *box]) -> softmax [1, K_s, *box].
        min_box_sizes: stage name -> the smallest region box of that stage (voxels per
            axis), normally its network's window: a later stage then sees real context around
            a small organ, as its training patches did, rather than the padding a box smaller
            than the window gets (which biases its predictions).
    """
    masks: dict[str, torch.Tensor] = {}
    probabilities: dict[str, torch.Tensor] = {}
    for stage in cascade.stages:
        inputs = torch.cat(
            [image, *(masks[m][:, None].to(image.dtype) for m in stage.input_masks)], 1
        )
        if stage.region is None:
            stage_probs = stage_probabilities(stage, inputs)
        else:
            margin = margin_voxels(stage.region.margin_mm, spacing)
            box = bounding_box(masks[stage.region.stage][0], margin)
            if box is not None and min_box_sizes and stage.name in min_box_sizes:
                box = grow_box(box, min_box_sizes[stage.name], image.shape[2:])
            stage_probs = _in_region(stage, inputs, box, stage_probabilities)
        probabilities[stage.name] = stage_probs
        masks[stage.name] = _stage_foreground(stage, stage_probs, masks, spacing)[0]
    return compose(probabilities, cascade, spacing)
