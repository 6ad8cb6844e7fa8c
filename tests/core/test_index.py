"""The compact ChunkIndex against a plain model of what it must hold (hypothesis), plus its edges."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv.chunks import ChunkRecord
from hybridkv.index import PENDING, SPARE, STORED, ChunkIndex
from hybridkv.keys import key_group, make_key

pytestmark = pytest.mark.fast

HASHES = [bytes([i]) * 8 for i in range(12)]


def key(i: int, g: int = 0) -> bytes:
    return make_key(HASHES[i], g)


class Model:
    """The index's contract, spelled out with dicts."""

    def __init__(self) -> None:
        self.entries: dict[bytes, dict] = {}  # key -> facts (stored or pending)

    def stored(self) -> dict[bytes, dict]:
        return {k: e for k, e in self.entries.items() if e["stored"]}

    def children(self, k: bytes) -> set[bytes]:
        if k not in self.stored():
            return set()
        return {c for c, e in self.stored().items() if e["parent"] == k}


ops = st.lists(st.tuples(st.sampled_from(["reserve", "add", "remove", "release", "touch",
                                          "pin", "unpin"]),
                         st.integers(0, 11), st.integers(0, 2), st.integers(0, 11),
                         st.booleans()),
               max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_index_matches_the_model(steps):
    index, model = ChunkIndex(), Model()
    for op, i, g, p, spare in steps:
        k = key(i, g)
        parent = key(p, g) if p < i else None
        e = model.entries.get(k)
        if op == "reserve" and (e is None or not e["stored"]):
            index.reserve(k, 100 + i, position=256 * (i + 1), parent=parent, spare=spare)
            model.entries[k] = dict(stored=False, size=100 + i, parent=parent, spare=spare, pins=0)
        elif op == "add":
            index.add(k, group=g, position=256 * (i + 1), size=1000 + i, parent=parent)
            if e is None or not e["stored"]:
                model.entries[k] = dict(stored=True, size=1000 + i, parent=parent,
                                        spare=e["spare"] if e else False, pins=0)
        elif op == "remove":
            assert index.remove(k) == bool(e and e["stored"])
            if e and e["stored"]:
                del model.entries[k]
        elif op == "release":
            assert index.release(k) == bool(e and not e["stored"])
            if e and not e["stored"]:
                del model.entries[k]
        elif op == "touch":
            index.touch(k)
            if e and e["stored"]:
                e["spare"] = False
        elif op == "pin":
            index.pin(k)
            if e and e["stored"]:
                e["pins"] += 1
        elif op == "unpin":
            index.unpin(k)
            if e and e["stored"] and e["pins"]:
                e["pins"] -= 1
        # the contract, after every step
        stored = model.stored()
        assert len(index) == len(stored)
        assert {x.key for x in index} == set(stored)
        assert index.bytes_stored == sum(x["size"] for x in stored.values())
        assert index.bytes_used == sum(x["size"] for x in model.entries.values())
        cols = index.columns
        for mk, me in model.entries.items():
            got = index.get_any(mk)
            assert got is not None and got.parent == me["parent"]
            # the public reads: by key, by slot, and the columns, all agree
            slot = index.slot_of(mk)
            assert index.is_stored(mk) == me["stored"] == (mk in index)
            assert cols.slot_of(mk) == slot and cols.keys[slot] == index.key_of(slot) == mk
            assert index.group_of(slot) == cols.group[slot] == key_group(mk)
            assert index.size_of(slot) == cols.size[slot] == me["size"]
            assert index.flags_of(slot) == cols.flags[slot] == (
                (STORED if me["stored"] else PENDING) | (SPARE if me["spare"] else 0))
            parent_slot = index.slot_of(me["parent"]) if me["parent"] else None
            assert index.parent_of(slot) == cols.parent[slot] == (
                -1 if parent_slot is None else parent_slot)
            assert index.pins_of(slot) == cols.pins.get(slot, 0) == me["pins"]
            assert got.spare == me["spare"] and index.is_pending(mk) == (not me["stored"])
            if me["stored"]:
                assert got.pins == me["pins"]
                assert got.children == model.children(mk)
                assert set(index.descendants(mk)) == _descendants(model, mk)
                assert index.companions(mk) == {key_group(c): c for c in stored
                                                if c[:-4] == mk[:-4]}
        assert {x.key for x in index.pending()} == set(model.entries) - set(stored)


def _descendants(model: Model, k: bytes) -> set[bytes]:
    out, todo = set(), [k]
    while todo:
        for c in model.children(todo.pop()):
            out.add(c)
            todo.append(c)
    return out


def test_slots_are_reused_and_columns_grow():
    index = ChunkIndex()
    keys = [make_key(i.to_bytes(8, "big"), 0) for i in range(3000)]
    for i, k in enumerate(keys):
        index.add(k, group=0, position=256, size=10)
    assert len(index) == 3000 and index.bytes_stored == 30000
    for k in keys[:2000]:
        index.remove(k)
    capacity = len(index.columns.flags)
    for i in range(2000):
        index.add(make_key((10_000 + i).to_bytes(8, "big"), 0), group=0, position=256, size=1)
    assert len(index.columns.flags) == capacity  # freed slots were reused
    assert len(index) == 3000 and index.bytes_stored == 1000 * 10 + 2000


def test_children_wait_for_a_parent_that_comes_back():
    index = ChunkIndex()
    a, b, c = key(0), key(1), key(2)
    index.add(b, group=0, position=512, size=1, parent=a)  # the parent is not known yet
    index.add(c, group=0, position=768, size=1, parent=b)
    assert index.get(b).parent == a and index.descendants(a) == []
    index.add(a, group=0, position=256, size=1)
    assert set(index.descendants(a)) == {b, c}
    index.remove(a)  # its children stay, waiting for it again
    assert b in index and index.get(b).parent == a
    index.add(a, group=0, position=256, size=1)
    assert index.get(a).children == {b}


def test_clock_overflow_renumbers_keeping_the_order():
    index = ChunkIndex()
    for i in range(5):
        index.add(key(i), group=0, position=256, size=1)
    index.touch(key(1))
    index.mark_hit(key(3))
    before = [e.key for e in sorted(index, key=lambda e: e.last_access)]
    hit_before = index.get(key(3)).last_hit > index.get(key(4)).created
    index._clock = 2**32 - 1  # the next tick would overflow 32 bits
    index.touch(key(0))
    after = [e.key for e in sorted(index, key=lambda e: e.last_access)]
    assert after == [k for k in before if k != key(0)] + [key(0)]
    assert (index.get(key(3)).last_hit > index.get(key(4)).created) == hit_before
    assert index._clock < 100


def test_records_round_trip_in_recency_order():
    index = ChunkIndex()
    for i in range(6):
        index.add(key(i), group=0, position=256 * (i + 1), size=7 + i,
                  parent=key(i - 1) if i else None, mtime_ns=1000 + i)
    index.touch(key(0))
    records = index.records()
    assert [r.key for r in records] == [key(i) for i in (1, 2, 3, 4, 5, 0)]
    assert records[-1] == ChunkRecord(key(0), 0, 256, 7, None, 1000)
    again = ChunkIndex()
    again.load(records, by_mtime=False)
    assert [r.key for r in again.records()] == [r.key for r in records]
    assert again.get(key(3)).parent == key(2) and again.bytes_stored == index.bytes_stored


def test_lru_slots_are_in_recency_order():
    index = ChunkIndex()
    for i in range(2000):
        index.add(make_key(i.to_bytes(8, "big"), 0), group=0, position=256, size=1)
    for i in range(0, 2000, 3):
        index.touch(make_key(i.to_bytes(8, "big"), 0))
    order = [index.key_of(s) for s in index.lru_slots()]
    assert order == [e.key for e in sorted(index, key=lambda e: e.last_access)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 11), st.integers(0, 1), st.integers(0, 11),
                          st.integers(0, 5)), max_size=40))
