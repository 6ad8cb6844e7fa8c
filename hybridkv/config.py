"""hybridkv's settings, parsed from vLLM's ``kv_connector_extra_config``.

Invariants:
- Parsing either returns a complete, valid ``HybridKVConfig`` or raises
  ``ConfigError`` whose message names the key and the fix. Unknown keys are
  errors (a typo must not silently disable a budget).
- Keys that belong to vLLM's OffloadingConnector pass through untouched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from hybridkv.capacity import DEFAULT_HEADROOM
from hybridkv.policies import policy_names
from hybridkv.store.fileio import DURABILITY_CHOICES, IO_MODE_CHOICES
from hybridkv.store.integrity import IntegrityKeyError, load_key

__all__ = ["ConfigError", "HybridKVConfig", "parse_size", "VLLM_KEYS"]

#: keys of kv_connector_extra_config that vLLM's OffloadingConnector reads itself
VLLM_KEYS = frozenset({
    "spec_name", "spec_module_path", "block_size", "blocks_per_chunk",
    "offload_prompt_only", "self_describing_kv_events", "canonical_layout",
})

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


class ConfigError(ValueError):
    """A hybridkv setting is wrong; the message says which and how to fix it."""


def parse_size(value: Any, key: str = "size") -> int:
    """``200GiB``, ``1.5TB``, ``1048576`` -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like '200GiB' or a byte count, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value!r}")
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ConfigError(
        f"{key}: cannot parse {value!r}; use a byte count or a size such as "
        "'500MiB', '200GiB', '2TB'")


