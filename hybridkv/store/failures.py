"""Why a write failed, in the four words a user acts on, and warnings at a bounded rate.

A chunk store that fails is counted as ``store_failures_<cause>`` (worker side) with
one of ``FAILURE_CAUSES``: ``no_space`` (ENOSPC, EDQUOT: the filesystem or a quota
is full; the service evicts and backs off), ``permission`` (EACCES, EPERM),
``read_only`` (EROFS) and ``other`` (anything else, EIO included).

Invariants:
- ``failure_cause`` is a pure function of the exception: the errno of the first
  ``OSError`` in its ``__cause__`` / ``__context__`` chain, else ``other``.
- ``Warnings.warn`` logs a cause at most once per ``interval`` seconds (one minute by
  default) and says how many of that cause it did not log since.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable

__all__ = ["FAILURE_CAUSES", "NO_SPACE", "Warnings", "failure_cause"]

NO_SPACE = "no_space"
#: every cause, in the order reports print them
FAILURE_CAUSES: tuple[str, ...] = (NO_SPACE, "permission", "read_only", "other")

_BY_ERRNO = {
    errno.ENOSPC: NO_SPACE,
    errno.EDQUOT: NO_SPACE,
    errno.EACCES: "permission",
    errno.EPERM: "permission",
    errno.EROFS: "read_only",
}


def failure_cause(exc: BaseException) -> str:
    """The cause of a failed write: one of ``FAILURE_CAUSES``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return _BY_ERRNO.get(exc.errno, "other")
        exc = exc.__cause__ or exc.__context__
    return "other"


class Warnings:
    """One log warning per cause per ``interval`` seconds, not one per chunk."""

    def __init__(self, logger: logging.Logger, *, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, cause: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless ``cause`` was logged within ``interval``; True if logged."""
        now = self.clock()
        with self._lock:
            last = self._last.get(cause)
            if last is not None and now - last < self.interval:
                self._quiet[cause] = self._quiet.get(cause, 0) + 1
                return False
            self._last[cause] = now
            quiet = self._quiet.pop(cause, 0)
        if quiet:
            message += f" ({quiet} more of this cause not logged in the last " \
                       f"{self.interval:.0f} s)"
        self.logger.warning(message, *args)
        return True
