"""Sliding-window inference with Gaussian importance weighting.

Written by hand rather than with TorchIO's GridSampler/GridAggregator: TorchIO offers no
Gaussian weighting and goes through a Subject and a DataLoader per window, which costs
more than the network on small windows. Here windows are cut by slicing, run in batches
and accumulated in place.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Evenly spaced window starts covering [0, size) with at least `overlap` overlap."""
    if size <= window:
        return [0]
    step = window * (1 - overlap)
    count = math.ceil((size - window) / step) + 1
    return [round(i * (size - window) / (count - 1)) for i in range(count)]


@lru_cache(maxsize=8)
def gaussian_importance(window: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """Separable Gaussian centred on the window, max 1, strictly positive everywhere."""
    weights = torch.ones(())
    for size in window:
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        axis = torch.exp(-0.5 * (coords / (size * sigma_scale)) ** 2)
        weights = weights.unsqueeze(-1) * axis
    weights = weights / weights.max()
    return weights.clamp_min(weights[weights > 0].min()).float()


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
        batch = torch.cat([image[(..., *sl)] for sl in chunk])
        predictions = predictor(batch).float()
        if output is None:
            output = torch.zeros(
                (1, predictions.shape[1], *padded), dtype=torch.float32, device=image.device
            )
        if weight is not None:
            predictions = predictions * weight
        for prediction, sl in zip(predictions, chunk, strict=True):
            output[(0, slice(None), *sl)] += prediction
            normalizer[sl] += 1 if weight is None else weight
    assert output is not None
    output /= normalizer
    if any(padding):
        crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(padding, spatial, strict=True))
        output = output[(..., *crop)]
    return output
