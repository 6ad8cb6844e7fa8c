"""The per-process stats files go through ``FileIO``: a fault rule reaches them."""

from __future__ import annotations

import pytest

from hybridkv.stats import Counters, read_stats
from hybridkv.store.file_map import temp_files
from hybridkv.testing.faults import FaultyFileIO, parse_rules

pytestmark = pytest.mark.fast


def test_a_write_fault_reaches_the_stats_file_and_never_breaks_the_caller(tmp_path):
    rules = parse_rules([{"op": "write", "errno": "ENOSPC", "path": "manager-", "count": 1}])
    c = Counters(tmp_path / "stats", "manager", io=FaultyFileIO(rules))
    c.add("chunks_written", 2, group=1)
    c.flush()  # ENOSPC on the temp file: swallowed, nothing (not even a temp file) left
    assert rules[0].fired == 1
    assert not c.path.exists() and temp_files(tmp_path) == []
    c.add("chunks_written")
    c.flush()  # the rule is spent: written atomically through the same FileIO
    assert read_stats(tmp_path / "stats") == {"all": {"chunks_written": 3},
                                              "g1": {"chunks_written": 2}}
    assert temp_files(tmp_path) == []


def test_a_read_fault_reaches_read_stats(tmp_path):
    for role, n in (("manager", 1), ("worker0", 5)):
        c = Counters(tmp_path, role)
        c.add("hits", n)
        c.flush()
    rules = parse_rules([{"op": "read", "errno": "EIO", "path": "worker0"}])
    assert read_stats(tmp_path, io=FaultyFileIO(rules)) == {"all": {"hits": 1}}  # skipped
    assert rules[0].fired == 1
    assert read_stats(tmp_path) == {"all": {"hits": 6}}
