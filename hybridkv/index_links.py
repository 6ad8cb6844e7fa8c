"""Parent / child links between the slots of a ``ChunkIndex``.

Three ``array("i")`` columns indexed by slot: ``parent`` (the parent's slot, -1
when it is not present), ``child`` (the newest child, -1: none) and ``sibling``
(children of one parent form a circular list through it, ``child[p]`` being its
tail, so the oldest child comes first and is unlinked in O(1)). A child whose
parent key is not present *waits* for it: ``waiting[parent key]`` holds the
child slots, ``waiting_for[child slot]`` the key, until that key arrives.

Invariants:
- ``parent[c] == p`` exactly when ``c`` is on the circular list of ``p``;
- a present child with a parent key has either ``parent[c] != -1`` or an entry
  in ``waiting_for`` (never both); a child without a parent key has neither.

The links know slots and keys, not what a slot holds: the index frees slots and
tells the links (``unlink``, ``orphan_children``, ``adopt``).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence

__all__ = ["ParentLinks", "NONE"]

#: "no slot" in the link columns
NONE = -1


class ParentLinks:
    def __init__(self, capacity: int) -> None:
        self.parent = array("i", [NONE]) * capacity
        self.child = array("i", [NONE]) * capacity
        self.sibling = array("i", [NONE]) * capacity
        #: parent key -> slots of present children waiting for it; child slot -> that key
        self.waiting: dict[bytes, set[int]] = {}
        self.waiting_for: dict[int, bytes] = {}

    def grow(self, extra: int) -> None:
        """``extra`` more slots, unlinked (the columns grow in place)."""
        for col in (self.parent, self.child, self.sibling):
            col.extend(array("i", [NONE]) * extra)

    # ---------------------------------------------------------------- queries
    def children(self, slot: int) -> Iterator[int]:
        """Slots of the present children of ``slot``, oldest first."""
        tail = self.child[slot]
        if tail == NONE:
            return
        sibling = self.sibling
        c = sibling[tail]
        while True:
            nxt = sibling[c]
            yield c
            if c == tail:
                return
            c = nxt

    def parent_key(self, slot: int, keys: Sequence[bytes | None]) -> bytes | None:
        """The key ``slot`` extends: its present parent's, or the one it waits for."""
        p = self.parent[slot]
        if p != NONE:
            return keys[p]
        return self.waiting_for.get(slot)

    # ---------------------------------------------------------------- updates
    def link(self, slot: int, parent: bytes | None, parent_slot: int | None) -> None:
        """Give ``slot`` its parent: the present ``parent_slot``, else wait for ``parent``."""
        self.parent[slot] = NONE
        self.sibling[slot] = NONE
        if parent is None:
            return
        if parent_slot is None:
            self.wait(slot, parent)
            return
        self.append(parent_slot, slot)

    def wait(self, slot: int, parent: bytes) -> None:
        """``slot`` waits for the absent key ``parent``."""
        self.waiting_for[slot] = parent
        self.waiting.setdefault(parent, set()).add(slot)

    def adopt(self, slot: int, key: bytes) -> None:
        """``key`` arrived at ``slot``: the children waiting for it become its children."""
        waiting = self.waiting.pop(key, None)
        if waiting:
            for c in sorted(waiting):
                del self.waiting_for[c]
                self.append(slot, c)

    def append(self, p: int, c: int) -> None:
        """``c`` becomes the newest child of ``p`` (the tail of its circular list)."""
        sibling = self.sibling
        self.parent[c] = p
        tail = self.child[p]
        if tail == NONE:
            sibling[c] = c
        else:
            sibling[c] = sibling[tail]
            sibling[tail] = c
        self.child[p] = c

    def unlink(self, slot: int) -> None:
        """``slot`` leaves its parent's list (or stops waiting for its parent key)."""
        p = self.parent[slot]
        if p != NONE:
            sibling = self.sibling
            tail = self.child[p]
            if sibling[slot] == slot:  # the only child
                self.child[p] = NONE
            else:
                pred = tail
                while sibling[pred] != slot:  # from the tail: the oldest child comes first
                    pred = sibling[pred]
                sibling[pred] = sibling[slot]
                if tail == slot:
                    self.child[p] = pred
        else:
            key = self.waiting_for.pop(slot, None)
            if key is not None:
                waiting = self.waiting.get(key)
                if waiting is not None:
                    waiting.discard(slot)
                    if not waiting:
                        del self.waiting[key]
        self.parent[slot] = NONE
        self.sibling[slot] = NONE

    def orphan_children(self, slot: int, key: bytes) -> None:
        """``slot`` (holding ``key``) is freed: its present children wait for ``key`` again."""
        if self.child[slot] != NONE:
            waiting = self.waiting.setdefault(key, set())
            for c in list(self.children(slot)):
                self.parent[c] = NONE
                self.sibling[c] = NONE
                self.waiting_for[c] = key
                waiting.add(c)
        self.child[slot] = NONE
