"""Configuration: every bad setting fails at start with a message naming key and fix."""

from __future__ import annotations

import os

import pytest

from hybridkv.config import ConfigError, HybridKVConfig, parse_size

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("text,expected", [
    ("200GiB", 200 * 2**30), ("1.5TB", 1_500_000_000_000), ("512MiB", 512 * 2**20),
    ("1048576", 1048576), (4096, 4096), (" 10 kib ", 10240),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["-1GiB", "lots", "10 parsecs", -5, True, "1e3GB"])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError):
        parse_size(bad, "disk_budget")


def test_defaults(tmp_path):
    c = HybridKVConfig.from_extra_config({"cache_dir": str(tmp_path), "spec_name": "x",
                                          "blocks_per_chunk": 2})
    assert c.cache_dir == str(tmp_path) and c.disk_budget is None
    assert c.durability == "none" and c.file_mode == 0o600
    assert c.eviction_policy == "group_aware" and c.eviction_headroom == 0.02


@pytest.mark.parametrize("extra,names", [
    ({"cache_dir": "/x", "disk_budgt": "1GiB"}, "disk_budgt"),
    ({"cache_dir": "/x", "disk_budget": "-3GiB"}, "disk_budget"),
    ({"cache_dir": "/x", "disk_budget": "soon"}, "disk_budget"),
    ({"cache_dir": "/x", "disk_budget": 0}, "disk_budget"),
    ({"cache_dir": "/x", "durability": "paranoid"}, "durability"),
    ({"cache_dir": "/x", "file_mode": "rw-r--r--"}, "file_mode"),
    ({"cache_dir": "/x", "io_threads": 0}, "io_threads"),
    ({"cache_dir": "/x", "eviction_policy": "fifo"}, "eviction_policy"),
    ({"cache_dir": "/x", "checkpoint_interval": -1}, "checkpoint_interval"),
    ({"cache_dir": "/x", "eviction_headroom": 0.9}, "eviction_headroom"),
    ({"cache_dir": "/x", "eviction_headroom": "2%"}, "eviction_headroom"),
    ({}, "cache_dir"),
])
def test_bad_settings_name_the_key(extra, names, monkeypatch):
    monkeypatch.delenv("HYBRIDKV_CACHE_DIR", raising=False)
    with pytest.raises(ConfigError, match=names):
        HybridKVConfig.from_extra_config(extra)


def test_modes_and_budget(tmp_path):
    c = HybridKVConfig.from_extra_config({"cache_dir": str(tmp_path), "file_mode": "0o640",
                                          "disk_budget": "2GiB", "durability": "full",
                                          "eviction_headroom": 0})
    assert c.file_mode == 0o640 and c.disk_budget == 2 * 2**30 and c.durability == "full"
    assert c.eviction_headroom == 0.0


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="not writable"):
        HybridKVConfig.from_extra_config({"cache_dir": str(ro)}).check_directory()


def test_directory_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cache_dir"):
        HybridKVConfig.from_extra_config({"cache_dir": str(blocker / "sub")}).check_directory()
