"""One bad case never stops the others: how a case's failure is reported, and the summary
that ends a run in which some cases failed.

Predict, eval (both modes and the test report after training) and prepare catch every
exception raised while a case is read, processed or written, turn it into one line naming
the case's file(s) and the problem, and go on with the next case. Running out of memory or
disk space is not the case's fault and would only repeat on the next one: it stops the run.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence

import torch

from medseg.errors import DataError, MedsegError, ResourceError

log = logging.getLogger(__name__)

# errno values of a full disk or an exhausted quota
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def case_failure(error: Exception, files: str, action: str) -> str:
    """The one line that reports a case whose processing raised `error`, logged as an error.

    A MedsegError is reported by its own message (it names the file); any other exception
    as ``<files>: could not be <action> (<type>: <message>)``. When a library raised (any
    other exception, or one a MedsegError wraps), its traceback goes to the log file only
    (DEBUG), for a bug report. Out of memory or disk space raises ResourceError instead:
    the run stops.
    """
    if _is_exhausted(error):
        raise ResourceError(
            f"{files}: ran out of {_resource(error)} while being {action} "
            f"({_one_line(error)}); stopping here, the cases done so far are kept"
        ) from error
    if isinstance(error, MedsegError):
        message = str(error)
    else:
        message = f"{files}: could not be {action} ({_one_line(error)})"
    if not isinstance(error, MedsegError) or error.__cause__ is not None:
        log.debug("%s", message, exc_info=error)
    log.error("%s", message)
    return message


def raise_failures(failures: Sequence[str], total: int, what: str, others: str) -> None:
    """End a run in which cases failed: one DataError listing every failure, e.g.
    ``2 of 5 input(s) could not be predicted (the others were written to out/):``."""
    if not failures:
        return
    lines = "\n".join(f"  - {failure}" for failure in failures)
    where = f" (the others {others})" if len(failures) < total else ""
    raise DataError(f"{len(failures)} of {total} {what}{where}:\n{lines}")


def _is_exhausted(error: Exception) -> bool:
    return isinstance(error, MemoryError | torch.cuda.OutOfMemoryError) or (
        isinstance(error, OSError) and error.errno in _NO_SPACE
    )


def _resource(error: Exception) -> str:
    return "disk space" if isinstance(error, OSError) else "memory"


def _one_line(error: Exception) -> str:
    """``<type>: <message>`` on one line (ITK's messages span several)."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
