"""The fleet's eviction lease: ``lease.json`` names one owner until ``expires``.

Invariants:
- The lease is created atomically with its content (``FileIO.write_new``: a
  temp file linked to ``lease.json``, which fails if it exists), so a reader
  never sees an empty lease; only its owner renews it (rename over).
- An expired lease is taken over by renaming it aside (one renamer wins) and
  creating a fresh one; a lease renewed between the read and the rename is put
  back.
- Assumes clocks agree within ``margin`` (NTP); if they do not, two holders may
  evict at once (more eviction than needed: harmless).
- A lease that cannot be written or read is not held: the member keeps serving
  and only stops evicting for the fleet.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from hybridkv.store.file_map import temp_path
from hybridkv.store.fileio import FileIO
from hybridkv.store.fleet.files import read_record

__all__ = ["Lease", "LeaseRecord"]

log = logging.getLogger(__name__)


class LeaseRecord(msgspec.Struct, kw_only=True):
    owner: str
    token: str
    expires: float  # wall-clock seconds


_lease_dec = msgspec.json.Decoder(LeaseRecord)


class Lease:
    """The right to evict for the fleet, renewed while ``margin`` seconds are left."""

    def __init__(self, path: Path, owner: str, ttl: float, *, io: FileIO,
                 clock: Callable[[], float] = time.time):
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        self.path = path
        self.owner = owner
        self.ttl = ttl
        self.margin = ttl / 5
        self.io = io
        self.clock = clock
        self._token: str | None = None
        self._last_token: str | None = None
        self._expires = 0.0

    def holds(self) -> bool:
        """True while this owner's lease has more than ``margin`` seconds left."""
        return self._token is not None and self.clock() < self._expires - self.margin

    def read(self) -> LeaseRecord | None:
        return read_record(self.io, self.path, _lease_dec)

    def acquire(self) -> bool:
        """Hold the lease after this call? Renews our own, takes an expired one."""
        now = self.clock()
        if self.holds():
            if now > self._expires - self.ttl * 2 / 3:
                return self._renew()
            return True
        if self._token is not None:
            self._last_token = self._token
        self._token = None
        current = self.read()
        if current is None:
            if self.path.exists() and not self._stale_garbage(now):
                return False  # unreadable and fresh: someone is writing it; wait
            if self.path.exists():
                self._take(None)
            return self._create()
        if now <= current.expires:
            return False
        return self._take(current) and self._create()

    def release(self) -> None:
        """Give the lease up (clean shutdown): the next member need not wait for expiry."""
        mine = self._token or self._last_token  # ours, even if too close to expiry to use
        if mine is not None:
            current = self.read()
            if current is not None and current.token == mine:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
        self._token = self._last_token = None

    # ------------------------------------------------------------------ internals
    def _record(self, token: str) -> bytes:
        return msgspec.json.encode(LeaseRecord(owner=self.owner, token=token,
                                               expires=self.clock() + self.ttl))

    def _create(self) -> bool:
        token = secrets.token_hex(8)
        body = self._record(token)
        try:
            self.io.write_new(self.path, body)
        except FileExistsError:
            return False  # another member created it first
        except OSError as exc:
            log.warning("hybridkv fleet: cannot create lease %s: %s", self.path, exc)
            return False
        self._token = token
        self._expires = msgspec.json.decode(body)["expires"]
        return True

    def _renew(self) -> bool:
        current = self.read()
        if current is None or current.token != self._token:
            self._token = None  # taken over while we were away
            return False
        body = self._record(self._token)
        try:
            self.io.write_atomic(self.path, body)
        except OSError as exc:
            log.warning("hybridkv fleet: cannot renew lease %s: %s", self.path, exc)
            return self.holds()
        self._expires = msgspec.json.decode(body)["expires"]
        return True

    def _take(self, seen: LeaseRecord | None) -> bool:
        """Move an expired lease aside; False if it was renewed meanwhile (put back)."""
        aside = temp_path(self.path)  # a temp name: removed if we die before the unlink
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # another member moved it first; race on creation instead
        except OSError as exc:
            log.warning("hybridkv fleet: cannot take over lease %s: %s", self.path, exc)
            return False
        moved = read_record(self.io, aside, _lease_dec)
        fresh = seen is not None and (moved is None or moved.token != seen.token
                                      or moved.expires != seen.expires)
        if fresh:  # renewed between our read and the rename: give it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        try:
            os.unlink(aside)
        except OSError:
            pass
        if not fresh:
            log.info("hybridkv fleet: took over expired lease of %s",
                     seen.owner if seen else "an unreadable lease")
        return not fresh

    def _stale_garbage(self, now: float) -> bool:
        try:
            return now - self.path.stat().st_mtime > self.ttl
        except OSError:
            return True
