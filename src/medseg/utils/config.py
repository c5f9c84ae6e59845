"""OmegaConf resolvers and config helpers shared by the entry points."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf


def default_precision() -> str:
    """bf16 autocast where the hardware runs it natively, else full precision.

    On CPUs with AVX512-BF16 or AMX, bf16 convolutions are several times faster than
    fp32; on CUDA GPUs with bf16 support it avoids fp16's loss scaling.
    """
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def register_resolvers() -> None:
    """Make ``${medseg.precision:}`` available to configs (idempotent)."""
    if not OmegaConf.has_resolver("medseg.precision"):
        OmegaConf.register_new_resolver("medseg.precision", default_precision)
