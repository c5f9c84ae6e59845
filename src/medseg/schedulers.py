"""Learning-rate schedules whose length is the number of epochs a stage actually trains.

torch's schedulers take their horizon (``total_iters``, ``T_max``) as a number fixed in the
config; in a cascade each stage trains for its own span of epochs, known only once the stage
schedule and ``trainer.max_epochs`` are. These factories take that span as ``epochs``, which
the LightningModule supplies.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, PolynomialLR


def polynomial(optimizer: Optimizer, epochs: int, power: float = 0.9) -> LRScheduler:
    """nnU-Net's poly schedule: lr * (1 - epoch / epochs) ** power."""
    return PolynomialLR(optimizer, total_iters=max(epochs, 1), power=power)


def cosine(optimizer: Optimizer, epochs: int, eta_min: float = 0.0) -> LRScheduler:
    """Cosine annealing from lr to eta_min over the stage's epochs."""
    return CosineAnnealingLR(optimizer, T_max=max(epochs, 1), eta_min=eta_min)
