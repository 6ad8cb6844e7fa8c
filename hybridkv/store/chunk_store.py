"""A directory of chunk files for one layout: write, verify-and-read, delete, scan.

Invariants:
- A chunk is visible only complete (``FileIO.write_atomic``).
- ``read`` returns bytes only after the header matches the expected key,
  group, fingerprint and sizes and the checksum matches; a file that fails is
  moved to ``quarantine/`` (never read again) and ``ChunkCorrupt`` is raised.
- A file that vanished (evicted by another engine) raises ``ChunkMissing``.
- A file that cannot be read (EIO, ...) raises ``ChunkUnreadable`` and is
  quarantined too, except on a permission error (EACCES/EPERM: a deployment
  problem, not a bad file), which leaves it in place.
- Nothing written by a newer hybridkv is interpreted or moved: a newer
  ``layout.json`` (``ensure_dirs``) or chunk header (``scan``, ``read``) raises
  ``ChunkTooNew``.
- The store never loads a file of another layout fingerprint: the fingerprint
  names the directory and is checked again in every header.
- ``read_into`` fills the caller's buffer and returns views into it only after
  every check passed; on failure the buffer holds unverified bytes that no
  returned object refers to.
- With an integrity key, every file written carries its keyed tag and a file
  without a valid one is ``ChunkUntrusted`` (quarantined, never served).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import struct
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import numpy as np
import xxhash

from hybridkv.chunks import ChunkRecord
from hybridkv.groups import HybridLayout
from hybridkv.keys import key_group, key_hex
from hybridkv.store.direct import (
    DIRECT_ALIGN,
    StagingBuffers,
    align_up,
    aligned_empty,
    is_aligned,
)
from hybridkv.store.file_map import (
    STALE_TMP_SECONDS,
    FileMap,
    Leaf,
    LayoutFileInvalid,
    is_chunk_name,
    key_of_name,
    list_names,
    read_layout_file,
    remove_stale_temp,
    temp_files,
    write_layout_file,
)
from hybridkv.store.fileio import FileIO
from hybridkv.store.format import (
    FORMAT_VERSION,
    ChunkCorrupt,
    ChunkHeader,
    ChunkMissing,
    ChunkTooNew,
    MAX_HEADER_BYTES,
    ChunkUnreadable,
    PayloadHasher,
    build_head,
    read_header,
    verify,
)
from hybridkv.store.integrity import Tagger

__all__ = ["ChunkStore", "StoredChunk", "ChunkRecord"]

log = logging.getLogger(__name__)

_HEADER_PROBE_BYTES = 64 * 1024
#: payload slices hashed (and, in direct mode, copied) at a time: cache-sized
_SLICE_BYTES = 1 << 20
#: JSON header bound beyond what a maximal header of the group encodes to
_HEADER_SLACK = 1024
_MAX_KEY_HEX = 256  # bound on the hex length of a key or parent (vLLM's are 64 + 8)


#: what a scan finds: the record type shared with the index and its snapshot
StoredChunk = ChunkRecord


class ChunkStore:
    def __init__(self, cache_dir: str | Path, layout: HybridLayout, *, rank: int = 0,
                 io: FileIO | None = None, io_mode: str | None = None,
                 integrity_key: bytes | None = None):
        """``io_mode`` ("buffered" | "direct") overrides the mode of ``io`` (which the
        store then owns); ``integrity_key``: tag every file and serve only tagged ones."""
        self.layout = layout
        self.fingerprint = layout.fingerprint
        self.paths = FileMap(cache_dir, self.fingerprint, rank)
        self.io = io or FileIO()
        #: ``ensure_dirs`` succeeded (False: not yet, e.g. the disk was full at start)
        self.layout_written = False
        if io_mode is not None:
            self.io.io_mode = io_mode
        self.tagger = Tagger(integrity_key) if integrity_key else None
        self._staging = StagingBuffers()
        self._max_file_bytes: dict[int, int] = {}

    # ------------------------------------------------------------------ setup
    def ensure_dirs(self) -> None:
        """Create the layout directory and write ``layout.json`` once.

        Raises ``ChunkTooNew`` when an existing ``layout.json`` declares a newer
        format than this hybridkv writes.
        """
        self.check_layout_file()
        self.io.makedirs(self.paths.rank_dir())
        write_layout_file(self.io, self.paths.layout_file, self.layout)
        self.layout_written = True

    def check_layout_file(self) -> None:
        """Refuse a layout directory written by a newer hybridkv (``ChunkTooNew``);
        an unreadable or foreign ``layout.json`` is logged and left alone."""
        path = self.paths.layout_file
        try:
            read_layout_file(self.io, path)
        except FileNotFoundError:
            return
        except (OSError, LayoutFileInvalid) as exc:
            log.warning("hybridkv: ignoring unreadable %s: %s", path, exc)

    def check_writable(self) -> None:
        """Raise OSError with a clear message when chunks cannot be written here."""
        self.io.check_writable(self.paths.rank_dir())

    # ------------------------------------------------------------------ chunks
    def path(self, key: bytes, rank: int | None = None) -> Path:
        return self.paths.chunk(key, rank)

    def exists(self, key: bytes) -> bool:
        return self.path(key).exists()

    def write(self, key: bytes, *, position: int, block_offset: int,
              arrays: Sequence[np.ndarray], parent: bytes | None = None) -> int:
        """Store one chunk. Returns bytes written (0 if it already existed)."""
        group = self.layout.group(key_group(key))
        path_str = self.paths.chunk_str(key)
        if os.path.exists(path_str):
            return 0
        path = Path(path_str)
        if len(arrays) != len(group.layer_names):
            raise ValueError(f"group {group.index}: {len(arrays)} arrays for "
                             f"{len(group.layer_names)} layers")
        num_blocks = int(arrays[0].shape[0]) if arrays else 0
        for i, arr in enumerate(arrays):
            if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[0] != num_blocks:
                raise ValueError(f"layer {i}: payloads must be uint8[num_blocks, page_bytes], "
                                 f"got {arr.dtype}{list(arr.shape)}")
        header = ChunkHeader(
            version=FORMAT_VERSION, fingerprint=self.fingerprint, key=key_hex(key),
            group=group.index, kind=group.kind.value, position=position,
            chunk_tokens=group.chunk_tokens, block_offset=block_offset,
            num_blocks=num_blocks,
            page_bytes=tuple(int(a.shape[1]) for a in arrays),
            layer_names=group.layer_names, window_tokens=group.window_tokens,
            parent=key_hex(parent) if parent is not None else None,
            checksum="0" * 16, tag="0" * 64 if self.tagger else "",
        )
        views = [memoryview(np.ascontiguousarray(a)).cast("B") for a in arrays]
        payload_bytes = sum(v.nbytes for v in views)
        direct = self.io.direct
        # placeholder hex fields have the final widths: the head's length is final
        head_len = len(build_head(header, header.page_bytes, num_blocks,
                                  align_total=DIRECT_ALIGN if direct else 0))
        hasher = xxhash.xxh3_64()
        mac = self.tagger.start() if self.tagger else None
        # O_DIRECT straight from the caller's pages when they are whole aligned pages
        # (a KV cache's usually are); the head is then a page multiple itself
        zero_copy = direct and all(is_aligned(v) for v in views)
        if not direct and payload_bytes > _SLICE_BYTES:
            # large buffered chunk: hash each slice right before the kernel copies it
            self.io.write_streamed(path, head_len, views, functools.partial(
                _feed, hasher, mac), functools.partial(
                self._final_head, header, hasher, mac, 0), _SLICE_BYTES)
            return head_len + payload_bytes
        if direct and not zero_copy:  # one aligned buffer: copy + hash each slice in cache
            total = head_len + payload_bytes
            staging = self._staging.get(total)
            dst = memoryview(staging)
            pos = head_len
            for v in views:
                for lo in range(0, v.nbytes, _SLICE_BYTES):
                    part = v[lo:lo + _SLICE_BYTES]
                    dst[pos:pos + part.nbytes] = part
                    _feed(hasher, mac, dst[pos:pos + part.nbytes])
                    pos += part.nbytes
        else:
            for v in views:
                _feed(hasher, mac, v)
        head = self._final_head(header, hasher, mac, DIRECT_ALIGN if direct else 0)
        if len(head) != head_len:  # pragma: no cover - fixed-width fields
            raise AssertionError("chunk header changed length")
        if zero_copy:
            head_buf = memoryview(self._staging.get(head_len))[:head_len]
            head_buf[:] = head
            self.io.write_atomic(path, [head_buf, *views])
        elif direct:
            dst[:head_len] = head
            self.io.write_atomic(path, dst[:total])
        else:
            self.io.write_atomic(path, [memoryview(head), *views])
        return head_len + payload_bytes

    def _final_head(self, header: ChunkHeader, hasher, mac, align_total: int) -> bytes:
        """The file's head once the whole payload went through ``hasher`` (and ``mac``)."""
        header = msgspec.structs.replace(header, checksum=hasher.hexdigest(), tag="")
        if mac is not None:
            header = msgspec.structs.replace(header, tag=self.tagger.finish(mac, header))
        return build_head(header, header.page_bytes, header.num_blocks, align_total=align_total)

    def max_file_bytes(self, group_index: int) -> int:
        """Upper bound of one chunk file of ``group_index`` (header included), rounded up
        to ``DIRECT_ALIGN``: a buffer this large holds any valid chunk of the group."""
        bound = self._max_file_bytes.get(group_index)
        if bound is None:
            group = self.layout.group(group_index)
            big = 10**19  # widest integer any field may carry
            layers = len(group.layer_names)
            header = ChunkHeader(
                version=FORMAT_VERSION, fingerprint=self.fingerprint, key="f" * _MAX_KEY_HEX,
                group=group.index, kind=group.kind.value, position=big,
                chunk_tokens=group.chunk_tokens, block_offset=big,
                num_blocks=group.blocks_per_chunk, page_bytes=(group.page_bytes,) * layers,
                layer_names=group.layer_names, window_tokens=group.window_tokens,
                parent="f" * _MAX_KEY_HEX, checksum="0" * 16, tag="0" * 64)
            head = build_head(header, header.page_bytes, big)  # widest offsets
            payload = group.blocks_per_chunk * group.page_bytes * layers
            bound = align_up(len(head) + _HEADER_SLACK + payload)
            self._max_file_bytes[group_index] = bound
        return bound

    def read(self, key: bytes) -> tuple[ChunkHeader, list[np.ndarray]]:
        """Verified payload, or ChunkMissing / ChunkCorrupt / ChunkUnreadable / ChunkTooNew.

        The arrays are views into a new buffer of ``max_file_bytes`` (only the
        file's pages are touched)."""
        return self.read_into(key, aligned_empty(self.max_file_bytes(key_group(key))))

    def read_into(self, key: bytes, buf) -> tuple[ChunkHeader, list[np.ndarray]]:
        """Read, verify and return the chunk as views INTO ``buf``.

        ``buf``: writable C-contiguous bytes (buffer protocol) of at least
        ``max_file_bytes(group)``; page-aligned for O_DIRECT. Raises what ``read``
        raises, and ValueError for a buffer too small for the file.
        """
        group = self.layout.group(key_group(key))
        path = self.paths.chunk_str(key)
        view = memoryview(buf)
        if view.readonly or not view.c_contiguous:
            raise ValueError("read_into needs a writable, C-contiguous buffer")
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        hashed = PayloadHasher(view, self.tagger.start() if self.tagger else None)
        try:
            size, got = self.io.read_into(path, view, hashed, _SLICE_BYTES)
        except FileNotFoundError as exc:
            raise ChunkMissing(f"no chunk file {os.path.basename(path)}") from exc
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise ChunkMissing(str(exc)) from exc
            if exc.errno not in (errno.EACCES, errno.EPERM):
                self.quarantine(key, f"read failed: {exc}")
            raise ChunkUnreadable(f"cannot read {os.path.basename(path)}: {exc}") from exc
        try:
            if size > len(view):
                if len(view) < self.max_file_bytes(group.index):
                    raise ValueError(f"buffer of {len(view)} bytes is smaller than "
                                     f"max_file_bytes({group.index})")
                raise ChunkCorrupt(f"file of {size} bytes exceeds any chunk of group "
                                   f"{group.index}")
            if got != size:
                raise ChunkCorrupt(f"read {got} of {size} bytes (file changed under us)")
            return verify(view[:size], dict(
                fingerprint=self.fingerprint, key=key_hex(key), group=group.index,
                kind=group.kind.value, chunk_tokens=group.chunk_tokens,
                layer_names=group.layer_names), self.tagger, hashed)
        except ChunkCorrupt as exc:
            self.quarantine(key, str(exc))
            raise

    def delete(self, key: bytes) -> bool:
        try:
            os.unlink(self.path(key))
            return True
        except FileNotFoundError:
            return False

    def quarantine(self, key: bytes, reason: str) -> None:
        """Move a bad file aside so nothing reads it again (best effort)."""
        src = self.path(key)
        dst = self.paths.quarantine_path(src.name)
        log.warning("hybridkv: quarantining chunk %s: %s", src.name, reason)
        try:
            self.io.makedirs(dst.parent)
            os.replace(src, dst)
        except OSError:
            try:
                os.unlink(src)
            except OSError:
                pass

    # ------------------------------------------------------------------ scanning
    def header_of(self, path: Path) -> ChunkHeader:
        prefix = self.io.read_prefix(path, _HEADER_PROBE_BYTES)
        if len(prefix) >= 8:
            (n,) = struct.unpack("<Q", prefix[:8])
            if n > MAX_HEADER_BYTES:  # never allocate what a damaged length claims
                raise ChunkCorrupt(f"{path.name}: header length {n} exceeds {MAX_HEADER_BYTES}")
            if 8 + n > len(prefix):
                prefix = self.io.read_prefix(path, 8 + n)
        return read_header(prefix)

    def describe(self, key: bytes) -> ChunkRecord:
        """The record of ``key``'s file, from its header and stat.

        Raises OSError (FileNotFoundError when it is gone), ``ChunkCorrupt`` when the
        header names another chunk, layout or group, ``ChunkTooNew``, or ValueError.
        """
        path = self.path(key)
        st = os.stat(path)
        header = self.header_of(path)
        if (header.key != key_hex(key) or header.fingerprint != self.fingerprint
                or header.group != key_group(key)):
            raise ChunkCorrupt(f"{path.name}: header names another chunk, layout or group")
        return ChunkRecord(key=key, group=header.group, position=header.position,
                           size=st.st_size,
                           parent=bytes.fromhex(header.parent) if header.parent else None,
                           mtime_ns=st.st_mtime_ns)

    def _scan_leaf(self, leaf: Leaf) -> list[StoredChunk]:
        found = []
        for name in list_names(leaf.path):
            if not is_chunk_name(name):
                continue
            path = os.path.join(leaf.path, name)
            try:
                key = key_of_name(name)
                st = os.stat(path)
                header = self.header_of(Path(path))
                if header.key != key_hex(key) or header.fingerprint != self.fingerprint:
                    raise ChunkCorrupt("header names another chunk or layout")
            except FileNotFoundError:
                continue  # evicted while we scanned
            except ChunkTooNew as exc:
                raise ChunkTooNew(f"{path}: {exc}") from exc
            except (ValueError, ChunkCorrupt, OSError) as exc:
                log.warning("hybridkv: ignoring %s: %s", path, exc)
                continue
            found.append(ChunkRecord(
                key=key, group=header.group, position=header.position, size=st.st_size,
                parent=bytes.fromhex(header.parent) if header.parent else None,
                mtime_ns=st.st_mtime_ns))
        return found

    def scan(self, *, workers: int = 8) -> Iterator[StoredChunk]:
        """Every readable chunk of this rank, read from headers (parallel per directory)."""
        leaves = self.paths.leaves(g.index for g in self.layout.groups)
        if not leaves:
            return
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(leaves)))) as pool:
            for chunks in pool.map(self._scan_leaf, leaves):
                yield from chunks

    def clean_temp(self, *, max_age: float = STALE_TMP_SECONDS,
                   skip: Collection[str] = ()) -> int:
        """Remove stale temp files (``file_map.is_stale_temp``) under the layout
        directory, except in the directories of ``skip`` (a caller that listed them
        removes what it found there with ``file_map.remove_stale_temp``). Returns how many."""
        return remove_stale_temp(temp_files(self.paths.layout_dir, skip=skip), max_age=max_age)


def _feed(hasher, mac, piece) -> None:
    hasher.update(piece)
    if mac is not None:
        mac.update(piece)
