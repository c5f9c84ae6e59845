"""Random augmentation presets, applied to preprocessed training subjects."""

from __future__ import annotations

import torchio as tio

from medseg.errors import ConfigError


def _light() -> list[tio.Transform]:
    return [
        tio.RandomAffine(scales=(0.9, 1.1), degrees=10, p=0.2),
        tio.RandomGamma(log_gamma=(-0.2, 0.2), p=0.2),
        tio.RandomNoise(std=(0, 0.05), p=0.1),
    ]


def _default() -> list[tio.Transform]:
    """Close to nnU-Net's default: spatial, intensity and mirroring on every axis."""
    return [
        tio.RandomAffine(scales=(0.7, 1.4), degrees=15, p=0.2),
        tio.RandomNoise(std=(0, 0.1), p=0.1),
        tio.RandomBlur(std=(0.5, 1.0), p=0.2),
        tio.RandomGamma(log_gamma=(-0.3, 0.3), p=0.3),
        tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5),
    ]


def _mirror() -> list[tio.Transform]:
    """Mirroring only: keeps volumes and counts (for case-level targets such as an organ's
    volume in mL, which scaling would change)."""
    return [tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5)]


PRESETS = {"none": list, "light": _light, "default": _default, "mirror": _mirror}


def build_augmentation(preset: str) -> tio.Compose | None:
    """The named preset as one TorchIO transform, or None for ``none``."""
    if preset not in PRESETS:
        raise ConfigError(f"data.augmentation must be one of {sorted(PRESETS)}, got {preset!r}")
    transforms = PRESETS[preset]()
    return tio.Compose(transforms) if transforms else None
