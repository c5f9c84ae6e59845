"""Whether a stage's network can train on its window, checked before training starts.

A U-Net divides its window by every stage's stride; the last stage (the bottleneck) works on
``window // total stride`` voxels. Refused, with the config keys to change:

- a window that is not a multiple of the total stride, or that leaves 1 voxel on every axis
  at the bottleneck (instance norm has nothing to normalize);
- under bf16 precision on the CPU, a 3D network with feature maps 2 voxels deep along the
  first spatial axis. torch's CPU bf16 3D convolution computes garbage weight gradients
  (1e30 and more, then inf) for an input 2 voxels deep along that axis with stride 1 along
  it, while its forward pass, 2D convolutions and 32-bit precision are correct (measured with
  torch 2.13). Gradient clipping then turns the infinite norm into NaN weights, and the next
  loss is NaN: ``data.patch_size=[32,32,16]`` with the default 5-stage network (bottleneck
  2x2x1) diverges within ~30 steps, and trains in 32-bit precision.

Below nnU-Net's rule (at least 4 voxels per axis at the bottleneck) a window works, with
little context at the bottleneck: the check returns a warning naming the same keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from medseg.errors import ConfigError

# nnU-Net's planner keeps at least this many voxels per axis at the bottleneck.
NNUNET_MIN_BOTTLENECK = 4


@dataclass(frozen=True)
class WindowKeys:
    """The config keys behind a stage's window, for messages.

    Args:
        stage: the stage's name.
        window: the key that sets the window (``data.patch_size``, or the stage's
            ``patch_size``).
        scale: window voxels -> voxels of that key (a stage's downsample factors when the
            window is data.patch_size on a coarser grid).
        network: where the network's depth is set (``model``, or the stage's ``network``
            overrides).
        explicit_strides: whether ``<network>.strides`` is set (else 1, then 2 on every axis).
    """

    stage: str
    window: str
    scale: tuple[int, ...]
    network: str
    explicit_strides: bool


def feature_sizes(window: Sequence[int], strides: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The feature-map size of every encoder stage for `window` (the bottleneck last)."""
    sizes, size = [], tuple(window)
    for stride in strides:
        size = tuple(s // t for s, t in zip(size, stride, strict=True))
        sizes.append(size)
    return sizes


def total_stride(strides: Sequence[Sequence[int]]) -> tuple[int, ...]:
    return tuple(math.prod(axis) for axis in zip(*strides, strict=True))


def check_window(
    window: Sequence[int],
    strides: Sequence[Sequence[int]],
    keys: WindowKeys,
    bf16_on_cpu: bool = False,
) -> str | None:
    """A ConfigError naming the keys unless the network (`strides`: one per stage and axis)
    can train on `window`; a warning when it can but is below nnU-Net's rule, else None.

    `bf16_on_cpu`: training runs in bf16 on the CPU (see the module docstring)."""
    window, strides = tuple(window), [tuple(s) for s in strides]
    total = total_stride(strides)
    bottleneck = feature_sizes(window, strides)[-1]
    strides_value = [list(s) for s in strides] if keys.explicit_strides else "null"
    what = (
        f"stage {keys.stage!r}: {keys.window}={_in_key(window, keys)} with "
        f"{keys.network}.num_stages={len(strides)} and {keys.network}.strides={strides_value} "
        f"(total stride {list(total)})"
    )
    if any(w % t for w, t in zip(window, total, strict=True)):
        multiples = tuple(-(-w // t) * t for w, t in zip(window, total, strict=True))
        raise ConfigError(
            f"{what}: the window is not a multiple of the total stride; use "
            f"{keys.window}={_in_key(multiples, keys)}"
        )
    if all(b == 1 for b in bottleneck):
        raise ConfigError(
            f"{what} leaves a 1-voxel bottleneck, which instance norm cannot normalize; use "
            f"{_alternatives(window, strides, keys, _nnunet_axis)}"
        )
    if bf16_on_cpu and len(window) == 3 and not _fits(window, strides, _no_two_deep_maps):
        sizes = [list(s) for s in feature_sizes(window, strides)]
        raise ConfigError(
            f"{what} gives a bottleneck of {list(bottleneck)} voxels and feature maps 2 voxels "
            f"deep along the first axis ({sizes}): in bf16 "
            "on the CPU, torch computes wrong gradients for 3D convolutions on such maps and "
            "training diverges to NaN; use "
            f"{_alternatives(window, strides, keys, _no_two_deep_maps)}, or "
            "trainer.precision=32-true"
        )
    if min(bottleneck) < NNUNET_MIN_BOTTLENECK:
        return (
            f"{what} gives a bottleneck of {list(bottleneck)} voxels, below nnU-Net's "
            f"{NNUNET_MIN_BOTTLENECK} per axis (little context at the bottleneck); "
            f"{_alternatives(window, strides, keys, _nnunet_axis)} would keep it"
        )
    return None


# A condition on one axis: (axis index, its size in the window and at every stage) -> ok.
AxisCondition = Callable[[int, list[int]], bool]


def _nnunet_axis(axis: int, sizes: list[int]) -> bool:
    return sizes[-1] >= NNUNET_MIN_BOTTLENECK


def _no_two_deep_maps(axis: int, sizes: list[int]) -> bool:
    return axis != 0 or 2 not in sizes


def _axis_sizes(size: int, axis_strides: Sequence[int]) -> list[int]:
    sizes = [size]
    for stride in axis_strides:
        sizes.append(sizes[-1] // stride)
    return sizes


def _fits(window: Sequence[int], strides: Sequence[Sequence[int]], ok: AxisCondition) -> bool:
    return all(
        ok(axis, _axis_sizes(size, [s[axis] for s in strides])) for axis, size in enumerate(window)
    )


def _alternatives(
    window: tuple[int, ...], strides: list[tuple[int, ...]], keys: WindowKeys, ok: AxisCondition
) -> str:
    """``<window key>=<the smallest window, no smaller than now, that satisfies ok on every
    axis>`` or ``<network>.num_stages=<the most stages, fewer than now, that satisfy it>``."""
    larger = []
    for axis, size in enumerate(window):
        axis_strides = [s[axis] for s in strides]
        step = math.prod(axis_strides)
        first = max(1, -(-size // step))
        # An odd multiple >= 4 of the total stride satisfies every condition: few tries.
        larger.append(
            next(
                m * step
                for m in range(first, first + 2 * NNUNET_MIN_BOTTLENECK)
                if ok(axis, _axis_sizes(m * step, axis_strides))
            )
        )
    options = [f"{keys.window}={_in_key(larger, keys)}"]
    fewer = next(
        (n for n in range(len(strides) - 1, 0, -1) if _fits(window, strides[:n], ok)), None
    )
    if fewer is not None:
        bottleneck = list(feature_sizes(window, strides[:fewer])[-1])
        first = f" and its first {fewer} {keys.network}.strides" if keys.explicit_strides else ""
        options.append(f"{keys.network}.num_stages={fewer}{first} (bottleneck {bottleneck})")
    return " or ".join(options)


def _in_key(window: Sequence[int], keys: WindowKeys) -> list[int]:
    return [w * s for w, s in zip(window, keys.scale, strict=True)]
