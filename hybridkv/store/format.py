"""The on-disk chunk format: one self-describing safetensors container per chunk.

A chunk file holds one tensor per layer of its group, named ``layer.<i>``, each
``uint8[num_blocks, page_bytes]``, and one metadata entry ``hybridkv`` holding
a JSON ``ChunkHeader``. The header records what the bytes are (format version,
layout fingerprint, group, kind, chunk position and size, window, layer names,
block range) and an xxh3-64 checksum of the payload: the layer tensors'
bytes in layer order.

Invariants:
- ``verify`` returns payload views only when the header matches what the
  caller expects and the checksum matches; anything else raises
  ``ChunkCorrupt`` (a subclass of ``ChunkError``). There is no partial result.
- A header from a newer ``FORMAT_VERSION`` is never interpreted: it raises
  ``ChunkTooNew`` (not ``ChunkCorrupt``: the file is fine, this reader is old).
- The layer tensors lie back to back in layer order right after the JSON
  header (``verify`` refuses any other table), so the payload is one
  contiguous byte range that one checksum pass covers.
- The JSON header may end in spaces (safetensors allows it): files written for
  O_DIRECT pad it so the whole file is a multiple of ``DIRECT_ALIGN`` bytes.
  Readers of format 1 accept both; the format version is unchanged.
- ``tag`` (optional) is a keyed MAC over payload and header (see
  ``hybridkv.store.integrity``); readers without a key ignore it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import msgspec
import numpy as np
import xxhash

__all__ = [
    "FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "META_KEY",
    "ChunkHeader",
    "ChunkError",
    "ChunkCorrupt",
    "ChunkMissing",
    "ChunkTooNew",
    "ChunkUnreadable",
    "ChunkUntrusted",
    "DIRECT_ALIGN",
    "build_head",
    "checksum",
    "verify",
    "PayloadHasher",
    "encode",
    "read_header",
]

FORMAT_VERSION = 1
META_KEY = "hybridkv"
#: the largest header a reader accepts (a larger claimed length is damage)
MAX_HEADER_BYTES = _MAX_HEADER_BYTES = 16 * 1024 * 1024
#: O_DIRECT wants buffer addresses, file offsets and lengths in multiples of this
DIRECT_ALIGN = 4096


class ChunkError(Exception):
    """A chunk cannot be served; the caller treats it as a miss."""


class ChunkMissing(ChunkError):
    """No file (never stored, evicted, or removed by another engine)."""


class ChunkCorrupt(ChunkError):
    """A file exists but is not the chunk it claims to be, or is damaged."""


class ChunkUntrusted(ChunkCorrupt):
    """An integrity key is set and the file carries no valid keyed tag (possibly forged)."""


class ChunkUnreadable(ChunkError):
    """A file exists but reading it failed (EIO, EACCES, ...)."""


class ChunkTooNew(ChunkError):
    """A file (or layout.json) was written in a format newer than this hybridkv reads."""


class ChunkHeader(msgspec.Struct, frozen=True, kw_only=True):
    """What a chunk file says about itself."""

    version: int
    fingerprint: str
    key: str  # hex
    group: int
    kind: str
    position: int  # end token of the chunk within its prefix
    chunk_tokens: int
    block_offset: int  # first stored block, counted within the chunk
    num_blocks: int
    page_bytes: tuple[int, ...]  # per layer
    layer_names: tuple[str, ...]
    window_tokens: int | None = None
    parent: str | None = None  # hex key of the chunk this one extends
    checksum: str = ""  # xxh3-64 hex of the payload
    tag: str = ""  # keyed MAC hex over payload + header (with tag=""), or "" without a key

    @property
    def payload_bytes(self) -> int:
        return self.num_blocks * sum(self.page_bytes)


_header_decoder = msgspec.json.Decoder(ChunkHeader)
_table_decoder = msgspec.json.Decoder()


def checksum(arrays: Sequence[np.ndarray]) -> str:
    h = xxhash.xxh3_64()
    for arr in arrays:
        h.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
    return h.hexdigest()


def encode(header: ChunkHeader, arrays: Sequence[np.ndarray]) -> list[memoryview]:
    """Serialize a chunk as buffers to write in order (no payload copy), checksum filled in.

    The bytes are a standard safetensors file (``build_head``, then the tensors back
    to back), so any safetensors reader opens it. ``ChunkStore.write`` streams the
    same bytes itself (hashing while it writes); this one-shot form is for tools and
    tests that craft files.
    """
    if len(arrays) != len(header.layer_names):
        raise ValueError("one array per layer is required")
    payload = []
    for i, arr in enumerate(arrays):
        if arr.dtype != np.uint8 or arr.ndim != 2:
            raise ValueError("layer payloads must be uint8[num_blocks, page_bytes]")
        if arr.shape != (header.num_blocks, header.page_bytes[i]):
            raise ValueError(f"layer {i}: shape {arr.shape} does not match header")
        payload.append(np.ascontiguousarray(arr))
    header = msgspec.structs.replace(header, checksum=checksum(payload))
    head = build_head(header, header.page_bytes, header.num_blocks)
    return [memoryview(head)] + [memoryview(a).cast("B") for a in payload]


def build_head(header: ChunkHeader, page_bytes: Sequence[int], num_blocks: int, *,
               align_total: int = 0) -> bytes:
    """The safetensors prefix (length + JSON table) of a chunk whose tensors follow
    back to back. ``align_total``: pad the JSON with spaces so that prefix plus
    payload is a multiple of it (O_DIRECT); else pad to 8 bytes.

    Hex fields have fixed widths, so a header with placeholder checksum / tag has
    the same length as the final one.
    """
    table: dict[str, object] = {}
    offset = 0
    for i, page in enumerate(page_bytes):
        n = num_blocks * page
        table[f"layer.{i}"] = {"dtype": "U8", "shape": [num_blocks, page],
                               "data_offsets": [offset, offset + n]}
        offset += n
    table["__metadata__"] = {META_KEY: msgspec.json.encode(header).decode()}
    head = msgspec.json.encode(table)
    if align_total:
        head += b" " * (-(8 + len(head) + offset) % align_total)
    else:
        head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


def _parse_header(prefix: bytes | memoryview) -> tuple[ChunkHeader, dict, int]:
    if len(prefix) < 8:
        raise ChunkCorrupt("file shorter than a safetensors header")
    (n,) = struct.unpack("<Q", bytes(prefix[:8]))
    if n > _MAX_HEADER_BYTES or len(prefix) < 8 + n:
        raise ChunkCorrupt("truncated or oversized safetensors header")
    try:
        st_header = _table_decoder.decode(prefix[8:8 + n])
        if not isinstance(st_header, dict):
            raise TypeError("safetensors header is not an object")
        raw = st_header["__metadata__"][META_KEY]
        header = _header_decoder.decode(raw)
    except (ValueError, KeyError, TypeError, msgspec.DecodeError) as exc:
        raise ChunkCorrupt(f"unreadable chunk header: {exc}") from exc
    if header.version > FORMAT_VERSION:
        raise ChunkTooNew(
            f"chunk format version {header.version} is newer than this hybridkv "
            f"({FORMAT_VERSION}); upgrade hybridkv to read it"
        )
    return header, st_header, 8 + n


def read_header(prefix: bytes | memoryview) -> ChunkHeader:
    """Header from the first bytes of a file (enough to cover the JSON header)."""
    return _parse_header(prefix)[0]


def verify(view: memoryview, expect: dict, tagger=None,
           hashed: PayloadHasher | None = None) -> tuple[ChunkHeader, list[np.ndarray]]:
    """Check a whole chunk file held in ``view``; return its header and per-layer views.

    ``expect``: header fields that must match. ``tagger`` (an
    ``integrity.Tagger``): the file must also carry its valid keyed tag, else
    ``ChunkUntrusted``. ``hashed``: a ``PayloadHasher`` that already hashed this
    very ``view`` while it was read (used only if it covered exactly the payload).
    Nothing is returned unless every check passed.
    """
    if hashed is not None and hashed.parsed is not None:
        header, st_header, data_start = hashed.parsed  # parsed from these very bytes
    else:
        header, st_header, data_start = _parse_header(view)
    for field, want in expect.items():
        got = getattr(header, field)
        if got != want:
            raise ChunkCorrupt(f"header {field}={got!r}, expected {want!r}")
    if len(view) != data_start + header.payload_bytes:
        raise ChunkCorrupt(
            f"file is {len(view)} bytes, header promises {data_start + header.payload_bytes}"
        )
    if len(st_header) != len(header.page_bytes) + 1:
        raise ChunkCorrupt("tensor table does not match the header's layers")
    payload = view[data_start:data_start + header.payload_bytes]
    try:
        arrays = []
        offset = 0
        for i, page in enumerate(header.page_bytes):
            info = st_header[f"layer.{i}"]
            n = header.num_blocks * page
            if (info["dtype"] != "U8" or list(info["shape"]) != [header.num_blocks, page]
                    or list(info["data_offsets"]) != [offset, offset + n]):
                raise ChunkCorrupt(f"layer {i}: tensor does not match the header")
            arr = np.frombuffer(payload[offset:offset + n], dtype=np.uint8)
            arrays.append(arr.reshape(header.num_blocks, page))
            offset += n
    except (KeyError, TypeError, ValueError) as exc:
        raise ChunkCorrupt(f"malformed tensor table: {exc}") from exc
    done = hashed is not None and hashed.covered(data_start, header.payload_bytes)
    digest = hashed.hasher.hexdigest() if done else xxhash.xxh3_64_hexdigest(payload)
    if digest != header.checksum:
        raise ChunkCorrupt("payload checksum mismatch")
    if tagger is not None:
        tagger.check(header, payload, hashed.mac if done else None)
    return header, arrays


class PayloadHasher:
    """Hashes a chunk's payload while the file is read into ``view`` (``update(n)``
    after each piece): xxh3, plus the keyed MAC when ``mac`` is given, over bytes
    still in cache. ``verify`` trusts it only if it saw exactly the payload range."""

    __slots__ = ("view", "hasher", "mac", "start", "end", "pos", "failed", "parsed")

    def __init__(self, view: memoryview, mac=None):
        self.view, self.mac = view, mac
        self.hasher = xxhash.xxh3_64()
        self.start = self.end = self.pos = -1
        self.failed = False
        self.parsed: tuple[ChunkHeader, dict, int] | None = None

    def __call__(self, avail: int) -> None:
        if self.failed:
            return
        if self.start < 0:
            if avail < 8:
                return
            (n,) = struct.unpack("<Q", self.view[:8])
            if avail < 8 + n or n > _MAX_HEADER_BYTES:
                self.failed = avail >= 8 + min(n, _MAX_HEADER_BYTES)
                return
            try:
                self.parsed = _parse_header(self.view[:8 + n])
            except ChunkError:
                self.failed = True  # verify will say why
                return
            header = self.parsed[0]
            self.start = self.pos = 8 + n
            self.end = self.start + header.payload_bytes
        stop = min(avail, self.end)
        if stop > self.pos:
            piece = self.view[self.pos:stop]
            self.hasher.update(piece)
            if self.mac is not None:
                self.mac.update(piece)
            self.pos = stop

    def covered(self, start: int, length: int) -> bool:
        return not self.failed and self.start == start and self.pos == self.end == start + length