class HybridKVConfig(msgspec.Struct, frozen=True, kw_only=True):
    cache_dir: str
    #: bytes the store may hold on disk (None: unbounded)
    disk_budget: int | None = None
    durability: str = "none"
    file_mode: int = 0o600
    dir_mode: int = 0o700
    io_threads: int = 4
    #: "buffered" (page cache) or "direct" (O_DIRECT; buffered where the filesystem refuses it)
    io_mode: str = "buffered"
    #: file holding a secret: tag every chunk file, serve only correctly tagged ones
    integrity_key_file: str | None = None
    #: seconds between directory rescans when a lookup misses (0 disables)
    refresh_interval: float = 2.0
    #: capacity policy: "group_aware" | "lru" | "watermark" (see hybridkv.policies)
    eviction_policy: str = "group_aware"
    #: also keep windows / states every this many chunks (0: only at request ends and branches)
    checkpoint_interval: int = 0
    #: fraction of disk_budget freed beyond the need when eviction runs (fewer, larger runs)
    eviction_headroom: float = DEFAULT_HEADROOM
    #: seconds between index snapshots (and one at shutdown) for a fast restart (0: none)
    snapshot_interval: float = 300.0
    #: one budget for every engine on the directory: "off", "on", or "auto" (on when disk_budget is set)
    fleet: str = "off"
    #: seconds between the lease holder's directory syncs while other engines are alive
    fleet_interval: float = 5.0
    #: seconds the fleet's eviction lease lasts without renewal (an engine silent 2x this is dead)
    fleet_lease_ttl: float = 15.0

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir)

    @property
    def integrity_key(self) -> bytes | None:
        """The secret of ``integrity_key_file``, read now; ConfigError for a missing, short,
        world-readable or unreadable file (the engine reads it at start, before any load)."""
        if self.integrity_key_file is None:
            return None
        try:
            return load_key(self.integrity_key_file)
        except IntegrityKeyError as exc:
            raise ConfigError(f"integrity_key_file: {exc}") from None

    @property
    def fleet_enabled(self) -> bool:
        return self.disk_budget is not None and self.fleet != "off"

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any]) -> HybridKVConfig:
        known = set(cls.__struct_fields__)
        unknown = sorted(k for k in extra if k not in known and k not in VLLM_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown hybridkv setting(s) {unknown} in kv_connector_extra_config; "
                f"valid keys are {sorted(known)} (plus vLLM's {sorted(VLLM_KEYS)})")
        cache_dir = extra.get("cache_dir") or os.environ.get("HYBRIDKV_CACHE_DIR")
        if not cache_dir or not isinstance(cache_dir, (str, os.PathLike)):
            raise ConfigError(
                "cache_dir: not set; add \"cache_dir\": \"/path/to/dir\" to "
                "kv_connector_extra_config (or set HYBRIDKV_CACHE_DIR)")
        kwargs: dict[str, Any] = {"cache_dir": os.fspath(cache_dir)}
        if extra.get("disk_budget") is not None:
            budget = parse_size(extra["disk_budget"], "disk_budget")
            if budget <= 0:
                raise ConfigError("disk_budget: must be positive (omit it for no limit)")
            kwargs["disk_budget"] = budget
        if "durability" in extra:
            if extra["durability"] not in DURABILITY_CHOICES:
                raise ConfigError(
                    f"durability: {extra['durability']!r} is not one of {DURABILITY_CHOICES}")
            kwargs["durability"] = extra["durability"]
        for mode_key in ("file_mode", "dir_mode"):
            if mode_key in extra:
                kwargs[mode_key] = _parse_mode(extra[mode_key], mode_key)
        if "io_threads" in extra:
            n = extra["io_threads"]
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 256:
                raise ConfigError(f"io_threads: expected an integer in 1..256, got {n!r}")
            kwargs["io_threads"] = n
        if "io_mode" in extra:
            if extra["io_mode"] not in IO_MODE_CHOICES:
                raise ConfigError(
                    f"io_mode: {extra['io_mode']!r} is not one of {IO_MODE_CHOICES}")
            kwargs["io_mode"] = extra["io_mode"]
        if extra.get("integrity_key_file") is not None:
            key_file = extra["integrity_key_file"]
            if not isinstance(key_file, (str, os.PathLike)) or not os.fspath(key_file):
                raise ConfigError(f"integrity_key_file: expected a path, got {key_file!r}")
            # the file itself is checked where the key is read (``integrity_key``), at start
            kwargs["integrity_key_file"] = os.fspath(key_file)
        if "refresh_interval" in extra:
            r = extra["refresh_interval"]
            if isinstance(r, bool) or not isinstance(r, (int, float)) or r < 0:
                raise ConfigError(f"refresh_interval: expected seconds >= 0, got {r!r}")
            kwargs["refresh_interval"] = float(r)
        if "eviction_policy" in extra:
            if extra["eviction_policy"] not in policy_names():
                raise ConfigError(
                    f"eviction_policy: {extra['eviction_policy']!r} is not one of {policy_names()}")
            kwargs["eviction_policy"] = extra["eviction_policy"]
        if "checkpoint_interval" in extra:
            k = extra["checkpoint_interval"]
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ConfigError(
                    f"checkpoint_interval: expected a number of chunks >= 0 (0: off), got {k!r}")
            kwargs["checkpoint_interval"] = k
        if "eviction_headroom" in extra:
            h = extra["eviction_headroom"]
            if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 <= h <= 0.5:
                raise ConfigError(
                    f"eviction_headroom: expected a fraction of disk_budget in 0..0.5, got {h!r}")
            kwargs["eviction_headroom"] = float(h)
        if "snapshot_interval" in extra:
            t = extra["snapshot_interval"]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
                raise ConfigError(
                    f"snapshot_interval: expected seconds >= 0 (0: no index snapshots), got {t!r}")
            kwargs["snapshot_interval"] = float(t)
        kwargs.update(_parse_fleet(extra, kwargs.get("disk_budget")))
        return cls(**kwargs)

    def check_directory(self) -> None:
        """Create ``cache_dir`` if needed; raise ConfigError if it is unusable."""
        path = self.cache_path
        try:
            path.mkdir(parents=True, exist_ok=True, mode=self.dir_mode)
        except OSError as exc:
            raise ConfigError(
                f"cache_dir: cannot create {path}: {exc.strerror}; choose a writable "
                "directory or fix its permissions") from exc
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(
                f"cache_dir: {path} is not writable by this process (uid {os.getuid()}); "
                "choose a writable directory or fix its permissions")


def _parse_fleet(extra: Mapping[str, Any], budget: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "fleet" in extra:
        f = extra["fleet"]
        f = {True: "on", False: "off"}.get(f, f) if isinstance(f, bool) else f
        if f not in ("auto", "on", "off"):
            raise ConfigError(f"fleet: expected 'auto', 'on' or 'off' (or true/false), got {f!r}")
        if f == "on" and budget is None:
            raise ConfigError("fleet: 'on' needs a disk_budget to share; set disk_budget or "
                              "fleet='off'")
        out["fleet"] = f
    for key, low, high in (("fleet_interval", 0.1, 3600.0), ("fleet_lease_ttl", 1.0, 3600.0)):
        if key in extra:
            v = extra[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
                raise ConfigError(f"{key}: expected seconds in {low:g}..{high:g}, got {v!r}")
            out[key] = float(v)
    return out


def _parse_mode(value: Any, key: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ConfigError(f"{key}: expected an octal mode like '0o640' or '640'") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ConfigError(f"{key}: expected a permission mode in 0..0o777, got {value!r}")
    return value
