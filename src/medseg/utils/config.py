"""OmegaConf resolvers and config helpers shared by the entry points."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from omegaconf import OmegaConf

from medseg.errors import ConfigError


def default_precision() -> str:
    """bf16 autocast where the hardware runs it natively, else full precision.

    On CPUs with AVX512-BF16 or AMX, bf16 convolutions are several times faster than
    fp32; on CUDA GPUs with bf16 support it avoids fp16's loss scaling.
    """
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def register_resolvers() -> None:
    """Make ``${medseg.precision:}`` and ``${medseg.cwd:}`` available to configs (idempotent).

    ``medseg.cwd`` is the directory the command runs in. ``paths.root_dir`` uses it instead
    of ``${hydra:runtime.cwd}``: a multirun resolves ``hydra.sweep.dir`` (which depends on
    the root) before Hydra's runtime config exists, so ``${hydra:...}`` fails there.
    """
    if not OmegaConf.has_resolver("medseg.precision"):
        OmegaConf.register_new_resolver("medseg.precision", default_precision)
    if not OmegaConf.has_resolver("medseg.cwd"):
        OmegaConf.register_new_resolver("medseg.cwd", os.getcwd)


def positive_ints(key: str, values: Sequence[int], length: int | None = None) -> tuple[int, ...]:
    """`values` as a tuple; a ConfigError naming `key` unless they are (`length`) integers
    >= 1 (booleans are refused: YAML turns `yes` into True)."""
    values = tuple(values)
    if (length is not None and len(values) != length) or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values
    ):
        size = f"{length} " if length else ""
        raise ConfigError(f"{key} must be {size}positive integer(s), got {list(values)}")
    return values
