"""Sliding-window inference with Gaussian importance weighting, and the one function that
predicts a volume with ensembles, test-time mirroring and Monte-Carlo dropout.

Written by hand rather than with TorchIO's GridSampler/GridAggregator: TorchIO offers no
Gaussian weighting and goes through a Subject and a DataLoader per window, which costs
more than the network on small windows. Here windows are cut by slicing, run in batches
and accumulated in place (``scripts/bench_inference.py`` compares it with MONAI's).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import ConfigError
from medseg.models.cascade import CascadePrediction, predict_cascade
from medseg.stages import StageSpec

if TYPE_CHECKING:
    from medseg.module import SegmentationModule

# Lightning's precision names (as in `trainer.precision`) -> autocast dtype (None: off).
AUTOCAST_DTYPES = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Evenly spaced window starts covering [0, size) with at least `overlap` overlap.

    The layout is mirror-symmetric (start s <-> size - window - s), so predicting a flipped
    volume and flipping back sees the same windows: test-time mirroring stays exact.
    """
    if size <= window:
        return [0]
    span = size - window
    count = math.ceil(span / (window * (1 - overlap))) + 1
    if count % 2 and span % 2:
        count += 1  # an odd span has no integer middle start: use an even count instead
    half = [math.floor(i * span / (count - 1) + 0.5) for i in range(count // 2)]
    middle = [span // 2] if count % 2 else []
    return half + middle + [span - s for s in reversed(half)]


@lru_cache(maxsize=8)
def gaussian_importance(window: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """Separable Gaussian centred on the window (sigma = window / 8), floored at 1e-3.

    The same map as MONAI's ``compute_importance_map`` (1 at the centre voxel of odd sizes,
    not rescaled): the floor is absolute, so matching MONAI's scale keeps both blends equal.
    The floor keeps the blending normalizer well conditioned where a voxel is seen only by
    window corners, also in reduced precision.
    """
    weights = torch.ones(())
    for size in window:
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        axis = torch.exp(-0.5 * (coords / (size * sigma_scale)) ** 2)
        weights = weights.unsqueeze(-1) * axis
    return weights.clamp_min(1e-3).float()


def sliding_window_inference(
    image: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    window: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 4,
    gaussian: bool = True,
) -> torch.Tensor:
    """Predict a whole volume window by window and blend the windows.

    Args:
        image: [1, C, *spatial] volume (any spatial size; padded when smaller than the window).
        predictor: maps [N, C, *window] to [N, K, *window] (e.g. a network in eval mode).
        window: window size per spatial axis.
        overlap: fraction of the window shared by neighbouring windows, in [0, 1).
        batch_size: windows per predictor call.
        gaussian: weight each window by a centred Gaussian (else uniformly).

    Returns:
        [1, K, *spatial] float32 blended predictions.
    """
    if image.shape[0] != 1:
        raise ValueError(f"sliding_window_inference takes one volume, got batch {image.shape[0]}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    window = tuple(int(w) for w in window)
    spatial = tuple(image.shape[2:])
    if len(window) != len(spatial):
        raise ValueError(f"window {window} does not match the image's spatial shape {spatial}")
    padding = [max(w - s, 0) for w, s in zip(window, spatial, strict=True)]
    if any(padding):
        # F.pad takes (last axis first) pairs; split the padding evenly on both sides.
        pairs = [(p // 2, p - p // 2) for p in padding]
        image = F.pad(image, [v for pair in reversed(pairs) for v in pair], mode="replicate")
    padded = tuple(image.shape[2:])

    starts = [window_starts(s, w, overlap) for s, w in zip(padded, window, strict=True)]
    slices = [
        tuple(slice(st, st + w) for st, w in zip(corner, window, strict=True))
        for corner in itertools.product(*starts)
    ]
    weight = gaussian_importance(window).to(image.device) if gaussian else None
    output: torch.Tensor | None = None
    normalizer = torch.zeros(padded, dtype=torch.float32, device=image.device)
    for first in range(0, len(slices), batch_size):
        chunk = slices[first : first + batch_size]
        # stack, not cat: cat of strided 5D views takes a slow copy path (10x on CPU)
        batch = torch.stack([image[0][(slice(None), *sl)] for sl in chunk])
        predictions = predictor(batch).float()
        if output is None:
            output = torch.zeros(
                (1, predictions.shape[1], *padded), dtype=torch.float32, device=image.device
            )
        for prediction, sl in zip(predictions, chunk, strict=True):
            region = output[(0, slice(None), *sl)]
            if weight is None:
                region += prediction
                normalizer[sl] += 1
            else:
                region.addcmul_(prediction, weight)
                normalizer[sl] += weight
    assert output is not None
    output /= normalizer
    if any(padding):
        crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(padding, spatial, strict=True))
        output = output[(..., *crop)]
    return output


@contextlib.contextmanager
def active_dropout(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Dropout layers in training mode (sampling), everything else as it was."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, nn.Dropout)]
    if not any(layer.p > 0 for layer in layers):
        raise ConfigError(
            "mc_dropout_samples > 0 needs a network trained with dropout (model.dropout > 0); "
            "this checkpoint has none"
        )
    modes = [layer.training for layer in layers]
    try:
        for layer in layers:
            layer.train()
        yield
    finally:
        for layer, mode in zip(layers, modes, strict=True):
            layer.train(mode)


def mirror_flips(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the mirrored spatial axes (the empty one is the plain prediction)."""
    axes = sorted(set(int(a) for a in mirror_axes))
    if any(a not in (0, 1, 2) for a in axes):
        raise ConfigError(f"mirror_axes must be spatial axes among [0, 1, 2], got {list(axes)}")
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def predict_cascade_averaged(
    modules: Sequence[SegmentationModule],
    image: torch.Tensor,
    spacing: Sequence[float],
    mirror_axes: Sequence[int] = (),
    mc_dropout_samples: int = 0,
    precision: str = "32-true",
) -> CascadePrediction:
    """Composed prediction of one preprocessed volume [1, C, *spatial] with voxel size
    `spacing` (mm), averaged over an ensemble, test-time mirroring and MC dropout.

    Averaging happens stage by stage: each stage's softmax is the mean over the ensemble
    members, the mirrored copies of its input (every subset of `mirror_axes`, flipped back)
    and, with ``mc_dropout_samples > 0``, that many passes with dropout active. A later
    stage's region and input masks therefore come from the averaged earlier stage, and the
    cascade decides (thresholds, nesting) once, on the averages. Case-level tasks are
    averaged the same way (class probabilities, regression values) and returned in the
    prediction's ``tasks``; dense tasks are not.
    """
    if precision not in AUTOCAST_DTYPES:
        raise ConfigError(f"precision must be one of {list(AUTOCAST_DTYPES)}, got {precision!r}")
    if (
        isinstance(mc_dropout_samples, bool)
        or not isinstance(mc_dropout_samples, int)
        or mc_dropout_samples < 0
    ):
        raise ConfigError(f"mc_dropout_samples must be an integer >= 0, got {mc_dropout_samples!r}")
    if not modules:
        raise ConfigError("an ensemble needs at least one module")
    flips = mirror_flips(mirror_axes)
    dtype = AUTOCAST_DTYPES[precision]
    case_tasks: dict[str, torch.Tensor] = {}

    def averaged(stage: StageSpec, inputs: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        task_totals = {t.name: 0.0 for t in stage.case_tasks}
        count = 0
        for module in modules:
            for flip in flips:
                dims = [axis + 2 for axis in flip]
                flipped = inputs.flip(dims) if dims else inputs
                for _ in range(max(mc_dropout_samples, 1)):
                    with torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype is not None):
                        probabilities, tasks = module.stage_predictions(stage, flipped)
                    probabilities = probabilities.float()
                    probabilities = probabilities.flip(dims) if dims else probabilities
                    total = probabilities if total is None else total.add_(probabilities)
                    for name in task_totals:
                        task_totals[name] = task_totals[name] + tasks[name].float()
                    count += 1
        case_tasks.update({name: value / count for name, value in task_totals.items()})
        return total.div_(count)

    sampling = active_dropout(modules) if mc_dropout_samples else contextlib.nullcontext()
    with torch.no_grad(), sampling:
        prediction = predict_cascade(
            image, spacing, modules[0].cascade, averaged, modules[0].region_box_sizes
        )
    prediction.tasks = case_tasks
    return prediction
