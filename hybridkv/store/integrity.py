"""Keyed tags that make chunk files tamper-evident in a shared directory.

xxh3 detects damage, not forgery: anyone who can write the directory can plant
a file with a correct xxh3. With a secret key, every chunk file carries
``tag`` = HMAC-SHA256(key, payload || header-with-tag-""), hex, in its header.

Invariants:
- ``load_key`` returns a key only from a regular, non-empty (>= 16 bytes) file
  that other users cannot read; anything else raises ``IntegrityKeyError``
  naming the file and the fix.
- ``Tagger.check`` returns only when the tag is present and equal (constant
  time compare) to the MAC of exactly the bytes that will be served; otherwise
  it raises ``ChunkUntrusted``. The safetensors table is not covered by the
  MAC, but ``format.verify`` accepts only the one table the header implies.
- HMAC-SHA256 (hashlib, GIL released on large buffers) over BLAKE2b: about 2x
  faster here with SHA extensions.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

import msgspec

from hybridkv.store.fileio import FileIO
from hybridkv.store.format import ChunkHeader, ChunkUntrusted

__all__ = ["IntegrityKeyError", "MIN_KEY_BYTES", "TAG_HEX_CHARS", "Tagger", "load_key"]

MIN_KEY_BYTES = 16
TAG_HEX_CHARS = 64  # sha256 hexdigest


class IntegrityKeyError(ValueError):
    """The integrity key file is unusable; the message names it and the fix."""


def load_key(path: str | os.PathLike, io: FileIO | None = None) -> bytes:
    """The secret in ``path`` (raw bytes, used as is), read through ``io``."""
    p = Path(path)
    fix = (f"create it with `head -c 32 /dev/urandom > {p} && chmod 600 {p}` "
           "(the same file on every engine that shares the directory)")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise IntegrityKeyError(f"{p} does not exist; {fix}") from None
    except OSError as exc:
        raise IntegrityKeyError(f"cannot stat {p}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise IntegrityKeyError(f"{p} is not a regular file; {fix}")
    if st.st_mode & stat.S_IROTH or st.st_mode & stat.S_IWOTH:
        raise IntegrityKeyError(
            f"{p} is readable or writable by every user (mode {st.st_mode & 0o777:#o}); "
            f"run `chmod o-rw {p}` (0600 or 0640)")
    try:
        key = (io if io is not None else FileIO()).read_all(p)
    except OSError as exc:
        raise IntegrityKeyError(f"cannot read {p}: {exc.strerror}") from None
    if len(key) < MIN_KEY_BYTES:
        raise IntegrityKeyError(
            f"{p} holds {len(key)} bytes, fewer than {MIN_KEY_BYTES}; {fix}")
    return key


class Tagger:
    """Computes and checks the keyed tag of chunk files."""

    def __init__(self, key: bytes):
        if len(key) < MIN_KEY_BYTES:
            raise IntegrityKeyError(f"integrity key has {len(key)} bytes, need {MIN_KEY_BYTES}")
        self._key = bytes(key)

    def start(self):
        """A MAC to feed the payload into (in order), then hand to ``finish``."""
        return hmac.new(self._key, digestmod=hashlib.sha256)

    @staticmethod
    def finish(mac, header: ChunkHeader) -> str:
        mac.update(msgspec.json.encode(msgspec.structs.replace(header, tag="")))
        return mac.hexdigest()

    def tag(self, header: ChunkHeader, payload) -> str:
        mac = self.start()
        mac.update(payload)
        return self.finish(mac, header)

    def check(self, header: ChunkHeader, payload, mac=None) -> None:
        """``mac``: a MAC from ``start`` already fed exactly ``payload``."""
        if not header.tag:
            raise ChunkUntrusted("no integrity tag (written without the key, or forged)")
        tag = self.finish(mac, header) if mac is not None else self.tag(header, payload)
        if not hmac.compare_digest(tag, header.tag):
            raise ChunkUntrusted("integrity tag mismatch (written with another key, or forged)")
