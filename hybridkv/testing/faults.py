"""Fault injection for tests: a ``FileIO`` that fails on purpose.

A TESTING AID, never for production (``hybridkv.testing``: nothing outside it
imports this module, and no environment variable turns it on). It lets the
fault-injection suite (``tests/store/test_faults.py``) produce ENOSPC, EIO, EACCES,
EROFS, slow or half-written files and files that vanish at load time inside
real vLLM engine processes, where a test cannot reach the store object.

Inside an engine, select ``hybridkv.testing.connector`` (its
``FaultInjectingConnector`` builds each store's I/O with ``file_io_from_rules``)
and give the rules under the ``kv_connector_extra_config`` key ``testing_faults``:

- inline rules: ``"testing_faults": {"rules": [{"op": "write", "errno": "ENOSPC"}]}``
  (or the same as a JSON string);
- or a path to a JSON file of the same shape. The file is re-read whenever it
  changes (one ``stat`` per I/O call), so a test can switch faults on and off
  while the engine runs; a missing file means no faults.

Each rule (all fields optional except ``op``)::

    {"op": "write" | "read" | "read_prefix" | "makedirs" | "*",  (or a list)
     "errno": "ENOSPC" | "EIO" | "EACCES" | "EROFS" | <int>,      raise this
     "keys": ["<hex key or prefix>", ...],   only files whose name starts so
     "group": 1,                             only files under .../g1/...
     "path": "substring",                   only paths containing this
     "skip": 0,                              let the first N matching calls pass
     "count": 3,                             fire at most N times (per process)
     "partial": true,                        write: the temp file holds half the
                                             file's size while delaying / failing
     "delay": 2.0,                           sleep this long (then fail if errno)
     "vanish": true}                         read: delete the file first (as if
                                             another engine evicted it)

``op`` names the ``FileIO`` extension point (``hybridkv.store.fileio``):
``write`` = every file written (``before_write``: chunks, ``layout.json``, the
index snapshot, the fleet's lease, usage and state files, the stats files, the
start-up write probe), ``read`` = every whole-file read (chunk loads in the worker,
``layout.json``, snapshot, fleet and stats files), ``read_prefix`` = header reads
(scan, refresh, store completion, in the manager), ``makedirs``. ``path``
matches the final path (``"path": "lease.json"``), never the temp file's.
Counters of fired faults are per process and restart from zero whenever the
rules file changes.
"""

from __future__ import annotations

import errno as _errno
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from hybridkv.store.fileio import Durability, FileIO

__all__ = ["RULES_KEY", "FaultRule", "FaultyFileIO", "file_io_from_rules", "parse_rules"]

log = logging.getLogger(__name__)

#: the kv_connector_extra_config key FaultInjectingConnector reads (and hides from hybridkv)
RULES_KEY = "testing_faults"
OPS = ("write", "read", "read_prefix", "makedirs")


class FaultRule:
    __slots__ = ("ops", "err", "keys", "group", "path", "skip", "count", "partial", "delay",
                 "vanish", "seen", "fired")

    def __init__(self, spec: dict[str, Any]):
        unknown = set(spec) - {"op", "errno", "keys", "group", "path", "skip", "count",
                               "partial", "delay", "vanish"}
        if unknown:
            raise ValueError(f"{RULES_KEY}: unknown rule fields {sorted(unknown)}")
        ops = spec.get("op", "*")
        ops = [ops] if isinstance(ops, str) else list(ops)
        self.ops = set(OPS) if "*" in ops else set(ops)
        if not self.ops <= set(OPS):
            raise ValueError(f"{RULES_KEY}: op must be among {OPS} or '*', got {ops}")
        err = spec.get("errno")
        if isinstance(err, str):
            if not hasattr(_errno, err):
                raise ValueError(f"{RULES_KEY}: unknown errno name {err!r}")
            err = getattr(_errno, err)
        self.err: int | None = err
        keys = spec.get("keys")
        self.keys: tuple[str, ...] | None = tuple(keys) if keys else None
        self.group: int | None = spec.get("group")
        self.path: str | None = spec.get("path")
        self.skip = int(spec.get("skip", 0))
        self.count: int | None = spec.get("count")
        self.partial = bool(spec.get("partial", False))
        self.delay = float(spec.get("delay", 0.0))
        self.vanish = bool(spec.get("vanish", False))
        self.seen = 0
        self.fired = 0

    def matches(self, op: str, path: Path) -> bool:
        if op not in self.ops:
            return False
        if self.keys is not None and not any(path.name.startswith(k) for k in self.keys):
            return False
        if self.group is not None and f"g{self.group}" not in path.parts:
            return False
        if self.path is not None and self.path not in str(path):
            return False
        return True

    def take(self) -> bool:
        """Count one matching call; True if the fault fires for it."""
        self.seen += 1
        if self.seen <= self.skip:
            return False
        if self.count is not None and self.fired >= self.count:
            return False
        self.fired += 1
        return True


