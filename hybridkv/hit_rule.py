"""The hybrid hit rule: how many tokens every group can serve from storage.

A stored prefix is only worth loading when *every* group can serve it:

- full attention needs every chunk from the first uncomputed one up to the hit;
- sliding window needs the chunks covering the window right before the hit;
- state (Mamba / linear attention) needs the one state chunk ending exactly at
  the hit;
- with any window or state group the last prompt token is always recomputed
  (the engine needs its logits), and with a Mamba ``align`` size the hit is
  rounded down to it.

``servable_tokens`` is a pure function and mirrors, step by step, what vLLM's
``OffloadingConnectorScheduler._lookup_complete_chunks`` computes (without
EAGLE groups, partial tails or deferred lookups), so the manager can predict
what the connector will load and the simulator can count hits exactly.

Invariant: the result is the largest hit every group can serve; it is 0 or
at least one chunk of every group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hybridkv.groups import GroupKind, GroupSpec

__all__ = ["servable_tokens", "load_window_chunks", "Present"]

#: present(group_index, chunk_index) -> is that chunk stored (and loadable)?
Present = Callable[[int, int], bool]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def load_window_chunks(group: GroupSpec, hit_end: int) -> int | None:
    """Chunks a group must load so that its window ends at ``hit_end`` tokens.

    ``hit_end`` may fall inside a chunk (the recomputed last token); the window
    then reaches one chunk further left when the window does not fit.
    """
    window = group.window_chunks
    if group.kind is GroupKind.SLIDING:
        assert window is not None and group.window_tokens is not None
        right_padding = -hit_end % group.chunk_tokens
        window = max(window, _cdiv(group.window_tokens - 1 + right_padding, group.chunk_tokens))
    return window


def _prefix_hits(present: Present, group: int, start: int, end: int) -> int:
    hits = 0
    for idx in range(start, end):
        if not present(group, idx):
            break
        hits += 1
    return hits


def _window_hits(present: Present, group: int, start: int, end: int,
                 window: int, first_window: int) -> int:
    """End (relative to ``start``) of the last run of ``window`` hits, scanning back.

    The rightmost run may need ``first_window`` chunks. If the run reaches
    ``start`` before it is long enough, the chunks before ``start`` are already
    computed and the run serves as is.
    """
    run = 0
    required = first_window
    for idx in range(end - 1, start - 1, -1):
        if present(group, idx):
            run += 1
        else:
            run = 0
            required = window
        if run == required:
            return idx - start + required
    return run


def servable_tokens(
    groups: Sequence[GroupSpec],
    present: Present,
    num_tokens: int,
    num_computed_tokens: int = 0,
    align_tokens: int | None = None,
) -> int:
    """Tokens past ``num_computed_tokens`` that every group can load.

    ``num_tokens`` is the request length; each group has one key per complete
    chunk (``num_tokens // chunk_tokens``). ``align_tokens`` is the Mamba
    ``align``-mode chunk, if any.
    """
    full = [g for g in groups if g.kind is GroupKind.FULL]
    windowed = sorted((g for g in groups if g.kind is not GroupKind.FULL),
                      key=lambda g: g.window_chunks or 0, reverse=True)
    max_hit = num_tokens
    if windowed:
        max_hit -= 1
        if align_tokens is not None:
            max_hit -= max_hit % align_tokens

    num_hit = 0
    todo: Sequence[GroupSpec] = full + windowed
    while todo:
        looked_up_window = False
        current, todo = todo, ()
        for g in current:
            c = g.chunk_tokens
            num_keys = num_tokens // c
            max_hit = min(max_hit, num_keys * c)
            if max_hit - num_computed_tokens < c:
                return 0
            num_chunks = min(_cdiv(max_hit, c), num_keys)
            start = num_computed_tokens // c
            if g.kind is GroupKind.FULL:
                hits = _prefix_hits(present, g.index, start, num_chunks)
            else:
                first = load_window_chunks(g, min(max_hit, num_chunks * c))
                assert first is not None and g.window_chunks is not None
                hits = _window_hits(present, g.index, start, num_chunks, g.window_chunks, first)
            if hits == 0:
                return 0
            max_hit = min(max_hit, c * (start + hits))
            new_hit = max_hit - num_computed_tokens
            if new_hit < c:
                return 0
            if new_hit < num_hit and looked_up_window and not todo:
                # a window checked earlier in this pass may no longer end at the hit
                todo = windowed
            looked_up_window |= g.kind is not GroupKind.FULL
            num_hit = new_hit
    return num_hit
