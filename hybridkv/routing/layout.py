"""Where the router learns the fleet's group layout: a hybridkv ``layout.json``, or a spec.

- ``load_layout(path)``: ``<cache_dir>/<fingerprint>/layout.json`` as hybridkv writes
  it, the layout directory, or a cache dir holding exactly one layout;
- ``parse_groups("full:16,sliding:16:4096,state:16", blocks_per_chunk=1)``: for
  fleets without hybridkv (GPU-tier events only), ``KIND:BLOCK_TOKENS[:WINDOW]``
  per group in vLLM group order, kinds ``full`` / ``sliding`` / ``state``.
Errors are ``ValueError`` naming the bad value. Every engine of a fleet must
share the layout (the router answers 0 for a replica whose events contradict it).
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from hybridkv.groups import GroupKind, GroupSpec, HybridLayout
from hybridkv.store.fileio import FileIO

__all__ = ["load_layout", "parse_groups"]

_KINDS = {"full": GroupKind.FULL, "sliding": GroupKind.SLIDING, "state": GroupKind.STATE}


class _LayoutFile(msgspec.Struct):
    layout: HybridLayout


def load_layout(path: str | Path) -> HybridLayout:
    p = Path(path)
    if p.is_dir():
        found = [p / "layout.json"] if (p / "layout.json").is_file() else sorted(
            p.glob("*/layout.json"))
        if len(found) != 1:
            raise ValueError(f"{p}: expected one <fingerprint>/layout.json, found "
                             f"{len(found)}{': ' + ', '.join(str(f.parent.name) for f in found) if found else ''}")
        p = found[0]
    try:
        return msgspec.json.decode(FileIO().read_all(p), type=_LayoutFile).layout
    except FileNotFoundError:
        raise ValueError(f"{p}: no such file or directory") from None
    except (OSError, msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise ValueError(f"{p}: not a hybridkv layout.json ({exc})") from None


def parse_groups(spec: str, blocks_per_chunk: int = 1) -> HybridLayout:
    if blocks_per_chunk <= 0:
        raise ValueError(f"blocks per chunk must be positive, got {blocks_per_chunk}")
    groups = []
    for index, item in enumerate(s.strip() for s in spec.split(",")):
        parts = item.split(":")
        kind = _KINDS.get(parts[0])
        if kind is None or len(parts) not in (2, 3) or (len(parts) == 3) != (kind is GroupKind.SLIDING):
            raise ValueError(f"group {item!r}: expected full:BLOCK, sliding:BLOCK:WINDOW or "
                             "state:BLOCK")
        try:
            nums = [int(x) for x in parts[1:]]
        except ValueError:
            raise ValueError(f"group {item!r}: sizes must be integers") from None
        try:
            groups.append(GroupSpec(index=index, kind=kind, block_tokens=nums[0],
                                    chunk_tokens=nums[0] * blocks_per_chunk,
                                    layer_names=(f"group{index}",), page_bytes=1,
                                    window_tokens=nums[1] if len(nums) == 2 else None))
        except ValueError as exc:
            raise ValueError(f"group {item!r}: {exc}") from None
    return HybridLayout(model="fleet", dtype="auto", groups=tuple(groups))
