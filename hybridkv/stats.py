"""Per-process counters, saved as JSON under ``<layout dir>/stats/``.

The scheduler process (manager) and each worker process keep their own
counters; ``read_stats`` sums every file, so a test, the demo or an operator
sees one total per counter and per group without talking to the engine.

Invariant: a stats file is replaced atomically (``FileIO.write_atomic``), so a reader
never sees half of it. Both sides go through a ``FileIO`` (the store's, where there is
one), so a ``FaultyFileIO`` reaches them too.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import defaultdict
from pathlib import Path

import msgspec

from hybridkv.store.fileio import FileIO

__all__ = ["Counters", "read_stats"]


class Counters:
    """Thread-safe ``{scope: {name: int}}``; scope is ``"all"`` or ``"g<group>"``."""

    def __init__(self, stats_dir: Path | None, role: str, *, min_interval: float = 0.0,
                 io: FileIO | None = None):
        self.io = io if io is not None else FileIO()
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._dirty = False
        self._taken: dict[str, dict[str, int]] = {}  # values at the last ``take_delta``
        self._untaken = False
        self._last_flush = 0.0
        self._min_interval = min_interval
        self.path = None
        if stats_dir is not None:
            name = f"{role}-{socket.gethostname()}-{os.getpid()}.json"
            self.path = Path(stats_dir) / name

    def add(self, name: str, value: int = 1, group: int | None = None) -> None:
        with self._lock:
            self._data["all"][name] += value
            if group is not None:
                self._data[f"g{group}"][name] += value
            self._dirty = True
            self._untaken = True

    def take_delta(self) -> dict[str, dict[str, int]]:
        """What each counter gained since the previous call (only counters that moved);
        for one consumer (the Prometheus path, ``hybridkv.vllm.metrics``)."""
        with self._lock:
            if not self._untaken:
                return {}
            self._untaken = False
            delta: dict[str, dict[str, int]] = {}
            for scope, values in self._data.items():
                taken = self._taken.setdefault(scope, {})
                for name, value in values.items():
                    if value != taken.get(name, 0):
                        delta.setdefault(scope, {})[name] = value - taken.get(name, 0)
                        taken[name] = value
            return delta

    def get(self, name: str, group: int | None = None) -> int:
        with self._lock:
            return self._data["all" if group is None else f"g{group}"].get(name, 0)

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {scope: dict(values) for scope, values in self._data.items()}

    def flush(self, force: bool = False) -> None:
        """Write the file if something changed (at most every ``min_interval`` s)."""
        if self.path is None:
            return
        now = time.monotonic()
        with self._lock:
            if not self._dirty or (not force and now - self._last_flush < self._min_interval):
                return
            body = msgspec.json.encode({scope: dict(v) for scope, v in self._data.items()})
            self._dirty = False
            self._last_flush = now
        try:
            self.io.write_atomic(self.path, body)  # creates the directory if needed
        except OSError:
            pass  # statistics must never break serving


def read_stats(stats_dir: str | Path, io: FileIO | None = None) -> dict[str, dict[str, int]]:
    """Sum of every process's counters in ``stats_dir`` (read through ``io``)."""
    io = io if io is not None else FileIO()
    total: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for path in Path(stats_dir).glob("*.json"):
        try:
            data = msgspec.json.decode(io.read_all(path))
        except (OSError, msgspec.DecodeError):
            continue
        for scope, values in data.items():
            for name, value in values.items():
                total[scope][name] += int(value)
    return {scope: dict(v) for scope, v in total.items()}
