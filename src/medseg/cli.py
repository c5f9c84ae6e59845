"""Hydra entry points (`python src/train.py`, `python scripts/prepare.py`, `medseg-train`,
`medseg-predict`, `medseg-prepare`, ...).

Errors caused by the user's input (MedsegError, or a config that cannot be instantiated)
are printed as one message and exit with status 1 instead of a traceback; Ctrl-C ends with
one line and status 130.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig

from medseg import pipeline
from medseg.errors import MedsegError
from medseg.sweeps import write_job_result
from medseg.utils.config import register_resolvers
from medseg.utils.outputs import check_output_folders
from medseg.utils.rich_utils import print_config_tree, print_error

log = logging.getLogger(__name__)


def config_dir() -> str:
    """configs/ of a source checkout (editable install), else the copy inside the wheel."""
    packaged = Path(__file__).parent / "configs"
    source = Path(__file__).resolve().parents[2] / "configs"
    return str(packaged if packaged.is_dir() else source)


def _is_user_error(error: BaseException) -> bool:
    if isinstance(error, MedsegError):
        return True
    # Hydra wraps errors raised while building objects from the config: a bad key
    # (TypeError on unexpected arguments), a value our constructors reject, or a Lightning
    # setting this machine cannot run (trainer=gpu without a GPU).
    return isinstance(error, InstantiationException) and isinstance(
        error.__cause__, MedsegError | TypeError | ValueError | MisconfigurationException | None
    )


def user_message(error: BaseException) -> str:
    """What the user reads: a MedsegError's own message; for a config Hydra could not build,
    ``<config key>: <the reason>`` on one line (Hydra's own spans three)."""
    cause = error.__cause__
    if not isinstance(error, InstantiationException) or cause is None:
        return str(error)
    key = re.search(r"full_key: (\S+)", str(error))
    reason = str(cause) if isinstance(cause, MedsegError) else f"{type(cause).__name__}: {cause}"
    return f"{key.group(1)}: {reason}" if key else reason


def run_task(task: Callable[[DictConfig], dict[str, float]], cfg: DictConfig) -> float | None:
    """Print the config, run the task, and return the metric named by ``optimized_metric``.

    The run folder gets ``result.json`` (status, final metrics, error). In a multirun, a
    failed job is logged and re-raised to Hydra, which records it and goes on with the other
    jobs (the Optuna sweeper marks the trial failed).
    """
    if rank_zero_only.rank == 0:
        print_config_tree(cfg)
    output_dir = Path(cfg.paths.output_dir)
    try:
        check_output_folders(cfg, ["paths.output_dir"])  # result.json, and the task's files
        metrics = task(cfg)
    except KeyboardInterrupt:
        _exit_interrupted(task.__name__, output_dir)
    except Exception as error:
        user_error = _is_user_error(error)
        if rank_zero_only.rank == 0:
            # an unwritable run folder is itself the error reported below
            with contextlib.suppress(OSError):
                write_job_result(output_dir, "failed", error=f"{type(error).__name__}: {error}")
        if user_error:
            log.error("%s", user_message(error))
            print_error(user_message(error))
        if _in_multirun():
            if not user_error:
                log.exception("job failed")
            raise
        if not user_error or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(1)
    if rank_zero_only.rank == 0:
        write_job_result(output_dir, "completed", metrics)
    name = cfg.get("optimized_metric")
    if name and name not in metrics:
        log.warning("optimized_metric %r was not logged (logged: %s)", name, sorted(metrics))
    return metrics.get(name) if name else None


def _exit_interrupted(name: str, output_dir: Path) -> NoReturn:
    """End a Ctrl-C'd command with one line saying what stopped and what is left, and exit
    status 130 (128 + SIGINT, as shells report it). A multirun stops too."""
    if rank_zero_only.rank == 0:
        with contextlib.suppress(OSError):  # the line below is what matters now
            write_job_result(output_dir, "failed", error="interrupted (Ctrl-C)")
    last = output_dir / "checkpoints" / "last.ckpt"
    left = "every file written so far is complete, none is half-written"
    if last.is_file():
        left += f"; continue with ckpt_path={last}"
    log.error("interrupted: %s stopped (%s); %s", name, output_dir, left)  # console and log file
    sys.exit(130)


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class _DropLightningTips(logging.Filter):
    """Lightning advertises its cloud products at every run, and announces a Ctrl-C that
    run_task reports itself; keep the console for results."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return "Tip: For seamless" not in message and "Detected KeyboardInterrupt" not in message


register_resolvers()
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLightningTips())


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def train(cfg: DictConfig) -> float | None:
    return run_task(pipeline.train, cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def evaluate(cfg: DictConfig) -> float | None:
    return run_task(pipeline.evaluate, cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def predict(cfg: DictConfig) -> float | None:
    return run_task(pipeline.predict, cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="prepare")
def prepare(cfg: DictConfig) -> float | None:
    return run_task(pipeline.prepare, cfg)
