"""Traces as JSONL files: Mooncake's format (block ids) or token ids, read and written.

Invariant: ``load_jsonl(save_jsonl(trace, path), block_tokens=trace.block_tokens)``
has the same requests as ``trace`` (timestamps are stored in whole milliseconds).

Imports no vLLM and no torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import msgspec
import numpy as np
import xxhash

from hybridkv.sim.trace_model import Request, Trace

__all__ = ["load_jsonl", "save_jsonl", "token_hash_ids"]


_NonNegative = Annotated[int, msgspec.Meta(ge=0)]
_TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class _Line(msgspec.Struct):
    """A JSONL line as read: Mooncake form (``hash_ids``) or token form (``tokens``)."""

    timestamp: Annotated[float, msgspec.Meta(ge=0)] | None = None  # milliseconds
    input_length: _NonNegative | None = None
    output_length: _NonNegative = 0
    hash_ids: list[int] | None = None
    tokens: list[_TokenId] | None = None
    session: str = ""


class _MooncakeLine(msgspec.Struct):
    """A JSONL line as written (Mooncake's trace format plus ``session``)."""

    timestamp: int  # milliseconds
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    session: str


def save_jsonl(trace: Trace, path: str | os.PathLike) -> Path:
    """Write one Mooncake-style JSON object per request; returns the path."""
    encoder = msgspec.json.Encoder()
    path = Path(path)
    with open(path, "wb") as f:
        for r in trace.requests:
            line = _MooncakeLine(
                timestamp=round(r.timestamp * 1000),
                input_length=r.input_length,
                output_length=r.output_length,
                hash_ids=r.hash_ids,
                session=r.session,
            )
            f.write(encoder.encode(line) + b"\n")
    return path


def load_jsonl(path: str | os.PathLike, *, block_tokens: int = 512,
               name: str | None = None) -> Trace:
    """Read a JSONL trace, one request per line, in file order; blank lines are skipped.

    A line is either ``{"timestamp": ms, "input_length": n, "output_length": m,
    "hash_ids": [...], "session": s}`` (Mooncake's format; ``output_length`` and
    ``session`` optional) or ``{"tokens": [...], "timestamp": ms,
    "output_length": m}``, whose ids come from ``token_hash_ids``. A missing
    timestamp repeats the previous line's (0 on the first line). Raises
    ValueError naming the line for a malformed line, ids inconsistent with
    ``input_length`` and ``block_tokens``, or a timestamp that goes backwards.
    """
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    decoder = msgspec.json.Decoder(_Line)
    requests: list[Request] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            previous = requests[-1].timestamp if requests else 0.0
            try:
                requests.append(_to_request(decoder.decode(raw), block_tokens, previous))
            except (msgspec.DecodeError, ValueError) as exc:
                raise ValueError(f"{os.fspath(path)}, line {lineno}: {exc}") from None
    return Trace(name=Path(path).stem if name is None else name, block_tokens=block_tokens,
                 requests=requests)


def _to_request(line: _Line, block_tokens: int, previous_timestamp: float) -> Request:
    if line.tokens is not None and line.hash_ids is not None:
        raise ValueError("has both 'tokens' and 'hash_ids'")
    if line.tokens is not None:
        if line.input_length not in (None, len(line.tokens)):
            raise ValueError(f"input_length {line.input_length} != {len(line.tokens)} tokens")
        hash_ids = token_hash_ids(line.tokens, block_tokens)
        input_length = len(line.tokens)
    elif line.hash_ids is None:
        raise ValueError("missing field 'hash_ids' (or 'tokens')")
    elif line.input_length is None:
        raise ValueError("missing field 'input_length'")
    else:
        hash_ids, input_length = tuple(line.hash_ids), line.input_length
        expected = -(-input_length // block_tokens)
        if len(hash_ids) != expected:
            raise ValueError(f"{len(hash_ids)} hash_ids, expected {expected} for input_length "
                             f"{input_length} at {block_tokens} tokens per block")
    timestamp = previous_timestamp if line.timestamp is None else line.timestamp / 1000
    if timestamp < previous_timestamp:
        raise ValueError(f"timestamp {line.timestamp:g} ms is before the previous line's "
                         f"{previous_timestamp * 1000:g} ms")
    return Request(hash_ids=hash_ids, input_length=input_length, output_length=line.output_length,
                   timestamp=timestamp, session=line.session)


def token_hash_ids(tokens: Sequence[int], block_tokens: int) -> tuple[int, ...]:
    """Chained block ids of token ids.

    Block id = xxh3_64 of the previous block's id (8 bytes little-endian; none
    for the first block) followed by the block's tokens as int64 little-endian.
    Equal token prefixes give equal ids; a partial last block hashes fewer
    tokens, so its id differs from the full block's.
    """
    data = np.asarray(tokens, dtype="<i8")
    ids: list[int] = []
    previous = b""
    for start in range(0, len(data), block_tokens):
        block_id = xxhash.xxh3_64_intdigest(previous + data[start:start + block_tokens].tobytes())
        ids.append(block_id)
        previous = block_id.to_bytes(8, "little")
    return tuple(ids)
