"""hybridkv's settings, parsed from vLLM's ``kv_connector_extra_config``.

Invariants:
- Parsing either returns a complete, valid ``HybridKVConfig`` or raises
  ``ConfigError`` whose message names the key and the fix. Unknown keys are
  errors (a typo must not silently disable a budget).
- Keys that belong to vLLM's OffloadingConnector pass through untouched.
- The schema is declarative: ``HybridKVConfig``'s annotations (``msgspec.Meta``
  constraints, ``Literal`` choices) are what msgspec checks, strictly (no bool for
  an int, no string for a number); the only code before it turns accepted
  spellings (``"200GiB"``, ``"0o640"``, ``true``, a ``Path``) into the field's type.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect

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
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}: expected a finite byte count, got {value!r}")
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


#: finite seconds (inf is refused: "never" is spelled 0 where a setting allows it)
_FINITE = sys.float_info.max


def _valid(description: str, **constraints: Any) -> msgspec.Meta:
    """A field's constraints; ``description`` completes "KEY: ..., got VALUE" when broken."""
    return msgspec.Meta(description=description, **constraints)


class HybridKVConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The settings, typed and constrained: ``from_extra_config`` checks them with msgspec.

    Each field's ``msgspec.Meta`` holds its constraint and the words of its error.
    """

    cache_dir: Annotated[str, _valid("expected a directory path", min_length=1)]
    #: bytes the store may hold on disk (None: unbounded)
    disk_budget: Annotated[int, _valid(
        "expected a positive size (omit it for no limit)", gt=0)] | None = None
    durability: Annotated[Literal[DURABILITY_CHOICES], _valid(
        f"expected one of {DURABILITY_CHOICES}")] = "none"
    file_mode: Annotated[int, _valid(
        "expected a permission mode in 0..0o777", ge=0, le=0o777)] = 0o600
    dir_mode: Annotated[int, _valid(
        "expected a permission mode in 0..0o777", ge=0, le=0o777)] = 0o700
    io_threads: Annotated[int, _valid("expected an integer in 1..256", ge=1, le=256)] = 4
    #: "buffered" (page cache) or "direct" (O_DIRECT; buffered where the filesystem refuses it)
    io_mode: Annotated[Literal[IO_MODE_CHOICES], _valid(
        f"expected one of {IO_MODE_CHOICES}")] = "buffered"
    #: file holding a secret: tag every chunk file, serve only correctly tagged ones
    integrity_key_file: Annotated[str, _valid("expected a path", min_length=1)] | None = None
    #: seconds a look at the disk is trusted (a miss looks again after this; 0: misses never look)
    refresh_interval: Annotated[float, _valid("expected seconds >= 0", ge=0)] = 2.0
    #: capacity policy: "group_aware" | "lru" | "watermark" (see hybridkv.policies)
    eviction_policy: Annotated[str, _valid(
        "expected the name of a registered policy")] = "group_aware"
    #: also keep windows / states every this many chunks (0: only at request ends and branches)
    checkpoint_interval: Annotated[int, _valid(
        "expected a number of chunks >= 0 (0: off)", ge=0)] = 0
    #: free space the cache filesystem keeps: bytes, "N%" of the filesystem, or None (the
    #: default: 5% of the filesystem or 4 GiB, whichever is smaller); 0: no floor
    min_free_space: Annotated[int, _valid(
        "expected a size >= 0 or a percentage such as '5%'", ge=0)] | Annotated[
        str, _valid("expected a size >= 0 or a percentage such as '5%'",
                    pattern=r"^(100(\.0+)?|[0-9]{1,2}(\.[0-9]+)?)%$")] | None = None
    #: fraction of disk_budget freed beyond the need when eviction runs (fewer, larger runs)
    eviction_headroom: Annotated[float, _valid(
        "expected a fraction of disk_budget in 0..0.5", ge=0, le=0.5)] = DEFAULT_HEADROOM
    #: seconds between index snapshots (and one at shutdown) for a fast restart (0: none)
    snapshot_interval: Annotated[float, _valid(
        "expected seconds >= 0 (0: no index snapshots)", ge=0, le=_FINITE)] = 300.0
    #: one budget for every engine on the directory: "auto" (on when disk_budget is set),
    #: "on", or "off" (each engine keeps its own budget)
    fleet: Annotated[Literal["auto", "on", "off"], _valid(
        "expected 'auto', 'on' or 'off' (or true/false)")] = "auto"
    #: seconds between the lease holder's directory syncs while other engines are alive
    fleet_interval: Annotated[float, _valid(
        "expected seconds in 0.1..3600", ge=0.1, le=3600)] = 5.0
    #: seconds the fleet's eviction lease lasts without renewal (an engine silent 2x this is dead)
    fleet_lease_ttl: Annotated[float, _valid("expected seconds in 1..3600", ge=1, le=3600)] = 15.0
    #: report a disk hit only where loading it is expected faster than recomputing it
    #: (``hybridkv.hit_cost``); False: every servable hit is reported
    hit_cost_rule: bool = False

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
        """Typed settings from ``extra``; ConfigError naming the key on the first bad one.

        Order: unknown keys, ``cache_dir``, each accepted spelling (sizes, octal modes,
        booleans, paths), then msgspec's types and ranges, then rules across settings.
        """
        known = set(cls.__struct_fields__)
        settings = {k: v for k, v in extra.items() if k not in VLLM_KEYS}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(
                f"unknown hybridkv setting(s) {unknown} in kv_connector_extra_config; "
                f"valid keys are {sorted(known)} (plus vLLM's {sorted(VLLM_KEYS)})")
        cache_dir = extra.get("cache_dir") or os.environ.get("HYBRIDKV_CACHE_DIR")
        if not cache_dir or not isinstance(cache_dir, (str, os.PathLike)):
            raise ConfigError(
                "cache_dir: not set; add \"cache_dir\": \"/path/to/dir\" to "
                "kv_connector_extra_config (or set HYBRIDKV_CACHE_DIR)")
        settings["cache_dir"] = cache_dir
        for key, spelling in _SPELLINGS.items():
            if settings.get(key) is not None:
                settings[key] = spelling(settings[key], key)
        try:
            config = msgspec.convert(settings, cls, strict=True)
        except msgspec.ValidationError as exc:
            raise ConfigError(_explain(exc, settings)) from None
        if config.eviction_policy not in policy_names():
            raise ConfigError(f"eviction_policy: expected one of {policy_names()}, "
                              f"got {config.eviction_policy!r}")
        if config.fleet == "on" and config.disk_budget is None:
            raise ConfigError("fleet: 'on' needs a disk_budget to share; set disk_budget or "
                              "fleet='off'")
        return config

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


def _octal(value: Any, key: str) -> Any:
    """``"0o640"`` / ``"640"`` -> 0o640; other values go to msgspec unchanged."""
    if not isinstance(value, str):
        return value
    try:
        return int(value, 8)
    except ValueError:
        raise ConfigError(f"{key}: expected an octal mode like '0o640' or '640'") from None


def _path(value: Any, key: str) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _size_or_percent(value: Any, key: str) -> Any:
    """``"5%"`` stays a percentage (of the filesystem, known at start); sizes -> bytes."""
    if isinstance(value, str) and value.strip().endswith("%"):
        return value.strip()
    return parse_size(value, key)


def _on_off(value: Any, key: str) -> Any:
    return {True: "on", False: "off"}[value] if isinstance(value, bool) else value


#: accepted spellings, normalized to the field's type before msgspec checks it
#: (None stays None: msgspec accepts it where the field is optional, refuses it elsewhere)
_SPELLINGS: dict[str, Callable[[Any, str], Any]] = {
    "cache_dir": _path,
    "disk_budget": parse_size,
    "min_free_space": _size_or_percent,
    "file_mode": _octal,
    "dir_mode": _octal,
    "integrity_key_file": _path,
    "fleet": _on_off,
}


def _expected(info: Any) -> str | None:
    """The ``description`` of a field's ``msgspec.Meta`` (looked for through ``| None``)."""
    if isinstance(info, msgspec.inspect.Metadata):
        return (info.extra_json_schema or {}).get("description") or _expected(info.type)
    for member in getattr(info, "types", ()):
        found = _expected(member)
        if found:
            return found
    return None


_EXPECTED = {f.name: _expected(f.type)
             for f in msgspec.inspect.type_info(HybridKVConfig).fields}
_AT_KEY = re.compile(r" - at `\$\.([A-Za-z_]+)`$")


def _explain(exc: msgspec.ValidationError, settings: Mapping[str, Any]) -> str:
    """msgspec's ``... - at `$.key``` as ``key: <the field's description>, got <value>``."""
    m = _AT_KEY.search(str(exc))
    if m is None or m.group(1) not in _EXPECTED:
        return f"kv_connector_extra_config: {exc}"
    key = m.group(1)
    return f"{key}: {_EXPECTED[key] or 'invalid'}, got {settings.get(key)!r}"
