"""Callbacks that keep a run reproducible and stop it from training on garbage."""

from __future__ import annotations

import logging
import random

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from medseg.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

NONFINITE_ACTIONS = ("stop", "skip")


class EpochSeed(L.Callback):
    """Reseed Python, NumPy and torch at the start of every training epoch.

    The seed is derived from (run seed, epoch, global rank), so the patches, augmentations
    and subject order of epoch e do not depend on what ran before it. Lightning checkpoints
    do not hold random-number-generator states; with this, a run resumed from an
    end-of-epoch checkpoint draws exactly what the uninterrupted run drew.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def epoch_seed(self, epoch: int, rank: int) -> int:
        return int(np.random.SeedSequence([self.seed, epoch, rank]).generate_state(1)[0])

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seed = self.epoch_seed(trainer.current_epoch, trainer.global_rank)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


class NonFiniteLossGuard(L.Callback):
    """Detect a NaN/Inf training loss before it reaches the weights.

    Args:
        action: ``stop`` ends the run with a :class:`TrainingError` naming the batch's
            cases; ``skip`` logs them and drops that optimizer step (its gradients are
            discarded), so training goes on with the previous weights.

    Under DDP the decision is shared: if any rank's loss is non-finite, every rank stops or
    skips the same step (a rank going its own way would hang the others).
    """

    def __init__(self, action: str = "stop"):
        if action not in NONFINITE_ACTIONS:
            raise ConfigError(
                f"callbacks.nonfinite_loss.action must be one of {list(NONFINITE_ACTIONS)}, "
                f"got {action!r}"
            )
        self.action = action
        self.skipped_steps = 0
        self._case_ids: list[str] = []
        # Set by a non-finite backward; cleared after the batch whose optimizer steps it spoilt
        # (with gradient accumulation, that is the batch that finally steps; with several
        # optimizers, e.g. one per cascade stage, every one of them is skipped).
        self._discard_gradients = False
        self._stepped = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._case_ids = list(batch.get("case_id", [])) if isinstance(batch, dict) else []
        self._stepped = False

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(not finite, all=False):
            return
        cases = self._cases_with_nonfinite_loss(finite)
        message = (
            f"non-finite training loss ({loss.item()}) at epoch {trainer.current_epoch}, "
            f"step {trainer.global_step}; batch cases: {', '.join(cases) or 'unknown'}"
        )
        if self.action == "stop":
            raise TrainingError(
                f"{message}. Stopping: check these cases' images and labels, or lower the "
                "learning rate (callbacks.nonfinite_loss.action=skip skips such steps instead)"
            )
        log.warning("%s: skipping this optimizer step", message)
        self.skipped_steps += 1
        self._discard_gradients = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._stepped = True
        if self._discard_gradients:
            optimizer.zero_grad(set_to_none=True)  # parameters without gradients are not updated

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._stepped:
            self._discard_gradients = False

    def _cases_with_nonfinite_loss(self, finite: bool) -> list[str]:
        """The case ids of this step's batches whose loss was non-finite, on every rank."""
        mine = [] if finite else self._case_ids
        if not (dist.is_available() and dist.is_initialized()):
            return mine
        gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, mine)
        return [case for cases in gathered for case in cases]