def test_bulk_load_equals_adding_one_by_one(rows):
    records = [ChunkRecord(key(i, g), g, 256 * (i + 1), 10 + i, key(p, g) if p < i else None,
                           mtime) for i, g, p, mtime in rows]
    bulk = ChunkIndex()
    bulk.load(records)
    one = ChunkIndex()
    for r in sorted(records, key=lambda r: r.mtime_ns):
        if r.key not in one:
            one.add(r.key, group=r.group, position=r.position, size=r.size, parent=r.parent,
                    mtime_ns=r.mtime_ns)
    assert len(bulk) == len(one) and bulk.bytes_stored == one.bytes_stored
    assert bulk.records() == one.records()
    for e in one:
        got = bulk.get(e.key)
        assert got.children == e.children and got.parent == e.parent
        assert set(bulk.descendants(e.key)) == set(one.descendants(e.key))


def test_columns_read_through_growth_renumbering_bulk_load_and_clear():
    """``columns`` is one object until ``clear``: growth and clock renumbering happen in
    place, so a view fetched before them shows the index as it is after."""
    index = ChunkIndex()
    cols = index.columns
    keys = [make_key(i.to_bytes(8, "big"), 0) for i in range(3000)]  # grows twice
    for i, k in enumerate(keys):
        index.add(k, group=0, position=256 * (i + 1), size=i,
                  parent=keys[i - 1] if i else None)
    assert index.columns is cols and len(cols.flags) >= 3000
    for i, k in enumerate(keys):
        s = cols.slot_of(k)
        assert cols.keys[s] == k and cols.size[s] == i and cols.flags[s] == STORED
        assert cols.parent[s] == (cols.slot_of(keys[i - 1]) if i else -1)
    index.mark_hit(keys[5])
    index.pin(keys[6])
    assert cols.last_hit[cols.slot_of(keys[5])] > 0 and cols.pins[cols.slot_of(keys[6])] == 1
    order = sorted(keys, key=lambda k: cols.last_access[cols.slot_of(k)])
    index._clock = 2**32 - 1  # the next tick renumbers the clocks
    index.touch(keys[0])
    assert index.columns is cols and index._clock < 10_000
    assert sorted(keys, key=lambda k: cols.last_access[cols.slot_of(k)]) == order[1:] + [keys[0]]
    assert cols.last_hit[cols.slot_of(keys[5])] == index.get(keys[5]).last_hit > 0
    with pytest.raises((TypeError, AttributeError)):
        cols.size = None  # type: ignore[misc]  # the view is frozen
    with pytest.raises(TypeError):
        cols.pins[0] = 1  # type: ignore[index]  # and its dicts read only

    loaded = ChunkIndex()
    before = loaded.columns
    loaded.load(index.records(), by_mtime=False)
    assert loaded.columns is before
    assert all(before.keys[before.slot_of(k)] == k for k in keys)

    index.clear()
    assert index.columns is not cols and index.columns.slot_of(keys[0]) is None
    assert not index.is_stored(keys[0])