def parse_rules(doc: Any) -> list[FaultRule]:
    """``{"rules": [...]}`` or a bare list of rules."""
    if isinstance(doc, dict):
        doc = doc.get("rules", [])
    if not isinstance(doc, list):
        raise ValueError(f"{RULES_KEY}: expected a list of rules or {{\"rules\": [...]}}")
    return [FaultRule(r) for r in doc]


class FaultyFileIO(FileIO):
    """``FileIO`` that applies fault rules (inline, or from a file re-read on change)."""

    def __init__(self, rules: list[FaultRule] | None = None, *,
                 rules_file: str | Path | None = None, durability: Durability = "none",
                 file_mode: int = 0o600, dir_mode: int = 0o700):
        super().__init__(durability, file_mode, dir_mode)
        self._rules = list(rules or [])
        self._rules_file = Path(rules_file) if rules_file else None
        self._rules_stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ rules
    def _current_rules(self) -> list[FaultRule]:
        if self._rules_file is None:
            return self._rules
        try:
            st = os.stat(self._rules_file)
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._rules_stamp:
            rules: list[FaultRule] = []
            if stamp is not None:
                try:
                    rules = parse_rules(json.loads(self._rules_file.read_text()))
                except (OSError, ValueError) as exc:
                    log.error("hybridkv faults: cannot read %s: %s", self._rules_file, exc)
                    return self._rules
            self._rules, self._rules_stamp = rules, stamp
        return self._rules

    def _fire(self, op: str, path: Path) -> FaultRule | None:
        with self._lock:
            for rule in self._current_rules():
                if rule.matches(op, path) and rule.take():
                    log.warning("hybridkv faults: injecting %s on %s %s", _describe(rule), op,
                                path.name)
                    return rule
        return None

    @staticmethod
    def _raise(rule: FaultRule, path: Path) -> None:
        if rule.err is not None:
            raise OSError(rule.err, os.strerror(rule.err), str(path))

    # ------------------------------------------------------------------ FileIO hooks
    def makedirs(self, path: Path) -> None:
        rule = self._fire("makedirs", Path(path))
        if rule is not None:
            time.sleep(rule.delay)
            self._raise(rule, Path(path))
        super().makedirs(path)

    def before_write(self, path: Path, fd: int, size: int) -> None:
        path = Path(path)
        rule = self._fire("write", path)
        if rule is None:
            return
        if rule.partial:  # the temp file holds half the file while we wait or fail
            os.ftruncate(fd, size // 2)
        time.sleep(rule.delay)
        self._raise(rule, path)

    def before_read(self, op: str, path) -> None:
        path = Path(path)
        rule = self._fire(op, path)
        if rule is None:
            return
        if rule.vanish:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        time.sleep(rule.delay)
        self._raise(rule, path)


def _describe(rule: FaultRule) -> str:
    parts = []
    if rule.err is not None:
        parts.append(_errno.errorcode.get(rule.err, str(rule.err)))
    if rule.partial:
        parts.append("partial write")
    if rule.delay:
        parts.append(f"delay {rule.delay}s")
    if rule.vanish:
        parts.append("vanish")
    return ", ".join(parts) or "no-op"


def file_io_from_rules(value: Any, durability: Durability = "none", file_mode: int = 0o600,
                       dir_mode: int = 0o700) -> FaultyFileIO:
    """A ``FaultyFileIO`` from inline rules (a list, a dict or their JSON) or a rules-file path."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        value = json.loads(value)
    if isinstance(value, (list, dict)):
        io = FaultyFileIO(parse_rules(value), durability=durability, file_mode=file_mode,
                          dir_mode=dir_mode)
    elif isinstance(value, (str, os.PathLike)) and str(value).strip():
        io = FaultyFileIO(rules_file=value, durability=durability, file_mode=file_mode,
                          dir_mode=dir_mode)
    else:
        raise ValueError(f"{RULES_KEY}: expected rules or a rules-file path, got {value!r}")
    log.warning("hybridkv: fault injection is ACTIVE (%s; testing only)", RULES_KEY)
    return io
